"""The root of trust: the chain walk, its persistence, and every attack on it refused.

Roots are made by the real publisher (``patchd.publisher.roots``), served from a real
repository directory and walked by the host's :class:`RootKeeper` through a
:class:`LocalSource`, as the daemon does. Each attack starts from a host that
accepted root version 2 and proves the specific error and that the accepted root
(the state file's bytes) did not change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.config import config_from_dict
from patchd.core.errors import (
    ConfigErrors,
    ManifestKeyRevoked,
    RootExpired,
    RootInvalid,
    RootSignatureInvalid,
    RootVersionInvalid,
    UsageError,
)
from patchd.fetch.sources import LocalSource
from patchd.publisher import roots
from patchd.trust.manifest import Manifest, manifest_to_json, verify_manifest
from patchd.trust.root import parse_root
from patchd.trust.root_store import Bootstrap, RootKeeper
from patchd.trust.signing import (
    generate_key,
    key_id,
    load_private_key,
    parse_public_key,
    sign_document,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

NOW = datetime.now(UTC)
SIGN_CMD = Path(__file__).parent / "support" / "sign_cmd.py"
ANY_KEY = "ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="


class Key:
    """A key file, its public text and the loaded private key."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / f"{name}.key"
        self.public = generate_key(self.path)
        self.private = load_private_key(self.path)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Key]:
    (tmp_path / "keys").mkdir()
    return {n: Key(tmp_path / "keys", n) for n in "ABCDEF"}


@pytest.fixture
def repo(tmp_path: Path, keys: dict[str, Key]) -> Path:
    """Root 1 (root key A, updates key B) and root 2 (root key C, updates key D)."""
    repo = tmp_path / "repo"
    k = keys
    roots.create(repo, root_keys=[k["A"].public], root_threshold=None,
                 updates_keys=[k["B"].public], updates_threshold=None,
                 expires=timedelta(days=365), signers=[k["A"].private], now=NOW)
    roots.create(repo, root_keys=[k["C"].public], root_threshold=None,
                 updates_keys=[k["D"].public], updates_threshold=None,
                 expires=timedelta(days=365), signers=[k["A"].private, k["C"].private],
                 now=NOW)
    return repo


def keeper_for(repo: Path, state: Path) -> RootKeeper:
    """A host whose config pins root version 1 (``trust.root_file``)."""
    data = roots.root_path(repo, 1).read_bytes()
    state.mkdir(exist_ok=True)
    return RootKeeper(state / "root.json", Bootstrap.from_document(data, parse_root(data)))


async def walk(keeper: RootKeeper, repo: Path, target: int) -> bool:
    source = LocalSource(str(repo / "manifest.json"))
    return await keeper.advance(target, source.fetch_root, datetime.now(UTC))


def write_root(repo: Path, version: int, doc: dict[str, Any], signers: list[Key]) -> None:
    """A hand-made root file (what an attacker or a broken tool would publish)."""
    data = (json.dumps(doc, indent=2) + "\n").encode()
    path = roots.root_path(repo, version)
    path.write_bytes(data)
    path.with_name(path.name + ".sig").write_bytes(
        sign_document(data, [k.private for k in signers]))


def root_doc(version: int, root_keys: list[Key], updates: list[Key], *, threshold: int = 1,
             expires: datetime = NOW + timedelta(days=30)) -> dict[str, Any]:
    return {"format": "patchd-root/1", "version": version,
            "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "root": {"keys": [k.public for k in root_keys], "threshold": threshold},
            "updates": {"keys": [k.public for k in updates], "threshold": 1}}


async def test_walk_persists_and_survives_a_restart(repo: Path, keys: dict[str, Key],
                                                    tmp_path: Path) -> None:
    """A host at version 1 walks to 3, writes it beside client.json, and reloads it."""
    roots.create(repo, root_keys=[keys["E"].public], root_threshold=None,
                 updates_keys=[keys["F"].public], updates_threshold=None,
                 expires=timedelta(days=365), signers=[keys["C"].private, keys["E"].private],
                 now=NOW)
    keeper = keeper_for(repo, tmp_path / "state")
    assert await walk(keeper, repo, 3)
    assert keeper.version == 3
    assert keeper.updates_trust().revoked == {_kid(keys["B"]), _kid(keys["D"])}
    again = keeper_for(repo, tmp_path / "state")
    assert again.version == 3 and (tmp_path / "state" / "root.json").exists()
    assert not await walk(again, repo, 3)  # nothing to do, nothing fetched


def _kid(key: Key) -> str:
    return key_id(parse_public_key(key.public))


async def test_offline_host_catches_up_past_an_expired_root(repo: Path, keys: dict[str, Key],
                                                            tmp_path: Path) -> None:
    """Intermediate roots may have expired: only the newest must be current."""
    write_root(repo, 3, root_doc(3, [keys["E"]], [keys["F"]], expires=NOW - timedelta(days=1)),
               [keys["C"], keys["E"]])
    write_root(repo, 4, root_doc(4, [keys["E"]], [keys["F"]]), [keys["E"]])
    keeper = keeper_for(repo, tmp_path / "state")
    assert await walk(keeper, repo, 4)
    assert keeper.version == 4


@pytest.fixture
async def at_two(repo: Path, tmp_path: Path) -> RootKeeper:
    """A host that accepted root version 2."""
    keeper = keeper_for(repo, tmp_path / "state")
    await walk(keeper, repo, 2)
    assert keeper.version == 2
    return keeper


async def refused(keeper: RootKeeper, repo: Path, target: int, error: type[Exception],
                  match: str) -> None:
    """The walk fails with ``error`` and the accepted root stays version 2, byte for byte."""
    state = keeper.path.read_bytes()
    with pytest.raises(error, match=match):
        await walk(keeper, repo, target)
    assert keeper.version == 2 and keeper.path.read_bytes() == state
    assert keeper_for(repo, keeper.path.parent).version == 2


async def test_root_signed_only_by_new_keys(at_two: RootKeeper, repo: Path,
                                            keys: dict[str, Key]) -> None:
    """A root its own keys signed but the previous root keys did not is refused."""
    write_root(repo, 3, root_doc(3, [keys["E"]], [keys["F"]]), [keys["E"]])
    await refused(at_two, repo, 3, RootSignatureInvalid,
                  "root version 3 is not signed by a threshold of version 2's root keys")


async def test_root_signed_only_by_old_keys(at_two: RootKeeper, repo: Path,
                                            keys: dict[str, Key]) -> None:
    """A root the previous keys signed but its own keys did not is refused."""
    write_root(repo, 3, root_doc(3, [keys["E"]], [keys["F"]]), [keys["C"]])
    await refused(at_two, repo, 3, RootSignatureInvalid,
                  "root version 3 is not signed by a threshold of its own root keys")


async def test_root_version_rollback(at_two: RootKeeper, repo: Path) -> None:
    """An old root served as the next version is refused as a rollback."""
    for suffix in ("", ".sig"):
        roots.root_path(repo, 3).with_suffix(".json" + suffix).write_bytes(
            roots.root_path(repo, 2).with_suffix(".json" + suffix).read_bytes())
    await refused(at_two, repo, 3, RootVersionInvalid, "holds version 2 \\(a rollback\\)")


async def test_root_chain_with_a_missing_version(at_two: RootKeeper, repo: Path,
                                                 keys: dict[str, Key]) -> None:
    """A manifest naming version 4 while version 3 is missing is a gap: refused."""
    write_root(repo, 4, root_doc(4, [keys["E"]], [keys["F"]]), [keys["C"], keys["E"]])
    await refused(at_two, repo, 4, RootVersionInvalid, "root version 3 cannot be fetched")


async def test_root_chain_skipping_a_version(at_two: RootKeeper, repo: Path,
                                             keys: dict[str, Key]) -> None:
    """Version 4 served where version 3 belongs is a gap: refused."""
    write_root(repo, 3, root_doc(4, [keys["E"]], [keys["F"]]), [keys["C"], keys["E"]])
    await refused(at_two, repo, 4, RootVersionInvalid, "holds version 4 \\(a gap in the chain\\)")


async def test_root_with_threshold_zero(at_two: RootKeeper, repo: Path,
                                        keys: dict[str, Key]) -> None:
    """A threshold of 0 (anyone could sign the next root) is refused."""
    write_root(repo, 3, root_doc(3, [keys["E"]], [keys["F"]], threshold=0),
               [keys["C"], keys["E"]])
    await refused(at_two, repo, 3, RootInvalid, "root root.threshold: must be 1..1")


async def test_root_with_duplicated_keys(at_two: RootKeeper, repo: Path,
                                         keys: dict[str, Key]) -> None:
    """One key listed twice to fake a threshold of 2 is refused."""
    write_root(repo, 3, root_doc(3, [keys["E"], keys["E"]], [keys["F"]], threshold=2),
               [keys["C"], keys["E"]])
    await refused(at_two, repo, 3, RootInvalid, "root root.keys\\[1\\]: duplicate key")


async def test_expired_root(at_two: RootKeeper, repo: Path, keys: dict[str, Key]) -> None:
    """A validly signed newest root that has expired is refused."""
    write_root(repo, 3, root_doc(3, [keys["E"]], [keys["F"]], expires=NOW - timedelta(hours=1)),
               [keys["C"], keys["E"]])
    await refused(at_two, repo, 3, RootExpired, "root version 3 expired at")


async def test_manifest_signed_by_a_revoked_key(at_two: RootKeeper, keys: dict[str, Key]
                                                ) -> None:
    """After rotation, a manifest signed by root 1's updates key is refused as revoked."""
    manifest = Manifest("kiosk", "stable", 9, NOW + timedelta(days=1), {}, None, root_version=2)
    data = (json.dumps(manifest_to_json(manifest)) + "\n").encode()
    with pytest.raises(ManifestKeyRevoked, match=f"signed by revoked key\\(s\\) {_kid(keys['B'])}"):
        verify_manifest(data, sign_document(data, [keys["B"].private]), at_two.updates_trust(),
                        app="kiosk", channel="stable", min_serial=None, same_serial_sha256=None,
                        now=NOW)
    good = verify_manifest(data, sign_document(data, [keys["D"].private]),
                           at_two.updates_trust(), app="kiosk", channel="stable",
                           min_serial=None, same_serial_sha256=None, now=NOW)
    assert good.root_version == 2


def test_publisher_refuses_invalid_roots(repo: Path, keys: dict[str, Key]) -> None:
    """root create checks the host's rules: a threshold above the keys is refused."""
    with pytest.raises(UsageError, match=r"threshold: must be 1\.\.1"):
        roots.create(repo, root_keys=[], root_threshold=2, updates_keys=[],
                     updates_threshold=None, expires=timedelta(days=1), signers=[], now=NOW)


def test_sign_cmd_in_another_process_completes_a_root(repo: Path, keys: dict[str, Key],
                                                      tmp_path: Path) -> None:
    """An offline root key signs through --sign-cmd: a separate process holds the key."""
    patchd = [sys.executable, "-m", "patchd"]
    created = subprocess.run(
        [*patchd, "root", "create", "--repo", str(repo), "--root-key", keys["E"].public,
         "--updates-key", keys["F"].public, "--key", str(keys["C"].path)],
        capture_output=True, text=True, check=True)
    assert "signed by 1 of 1 needed keys of version 2, 0 of 1 of its own root keys; " \
           "incomplete" in created.stdout
    cmd = f"{sys.executable} {SIGN_CMD} {keys['E'].path}"
    signed = subprocess.run([*patchd, "root", "sign", "--repo", str(repo), "--sign-cmd", cmd],
                            capture_output=True, text=True, check=True)
    assert "1 of 1 of its own root keys; complete" in signed.stdout
    assert roots.newest_complete(repo) is not None
    assert roots.newest_complete(repo).version == 3  # type: ignore[union-attr]
    broken = subprocess.run([*patchd, "root", "sign", "--repo", str(repo), "--sign-cmd",
                             f"{sys.executable} {SIGN_CMD} {keys['E'].path} --bogus"],
                            capture_output=True, text=True)
    assert broken.returncode == 1 and "exit status 2" in broken.stderr


def test_config_root_file_and_keys_are_exclusive(repo: Path, tmp_path: Path) -> None:
    """trust.root_file pins a root; giving keys too, or a bad root file, is refused."""
    base = {"app": {"name": "kiosk", "release_dir": str(tmp_path)},
            "server": {"manifest_url": "/srv/manifest.json"}}
    pinned = str(roots.root_path(repo, 1))
    config = config_from_dict({**base, "trust": {"root_file": pinned}})
    assert config.trust.bootstrap.root.version == 1
    with pytest.raises(ConfigErrors, match=r"give trust\.keys or trust\.root_file, not both"):
        config_from_dict({**base, "trust": {"root_file": pinned, "keys": [ANY_KEY]}})
    bad = tmp_path / "bad-root.json"
    bad.write_text('{"format": "patchd-root/1"}')
    with pytest.raises(ConfigErrors, match=r"trust\.root_file: root version"):
        config_from_dict({**base, "trust": {"root_file": str(bad)}})
