"""Publisher toolkit: keygen, pack_command and publish/roll-back into a repository directory."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.core.errors import UsageError
from patchd.core.fsio import TEMP_PREFIX
from patchd.publisher.history import HISTORY
from patchd.publisher.publish import keygen, pack_command, parse_roll_back, publish, roll_back
from patchd.trust.manifest import Manifest, parse_manifest, verify_manifest
from patchd.trust.signing import TrustedKeys, parse_public_key
from support.trees import write_tree

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    write_tree(tmp_path / "base", {"app": ("file", b"v1", 0o755),
                                   "VERSION": ("file", b"1.0\n", 0o644)})
    write_tree(tmp_path / "target", {"app": ("file", b"v2", 0o755), "new": ("file", b"n", 0o644),
                                     "VERSION": ("file", b"1.0\n", 0o644)})
    write_tree(tmp_path / "target-2.0", {"app": ("file", b"v3", 0o755),
                                         "VERSION": ("file", b"2.0\n", 0o644)})
    key = tmp_path / "key.pem"
    (tmp_path / "pub").write_text(keygen(key))
    return {"root": tmp_path, "key": key, "repo": tmp_path / "repo"}


def bundle(env: dict[str, Path], patch: int | None, arch: str = "x86_64",
           release: str = "1.0") -> Path:
    out = env["root"] / f"{release}-{patch}-{arch}.patchd"
    target = env["root"] / ("target" if release == "1.0" else f"target-{release}")
    pack_command(app="kiosk", release=release, patch=patch, full=patch is None,
                 base=env["root"] / "base" if patch else None, target=target,
                 keys=[env["key"]], arch=arch, out=out)
    return out


def verified(env: dict[str, Path]) -> Manifest:
    trust = TrustedKeys.from_raw([parse_public_key((env["root"] / "pub").read_text())], 1)
    repo = env["repo"]
    return verify_manifest((repo / "manifest.json").read_bytes(),
                           (repo / "manifest.json.sig").read_bytes(), trust, app="kiosk",
                           channel="stable", min_serial=None, same_serial_sha256=None, now=NOW)


def test_publish_creates_repository(env: dict[str, Path]) -> None:
    """Publishing into a missing directory creates a signed manifest and copies the bundle."""
    b = bundle(env, 1)
    m = publish(env["repo"], "kiosk", "stable", [env["key"]], [b], None, timedelta(days=30),
                now=NOW)
    assert verified(env) == m
    assert m.serial == 1 and m.expires == NOW + timedelta(days=30)
    entry = m.releases["1.0"].patch(1)
    assert entry is not None and entry.rollout == 100
    (ref,) = entry.bundles
    copied = env["repo"] / ref.url
    assert ref.url == "1.0/1-x86_64.patchd"
    assert copied.read_bytes() == b.read_bytes()
    data = b.read_bytes()
    assert (ref.size, ref.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert not [p for p in env["repo"].rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_republish_replaces_and_bumps_serial(env: dict[str, Path]) -> None:
    """Publishing again replaces the same arch's entry, adds other arches, bumps the serial."""
    publish(env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], 10,
            timedelta(days=1), now=NOW)
    m = publish(env["repo"], "kiosk", "stable", [env["key"]],
                [bundle(env, 1), bundle(env, 1, arch="aarch64"), bundle(env, 2)], None,
                timedelta(days=1), now=NOW)
    assert m.serial == 2 and verified(env) == m
    history = parse_manifest((env["repo"] / HISTORY).read_bytes())
    p1 = history.releases["1.0"].patch(1)
    assert p1 is not None and p1.rollout == 10
    assert [b.arch for b in p1.bundles] == ["aarch64", "x86_64"]
    assert [p.patch for p in history.releases["1.0"].patches] == [1, 2]
    # Served: x86_64 hosts stop at patch 2 (100 %), aarch64 hosts still need patch 1.
    assert [(p.patch, [b.arch for b in p.bundles]) for p in m.releases["1.0"].patches] == [
        (1, ["aarch64"]), (2, ["x86_64"])]


def test_full_bundle_sets_full(env: dict[str, Path]) -> None:
    """A full bundle lands at RELEASE/full-ARCH.patchd and becomes the manifest's full entry."""
    m = publish(env["repo"], "kiosk", "stable", [env["key"]],
                [bundle(env, None, arch="any", release="2.0")], None, timedelta(days=1), now=NOW)
    assert m.full is not None and m.full.release == "2.0"
    assert m.full.bundles[0].url == "2.0/full-any.patchd"
    assert (env["repo"] / "2.0/full-any.patchd").is_file()


def test_roll_back_and_roll_forward(env: dict[str, Path]) -> None:
    """--roll-back lists the patch as rolled back; publishing it again lifts that."""
    publish(env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], None,
            timedelta(days=1), now=NOW)
    m = roll_back(env["repo"], "kiosk", "stable", [env["key"]], "1.0", 1, timedelta(days=1),
                  now=NOW)
    assert m.releases["1.0"].rolled_back == frozenset({1}) and m.serial == 2
    assert verified(env) == m
    m = publish(env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], None,
                timedelta(days=1), now=NOW)
    assert m.releases["1.0"].rolled_back == frozenset() and m.serial == 3


def test_publish_refuses_other_app_or_channel(env: dict[str, Path]) -> None:
    """A repository belongs to one app and channel; publishing another is a usage error."""
    publish(env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], None,
            timedelta(days=1), now=NOW)
    with pytest.raises(UsageError, match="channel 'stable'"):
        publish(env["repo"], "kiosk", "beta", [env["key"]], [bundle(env, 1)], None,
                timedelta(days=1), now=NOW)
    with pytest.raises(UsageError, match="not in"):
        roll_back(env["repo"], "kiosk", "stable", [env["key"]], "9.9", 1, timedelta(days=1))


def test_manifest_on_disk_is_spec_json(env: dict[str, Path]) -> None:
    """manifest.json is the specified document with a serial and RFC 3339 expiry."""
    publish(env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], 50,
            timedelta(hours=1), now=NOW)
    doc = json.loads((env["repo"] / "manifest.json").read_text())
    assert doc["format"] == "patchd-manifest/1" and doc["expires"] == "2026-06-01T01:00:00Z"
    assert doc["releases"][0]["patches"][0]["rollout"] == 50


@pytest.mark.parametrize(("kw", "message"), [
    ({"patch": 1, "full": True}, "exactly one"),
    ({"patch": None, "full": False}, "exactly one"),
    ({"patch": 0, "full": False}, "--patch N"),
    ({"patch": 1, "full": False, "base": None}, "--base"),
    ({"patch": None, "full": True, "base": "base"}, "no --base"),
    ({"patch": 1, "full": False, "release": "../x"}, "release"),
])
def test_pack_command_usage(env: dict[str, Path], kw: dict[str, object], message: str) -> None:
    """pack_command rejects inconsistent arguments with a UsageError."""
    args: dict[str, object] = {"app": "kiosk", "release": "1.0", "base": env["root"] / "base",
                               "target": env["root"] / "target", "keys": [env["key"]],
                               "out": env["root"] / "x.patchd"}
    args.update(kw)
    if args.get("base") == "base":
        args["base"] = env["root"] / "base"
    with pytest.raises(UsageError, match=message):
        pack_command(**args)  # type: ignore[arg-type]


def test_parse_roll_back() -> None:
    """RELEASE:PATCH parses; anything else is a usage error."""
    assert parse_roll_back("1.4.0:3") == ("1.4.0", 3)
    for bad in ("1.4.0", "1.4.0:x", ":3", "1.4.0:0"):
        with pytest.raises(UsageError):
            parse_roll_back(bad)


def test_publish_without_bundles_renews_expiry(tmp_path: Path) -> None:
    """Publishing no bundle re-signs with a higher serial and a new expiry, nothing else."""
    from patchd.trust.manifest import parse_manifest
    from patchd.trust.signing import generate_key

    key = tmp_path / "k"
    generate_key(key)
    repo = tmp_path / "repo"
    with pytest.raises(UsageError, match="does not exist"):
        publish(repo, "kiosk", "stable", [key], [], None, timedelta(days=1))
    repo.mkdir()
    now = datetime.now(UTC)
    soon = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (repo / "manifest.json").write_text(
        '{"format": "patchd-manifest/1", "app": "kiosk", "channel": "stable", "serial": 4, '
        f'"expires": "{soon}", "releases": []}}')
    renewed = publish(repo, "kiosk", "stable", [key], [], None, timedelta(days=30))
    assert renewed.serial == 5
    assert renewed.expires > now + timedelta(days=29)
    assert parse_manifest((repo / "manifest.json").read_bytes()).serial == 5


def test_each_publish_gives_the_manifest_a_new_whole_second(env: dict[str, Path]) -> None:
    """nginx's ETag and Last-Modified are the mtime in whole seconds and the size: two
    publishes within one second of equal-size manifests looked unchanged (304) to a
    host that polled between them, which then missed the second publish (found by
    the disk-full campaign)."""
    manifest = env["repo"] / "manifest.json"
    seconds = []
    for serial in range(1, 4):
        publish(env["repo"], "kiosk", "stable", [env["key"]], [], None,
                timedelta(days=1), now=NOW) if serial > 1 else publish(
            env["repo"], "kiosk", "stable", [env["key"]], [bundle(env, 1)], None,
            timedelta(days=1), now=NOW)
        seconds.append(int(manifest.stat().st_mtime))
    assert seconds[0] < seconds[1] < seconds[2], seconds
