"""The publisher refuses what hosts would refuse later (issue #16, item 6), and ``publish``
takes its defaults from ``REPO/patchd-publish.toml`` (docs/publishing.md)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.core.errors import UsageError
from patchd.publisher import roots
from patchd.publisher.publish import keygen, pack_command, publish, roll_back
from patchd.trust.signing import load_private_key
from support.cli import run_patchd
from support.trees import write_tree

DAY = timedelta(days=1)


@pytest.fixture
def w(tmp_path: Path) -> Path:
    """A release 1.0 tree, a patch target, a 2.0 tree, a key and no repository yet."""
    write_tree(tmp_path / "base", {"app": ("file", b"v1", 0o755),
                                   "VERSION": ("file", b"1.0\n", 0o644)})
    write_tree(tmp_path / "target", {"app": ("file", b"v2", 0o755),
                                     "VERSION": ("file", b"1.0\n", 0o644)})
    write_tree(tmp_path / "two", {"app": ("file", b"v3", 0o755),
                                  "VERSION": ("file", b"2.0\n", 0o644)})
    (tmp_path / "keys").mkdir()
    (tmp_path / "pub").write_text(keygen(tmp_path / "keys" / "k.pem"))
    return tmp_path


def pack(w: Path, *, app: str = "kiosk", release: str = "1.0", patch: int | None = 1,
         base: str | None = "base", target: str = "target", arch: str = "any",
         key: Path | None = None, out: str = "b.patchd") -> Path:
    pack_command(app=app, release=release, patch=patch, full=patch is None,
                 base=w / base if base else None, target=w / target,
                 keys=[key or w / "keys" / "k.pem"], arch=arch, out=w / out)
    return w / out


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed command with exit code ``code``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- pack ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [
    ({"app": "Kiosk"}, "--app 'Kiosk' is not a valid app name"),
    ({"app": "kiosk/x"}, "not a valid app name"),
    ({"arch": "x86 64"}, "--arch 'x86 64' is not a valid arch"),
    ({"release": "2.0"}, "--base .*base: its VERSION says '1.0', not --release '2.0'"),
    ({"release": "2.0", "patch": None, "base": None},
     "--target .*target: its VERSION says '1.0', not --release '2.0'"),
    ({"target": "two"}, "--target .*two: its VERSION says '2.0', not --release '1.0'"),
])
def test_pack_refuses_what_hosts_refuse(w: Path, kw: dict[str, object], message: str) -> None:
    """A name a host's config refuses, or a tree whose VERSION is another release, is a
    usage error before anything is written."""
    with pytest.raises(UsageError, match=message):
        pack(w, **kw)  # type: ignore[arg-type]
    assert not (w / "b.patchd").exists()


@pytest.mark.parametrize("problem", ["missing", "empty", "invalid", "symlink", "directory"])
def test_pack_needs_a_version_file_naming_the_release(w: Path, problem: str) -> None:
    """A base without a usable VERSION (the host would not start on it) is refused."""
    version = w / "base" / "VERSION"
    version.unlink()
    if problem == "empty":
        version.write_text("\n")
    elif problem == "invalid":
        version.write_text("../1.0\n")
    elif problem == "symlink":
        version.symlink_to(w / "target" / "VERSION")
    elif problem == "directory":
        version.mkdir()
    with pytest.raises(UsageError, match="VERSION") as err:
        pack(w)
    assert str(w / "base") in str(err.value)


def test_pack_cli_release_mismatch_is_one_line(w: Path) -> None:
    """Through the real command line: one line naming both versions, exit 2."""
    proc = run_patchd("pack", "--app", "kiosk", "--release", "2.0", "--patch", "1",
                      "--base", str(w / "base"), "--target", str(w / "target"),
                      "--key", str(w / "keys" / "k.pem"), "-o", str(w / "b.patchd"))
    line = one_line(proc, 2)
    assert line == (f"patchd: --base {w / 'base'}: its VERSION says '1.0', not --release "
                    "'2.0'")


def test_pack_summary_counts_in_plural(w: Path) -> None:
    """The summary says "1 file", "2 files", never "2 file"."""
    write_tree(w / "t2", {"app": ("file", b"v2", 0o755), "x": ("file", b"x", 0o644),
                          "VERSION": ("file", b"1.0\n", 0o644)})
    out = run_patchd("pack", "--app", "kiosk", "--release", "1.0", "--patch", "1",
                     "--base", str(w / "base"), "--target", str(w / "t2"), "--key",
                     str(w / "keys" / "k.pem"), "-o", str(w / "b.patchd"), check=True).stdout
    assert "; 2 files; unpacked 3 bytes" in out, out
    out = run_patchd("pack", "--app", "kiosk", "--release", "1.0", "--patch", "1",
                     "--base", str(w / "base"), "--target", str(w / "target"), "--key",
                     str(w / "keys" / "k.pem"), "-o", str(w / "b.patchd"), check=True).stdout
    assert "; 1 file; unpacked 2 bytes" in out, out


# --- publish ---------------------------------------------------------------------------


@pytest.mark.parametrize(("app", "channel", "message"), [
    ("Kiosk", "stable", "--app 'Kiosk' is not a valid app name"),
    ("kiosk", "Beta", "--channel 'Beta' is not a valid channel name"),
])
def test_publish_refuses_names_configs_refuse(w: Path, app: str, channel: str,
                                              message: str) -> None:
    """An app or channel no host config can name is refused, and nothing is written."""
    b = pack(w)
    with pytest.raises(UsageError, match=message):
        publish(w / "repo", app, channel, [w / "keys" / "k.pem"], [b], None, DAY)
    with pytest.raises(UsageError, match=message):
        roll_back(w / "repo", app, channel, [w / "keys" / "k.pem"], "1.0", 1, DAY)
    assert not (w / "repo").exists()


def test_publish_refuses_a_bundle_of_another_app(w: Path) -> None:
    """A bundle whose header names another app than the repository's is refused."""
    key = w / "keys" / "k.pem"
    publish(w / "repo", "kiosk", "stable", [key], [pack(w)], None, DAY)
    other = pack(w, app="signage", out="other.patchd")
    with pytest.raises(UsageError, match="is a bundle for app 'signage'; this repository is "
                       "for app 'kiosk'"):
        publish(w / "repo", "kiosk", "stable", [key], [other], None, DAY)
    manifest = json.loads((w / "repo" / "manifest.json").read_text())
    assert manifest["serial"] == 1


def test_publish_refuses_a_bundle_the_root_does_not_trust(w: Path) -> None:
    """With a root of trust in the repository, a bundle signed by a key outside its
    updates role is refused at publish (every host would refuse it at install)."""
    key, pub = w / "keys" / "k.pem", (w / "pub").read_text()
    stranger = w / "keys" / "stranger.pem"
    keygen(stranger)
    repo = w / "repo"
    roots.create(repo, root_keys=[pub], root_threshold=None, updates_keys=[pub],
                 updates_threshold=None, expires=timedelta(days=365),
                 signers=[load_private_key(key)], now=datetime.now(UTC))
    bad = pack(w, key=stranger, out="stranger.patchd")
    with pytest.raises(UsageError, match="hosts would refuse this bundle: its header is not "
                       "signed for root version 1's updates role"):
        publish(repo, "kiosk", "stable", [key], [bad], None, DAY)
    assert not (repo / "manifest.json").exists() and not (repo / "1.0").exists()
    publish(repo, "kiosk", "stable", [key], [pack(w)], None, DAY)


def test_publish_refuses_two_bundles_for_one_slot(w: Path) -> None:
    """Two bundles for the same release, patch and arch in one call: one would be lost."""
    a, b = pack(w, out="a.patchd"), pack(w, out="b.patchd")
    with pytest.raises(UsageError, match=r"are both 1\.0\+1 for arch any"):
        publish(w / "repo", "kiosk", "stable", [w / "keys" / "k.pem"], [a, b], None, DAY)


def test_private_key_inside_the_repository_is_refused(w: Path) -> None:
    """The repository directory is served: a key in it (even through a symlink) is
    refused for publish, roll-back and root commands."""
    repo = w / "repo"
    publish(repo, "kiosk", "stable", [w / "keys" / "k.pem"], [pack(w)], None, DAY)
    inside = repo / "k.pem"
    inside.write_bytes((w / "keys" / "k.pem").read_bytes())
    via_link = w / "link.pem"
    via_link.symlink_to(inside)
    for key in (inside, via_link):
        with pytest.raises(UsageError, match="is inside the repository"):
            publish(repo, "kiosk", "stable", [key], [], None, DAY)
        with pytest.raises(UsageError, match="is inside the repository"):
            roll_back(repo, "kiosk", "stable", [key], "1.0", 1, DAY)
    line = one_line(run_patchd("root", "sign", "--repo", str(repo), "--key", str(inside)), 2)
    assert "is inside the repository" in line


def test_publish_cli_plural_and_expiry(w: Path) -> None:
    """"published 1 bundle", "2 bundles"; an --expires of 0 (an expired manifest) is refused."""
    key = str(w / "keys" / "k.pem")
    repo = str(w / "repo")
    base = ["publish", "--repo", repo, "--app", "kiosk", "--channel", "stable", "--key", key]
    out = run_patchd(*base, str(pack(w)), check=True).stdout
    assert out.startswith(f"{repo}: published 1 bundle; serial 1,"), out
    two = [str(pack(w, arch="x86_64", out="x.patchd")), str(pack(w, patch=2, out="y.patchd"))]
    out = run_patchd(*base, *two, check=True).stdout
    assert out.startswith(f"{repo}: published 2 bundles; serial 2,"), out
    line = one_line(run_patchd(*base, "--expires", "0"), 2)
    assert line == "patchd: --expires must be more than 0: hosts refuse an expired manifest"


# --- REPO/patchd-publish.toml ----------------------------------------------------------


def write_defaults(repo: Path, text: str) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    path = repo / "patchd-publish.toml"
    path.write_text(text)
    return path


def manifest(repo: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((repo / "manifest.json").read_text())
    return doc


def test_defaults_file_gives_app_channel_key_expires_rollout(
        w: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the file, ``publish --repo DIR BUNDLE`` is enough; the key path is relative to
    the file; its rollout is the rollout of new patches; expires applies."""
    repo = w / "srv" / "kiosk" / "stable"
    write_defaults(repo, 'app = "kiosk"\nchannel = "stable"\nkey = "../../../keys/k.pem"\n'
                         'expires = "2d"\nrollout = 10\n')
    monkeypatch.chdir("/")  # the key is found relative to the file, not the working directory
    out = run_patchd("publish", "--repo", str(repo), str(pack(w)), check=True).stdout
    assert "published 1 bundle; serial 1" in out
    doc = manifest(repo)
    assert (doc["app"], doc["channel"]) == ("kiosk", "stable")
    expires = datetime.fromisoformat(str(doc["expires"]))
    assert timedelta(days=1) < expires - datetime.now(UTC) <= timedelta(days=2)
    releases = doc["releases"]
    assert isinstance(releases, list)
    assert releases[0]["patches"][0]["rollout"] == 10
    # an existing patch keeps its percentage; --rollout overrides the file
    run_patchd("publish", "--repo", str(repo), str(pack(w, arch="x86_64", out="x.patchd")),
               check=True)
    run_patchd("publish", "--repo", str(repo), "--rollout", "50",
               str(pack(w, patch=2, out="p2.patchd")), check=True)
    patches = manifest(repo)["releases"][0]["patches"]  # type: ignore[index]
    assert [(p["patch"], p["rollout"]) for p in patches] == [(1, 10), (2, 50)]


def test_command_line_overrides_the_defaults_file(w: Path) -> None:
    """Options given on the command line win over the file's values."""
    repo = w / "repo"
    write_defaults(repo, 'app = "other"\nchannel = "beta"\nkey = "/nonexistent.pem"\n')
    run_patchd("publish", "--repo", str(repo), "--app", "kiosk", "--channel", "stable",
               "--key", str(w / "keys" / "k.pem"), "--expires", "3h", str(pack(w)),
               check=True)
    doc = manifest(repo)
    assert (doc["app"], doc["channel"]) == ("kiosk", "stable")
    expires = datetime.fromisoformat(str(doc["expires"]))
    assert expires - datetime.now(UTC) <= timedelta(hours=3)


@pytest.mark.parametrize(("text", "args", "message"), [
    ("", ["--channel", "stable", "--key", "K"],
     "no app given: pass --app APP or set app in {file}"),
    ('app = "kiosk"\n', ["--key", "K"],
     "no channel given: pass --channel CHANNEL or set channel in {file}"),
    ('app = "kiosk"\nchannel = "stable"\n', [],
     "no signing key given: pass --key KEYFILE or --sign-cmd CMD, or set key or sign_cmd "
     "in {file}"),
    ('app = "kiosk"\nchannel = "stable"\nkey = "k.pem"\n', [],
     "the private key {repo}/k.pem is inside the repository {repo}, which is served to "
     "hosts; move it out of that directory"),
    ('app = "Kiosk"\n', ["--channel", "stable", "--key", "K"],
     "{file}: app 'Kiosk' is not a valid app name"),
    ('app = "kiosk"\nchanel = "stable"\n', [],
     "{file}: unknown key chanel (known: app, channel, key, sign_cmd, expires, rollout, "
     "keep_releases)"),
    ("rollout = 101\n", [], "{file}: rollout must be a whole number from 0 to 100"),
    ('key = 3\n', [], "{file}: key must be a string or a list of strings"),
    ('expires = "soon"\n', ["--app", "kiosk", "--channel", "stable", "--key", "K"],
     "{file}: expires: expected a duration"),
    ("app = [\n", [], "{file} is not valid TOML"),
])
def test_defaults_file_errors_name_the_way_out(w: Path, text: str, args: list[str],
                                               message: str) -> None:
    """A missing value names both the option and the file's key; a wrong file names the
    file and the key; each is one line and exit 2."""
    repo = w / "repo"
    file = write_defaults(repo, text)
    args = [str(w / "keys" / "k.pem") if a == "K" else a for a in args]
    line = one_line(run_patchd("publish", "--repo", str(repo), *args, str(pack(w))), 2)
    assert line.startswith("patchd: " + message.format(file=file, repo=repo)), line
    assert not (repo / "manifest.json").exists()


def test_pack_refuses_a_tree_deeper_than_hosts_accept(tmp_path: Path) -> None:
    """A target 300 directories deep packs nothing: every host would refuse the bundle
    (MAX_PATH_DEPTH), and the old recursive walk could not even reach its bottom."""
    from patchd.core.errors import PackError
    from patchd.core.fsio import MAX_PATH_DEPTH
    from patchd.publisher.pack import scan_tree

    deep = tmp_path / "t"
    deep.mkdir()
    os.makedirs(deep.joinpath(*["d"] * (MAX_PATH_DEPTH + 44)))
    with pytest.raises(PackError, match=f"deeper than {MAX_PATH_DEPTH} parts.*hosts refuse"):
        scan_tree(deep)
