"""Signed but pathological bundles, odd state directories and VERSION files, on the real
daemon (issue #15, items 8 and 10).

A publisher's key vouches for a bundle's bytes, not for its sanity: a tree 1,500
directories deep, a name that is no Unicode, a sparse tar member or 100,000 empty
directories must cost a refusal, never a crash loop, a full file system or a daemon that
will not start. Nor may anything found in the state directory or in ``release_dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from patchd.core.fsio import remove_tree
from support.attacks import bundle_bytes, file_op, header_doc, signed_members
from support.daemon import DaemonProcess, state_of
from support.hostile import RELEASE, HostileRepo, hostile_world, log_events, start_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
DEPTH = 1500


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    """A repository on the misbehaving server; afterwards the test's directory goes by
    patchd's own iterative removal (pytest's rmtree recurses, and a test that fails
    before the daemon removed its deep trees must not break every later session's
    clean-up of old temp directories)."""
    yield from hostile_world(tmp_path)
    while STARTED:
        STARTED.pop().close()
    for child in tmp_path.iterdir():
        with contextlib.suppress(OSError):
            remove_tree(child)


STARTED: list[DaemonProcess] = []


def daemon(tmp: Path, repo: HostileRepo, start: bool = True) -> DaemonProcess:
    """A real daemon trusting ``repo`` (killed after the test if still running)."""
    d = start_daemon(tmp, repo, start=False)
    STARTED.append(d)
    if start:
        d.start()
    return d


@contextlib.contextmanager
def tmpfs(options: str) -> Iterator[Path]:
    """A tmpfs mounted with ``options``, unmounted afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="pd-tmpfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        os.rmdir(mnt)


def deep_chain(root: Path, depth: int = DEPTH) -> None:
    """``root/d/d/…/d/leaf``, ``depth`` directories below ``root`` (made through fds: the
    path is longer than the kernel resolves in one go)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.chmod("leaf", 0o400, dir_fd=fd)
        os.fchmod(fd, 0o500)  # read-only at the bottom, as a bundle may leave it
    finally:
        os.close(fd)


def publish_ops(repo: HostileRepo, patch: int, ops: list[dict[str, Any]],
                payloads: list[bytes], mutate: Callable[[list[Any]], None] = lambda m: None
                ) -> bytes:
    """Sign a bundle of ``ops`` for ``patch``, serve it and publish it alone."""
    doc = header_doc(ops, release=RELEASE, patch=patch)
    members = signed_members(doc, [repo.key], payloads)
    mutate(members)
    data = bundle_bytes(repo.tmp / f"craft-{patch}", members)
    repo.files[f"/b/{patch}.patchd"] = data
    repo.publish([(patch, [repo.ref(f"/b/{patch}.patchd", data)])])
    return data


def tombstone(d: DaemonProcess, patch: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (d.state_dir / "builds" / RELEASE / str(patch) / "state.json").read_text())
    return doc


def error_lines(d: DaemonProcess, *expected: str) -> list[dict[str, Any]]:
    """Error-level lines but the refusals expected (by error class): a crash, an
    internal error or an unexpected refusal is one."""
    return [e for e in log_events(d) if e.get("level") in ("error", "critical")
            and e.get("error_class") not in expected]


# --- 8a: deep trees -------------------------------------------------------------------


def test_a_1500_deep_tree_is_removed_when_superseded_and_the_daemon_starts_again(
        tmp_path: Path, repo: HostileRepo) -> None:
    """An installed tree 1,500 directories deep (what a bundle could make before the depth
    limit) is removed when a newer patch supersedes it, and a deep tree left without
    state is swept at start: the daemon restarts every time."""
    publish_ops(repo, 1, [file_op("lib/p1.txt", b"one\n", 0)], [b"one\n"])
    d = daemon(tmp_path, repo)
    d.call("CheckNow")
    d.wait_status(lambda s: s["next_boot"] == {"release": RELEASE, "patch": 1}, "patch 1")
    deep_chain(d.state_dir / "builds" / RELEASE / "1" / "tree" / "deep")

    publish_ops(repo, 2, [file_op("lib/p2.txt", b"two\n", 0)], [b"two\n"])
    d.call("CheckNow")
    status = d.wait_status(lambda s: s["next_boot"] == {"release": RELEASE, "patch": 2},
                           "patch 2 supersedes patch 1")
    assert state_of(status, RELEASE, 1) is None
    assert not (d.state_dir / "builds" / RELEASE / "1").exists()
    assert d.stop() == 0

    # What the crash loop started from: a deep tree whose state was already gone.
    deep_chain(d.state_dir / "builds" / RELEASE / "3" / "tree" / "deep")
    d.start()
    assert not (d.state_dir / "builds" / RELEASE / "3").exists()
    assert d.status()["next_boot"] == {"release": RELEASE, "patch": 2}
    assert error_lines(d) == []
    assert d.stop() == 0


# --- 8a, 8b, 8c: refused at read time -------------------------------------------------


def _deep_ops() -> tuple[list[dict[str, Any]], list[bytes]]:
    return [{"op": "dir", "path": "/".join(["d"] * n), "mode": 0o755}
            for n in range(1, DEPTH + 1)], []


def _surrogate_ops() -> tuple[list[dict[str, Any]], list[bytes]]:
    return [file_op("lib/bad-\udcff.txt", b"x\n", 0)], [b"x\n"]


def _sparse_member(members: list[Any]) -> None:
    info, data = members[2]
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": info.name, "GNU.sparse.realsize": str(len(data))}


PATHOLOGICAL: dict[str, tuple[Callable[[], tuple[list[dict[str, Any]], list[bytes]]],
                              Callable[[list[Any]], None], str, str]] = {
    "1500-deep-dirs": (_deep_ops, lambda m: None, "UnsafePath", "path deeper than 256 parts"),
    "lone-surrogate": (_surrogate_ops, lambda m: None, "UnsafePath", "is not valid Unicode"),
    "gnu-sparse-member": (lambda: ([file_op("lib/s.txt", b"sparse\n", 0)], [b"sparse\n"]),
                          _sparse_member, "BundleInvalid", "is a GNU sparse file"),
}


@pytest.mark.parametrize("case", sorted(PATHOLOGICAL))
def test_a_pathological_signed_bundle_is_refused_at_read_time(
        tmp_path: Path, repo: HostileRepo, case: str) -> None:
    """A signed bundle making a 1,500-deep tree, naming a lone surrogate or holding a GNU
    sparse member is tombstoned ``invalid_bundle`` before any op is applied; the daemon
    keeps serving, restarts, and installs the next good patch."""
    make_ops, mutate, error_class, message = PATHOLOGICAL[case]
    ops, payloads = make_ops()
    d = daemon(tmp_path, repo)
    data = publish_ops(repo, 1, ops, payloads, mutate)
    d.call("CheckNow")
    d.wait_status(lambda s: state_of(s, RELEASE, 1) == "bad", "patch 1 tombstoned")
    tomb = tombstone(d, 1)
    assert tomb["reason"] == "invalid_bundle", tomb
    assert message in tomb["detail"], tomb
    assert len(tomb["sha256"]) == 64 and len(data) > 0
    assert not (d.state_dir / "builds" / RELEASE / "1" / "tree").exists()
    assert not (d.state_dir / "builds" / RELEASE / "1" / ".staging-tree").exists()
    assert error_lines(d, error_class) == []
    assert d.stop() == 0
    d.start()
    publish_ops(repo, 2, [file_op("lib/p2.txt", b"two\n", 0)], [b"two\n"])
    d.call("CheckNow")
    d.wait_status(lambda s: s["next_boot"] == {"release": RELEASE, "patch": 2},
                  "the next good patch installs")
    assert d.stop() == 0


# --- 8d: inodes -----------------------------------------------------------------------


@needs_root
def test_100000_empty_dirs_are_refused_by_the_space_check_on_a_tmpfs_with_few_inodes(
        tmp_path: Path, repo: HostileRepo) -> None:
    """A bundle of 100,000 empty directories, on a state file system with 3,000 inodes
    and plenty of bytes, fails the space check (DiskFull, transient) before anything is
    written, and leaves the inodes free."""
    with tmpfs("size=2g,nr_inodes=3000") as mnt:
        d = daemon(tmp_path, repo, start=False)
        d.state_dir, d.cache_dir = mnt / "state", mnt / "cache"
        d.write_config(repo.url("/manifest.json"), [repo.public],
                       '[server]\ntimeout = "5s"\n[install]\nmin_free = "0"\n')
        d.start()
        free_before = os.statvfs(mnt).f_favail
        ops = [{"op": "dir", "path": "e", "mode": 0o755}]
        ops += [{"op": "dir", "path": f"e/{i:05d}", "mode": 0o755} for i in range(100_000)]
        publish_ops(repo, 1, ops, [])
        d.call("CheckNow")
        status = d.wait_status(lambda s: s["last_error"] is not None, "the install fails",
                               timeout=60)
        assert "DiskFull" in status["last_error"], status
        assert "inodes free" in status["last_error"], status
        assert state_of(status, RELEASE, 1) == "downloaded", status
        assert not (d.state_dir / "builds" / RELEASE / "1" / ".staging-tree").exists()
        assert os.statvfs(mnt).f_favail >= free_before - 8  # the download and its state
        assert not [e for e in log_events(d) if e.get("event") == "install.cloned"]
        assert error_lines(d, "DiskFull") == []
        assert d.status()["activity"]["phase"] == "idle"
        assert d.stop() == 0


# --- 8e: start-up repair over any layout ---------------------------------------------


def _odd_state_dir(state: Path, cache: Path, mount_at: Path) -> None:
    """Every odd thing start-up repair may meet, all at once."""
    builds = state / "builds" / RELEASE
    deep_chain(builds / "3" / "tree")                         # no state, 1,500 deep
    (builds / "4" / "tree").mkdir(parents=True)
    os.mkfifo(builds / "4" / "state.json")                    # a read would hang
    deep_chain(builds / "5" / "state.json")                   # a deep directory
    (builds / "6").mkdir()
    os.symlink("/dev/zero", builds / "6" / "state.json")      # endless
    (builds / "7").mkdir()
    (builds / "7" / "state.json").write_text("[" * 200_000)  # RecursionError in json
    os.mkdir(bytes(state / "builds") + b"/\xff\xfe")          # undecodable names
    (builds / "8").mkdir()
    (Path(os.fsdecode(bytes(builds / "8") + b"/tree-\xff"))).write_text("x")
    (cache / "downloads").mkdir(parents=True)
    Path(os.fsdecode(bytes(cache / "downloads") + b"/\xff.patchd")).write_text("x")
    os.mkfifo(state / "current")                              # not a link
    (state / "pointers.json").mkdir()                         # a directory
    (state / ".lock").mkdir()
    os.mkfifo(state / "client.json")
    os.symlink("/dev/zero", state / "events.json")
    mount_at.mkdir(parents=True)                              # cannot be removed


@needs_root
def test_start_up_repair_survives_any_layout_of_the_state_directory(
        tmp_path: Path, repo: HostileRepo) -> None:
    """Deep trees, undecodable names, a state.json that is a FIFO, a directory, a link to
    /dev/zero or 200,000 ``[``, odd top-level files and a mount point: the daemon starts,
    repairs or sets aside each (warnings, no error), and starts again cleanly."""
    d = daemon(tmp_path, repo, start=False)
    mount_at = d.state_dir / "builds" / RELEASE / "9" / "tree" / "mnt"
    _odd_state_dir(d.state_dir, d.cache_dir, mount_at)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_at)],
                   check=True)
    try:
        (mount_at / "not-ours").write_text("keep me\n")
        d.start()
        status = d.status()
        assert status["next_boot"] == {"release": RELEASE, "patch": 0}
        assert status["builds"] == [], status
        d.wait_log('"trash.emptied"')  # what repair dropped is deleted after READY
        assert os.listdir(d.state_dir / "builds") == []
        assert os.listdir(d.cache_dir / "downloads") == []
        assert (d.state_dir / "current").is_symlink()
        aside = {e["path"]: e for e in log_events(d, "lifecycle.set_aside")}
        assert str(d.state_dir / "pointers.json") in aside, aside
        assert str(d.state_dir / ".lock") in aside, aside
        assert str(d.state_dir / "builds" / RELEASE / "9" / "tree") in aside, aside
        assert all(e["level"] == "warning" for e in aside.values())
        kept = list((d.state_dir / "set-aside").glob("builds_*_9_tree.*/mnt/not-ours"))
        assert [p.read_text() for p in kept] == ["keep me\n"]
        assert error_lines(d) == []
        assert d.stop() == 0
        d.start()
        assert d.status()["next_boot"] == {"release": RELEASE, "patch": 0}
        assert len(log_events(d, "lifecycle.set_aside")) == len(aside)  # nothing new
        assert error_lines(d) == []
        assert d.stop() == 0
    finally:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            where = line.split()[1]
            if where.startswith(str(tmp_path)):
                subprocess.run(["umount", "-l", where], check=False)


# --- 10: the release's VERSION file ----------------------------------------------------


def _dev_zero(path: Path) -> None:
    os.symlink("/dev/zero", path)


VERSIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "dev-zero": (lambda p: subprocess.run(["mknod", str(p), "c", "1", "5"], check=True),
                 "a device, not a regular file"),
    "fifo": (os.mkfifo, "a FIFO, not a regular file"),
    "link-to-dev-zero": (_dev_zero, "a device, not a regular file"),
    "directory": (os.mkdir, "a directory, not a regular file"),
}


@needs_root
@pytest.mark.parametrize("kind", sorted(VERSIONS))
def test_a_version_file_that_is_no_regular_file_is_a_config_error_at_once(
        tmp_path: Path, repo: HostileRepo, kind: str) -> None:
    """``release_dir/VERSION`` as /dev/zero, a FIFO, a link to /dev/zero, a directory or
    the daemon exits 2 within seconds with one line naming the file
    (its memory capped at 2 GiB, so the old unbounded read fails fast too)."""
    make, message = VERSIONS[kind]
    d = daemon(tmp_path, repo, start=False)
    version = d.release_dir / "VERSION"
    version.unlink()
    make(version)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "patchd", "run", "--config", str(d.config_path)],
        capture_output=True, text=True, timeout=20, env=env, preexec_fn=cap_memory,
        check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("patchd: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert str(version) in lines[0] and message in lines[0], lines
