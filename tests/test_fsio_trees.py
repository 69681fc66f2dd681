"""Tree walks of ``core.fsio``: iterative, bounded in descriptors, never leaving the tree.

Every tree patchd removes or syncs goes through ``walk_dirs``; these tests hold it to
its promises on trees far deeper and wider than any bundle may make (issue #15, item 8).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.core.durable import sync_dirs
from patchd.core.fsio import remove_tree

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one (thousands of fsyncs on a disk take long),
    removed afterwards by the iterative removal (pytest's own would recurse)."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = Path(tempfile.mkdtemp(prefix="pd-trees-", dir=where))
    yield path
    with contextlib.suppress(OSError):
        remove_tree(path)


def chain(root: Path, depth: int) -> None:
    """``root/d/d/…`` ``depth`` deep, with a file at every level."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_tree_deeper_than_the_recursion_limit_is_removed_and_synced(fast_tmp: Path) -> None:
    """A 3,000-deep chain (three times Python's recursion limit) is synced and removed."""
    chain(fast_tmp / "t", 3000)
    assert sync_dirs(fast_tmp / "t") == 3001
    remove_tree(fast_tmp / "t")
    assert os.listdir(fast_tmp) == []


def test_a_wide_tree_is_walked_with_two_descriptors(fast_tmp: Path) -> None:
    """5,000 sibling directories cost no more descriptors than one (the old sync held one
    per pending directory)."""
    root = fast_tmp / "t"
    root.mkdir()
    for i in range(5000):
        (root / f"{i:04d}").mkdir()
    before = open_fds()
    peak = [0]
    real_open = os.open

    def counting_open(*args: object, **kwargs: object) -> int:
        fd = real_open(*args, **kwargs)  # type: ignore[arg-type]
        peak[0] = max(peak[0], open_fds() - before)
        return fd

    os.open = counting_open  # type: ignore[assignment]
    try:
        assert sync_dirs(root) == 5001
    finally:
        os.open = real_open
    assert peak[0] <= 3, peak
    remove_tree(root)
    assert os.listdir(fast_tmp) == []


@pytest.mark.skipif(not IS_ROOT, reason="switching to nobody needs root")
def test_an_unprivileged_owner_removes_its_read_only_and_locked_directories() -> None:
    """Directories of mode 000, 100, 500 and 600 owned by the remover (a daemon with
    User=patchd) are made owner-rwx as needed and go."""
    work = Path(tempfile.mkdtemp(dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    tree = work / "t"
    try:
        (tree / "a" / "b" / "c").mkdir(parents=True)
        (tree / "a" / "b" / "c" / "f").write_text("x")
        (tree / "z" / "y").mkdir(parents=True)
        (tree / "z" / "y" / "h").write_text("h")
        for path in [work, *work.rglob("*")]:
            os.lchown(path, nobody.pw_uid, nobody.pw_gid)
        for rel, mode in [("a/b/c", 0o500), ("a/b", 0o000), ("z/y", 0o100), ("z", 0o600),
                          ("", 0o500)]:
            os.chmod(tree / rel, mode)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                remove_tree(tree)
                code = 0 if not tree.exists() else 2
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert os.listdir(work) == []
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.skipif(not IS_ROOT or sys.platform != "linux", reason="mounting needs root")
def test_removal_never_enters_another_file_system(tmp_path: Path) -> None:
    """A file system mounted inside a tree is left whole: the removal fails on its mount
    point (start-up repair then sets the tree aside) instead of emptying it."""
    mnt = tmp_path / "t" / "x" / "mnt"
    mnt.mkdir(parents=True)
    (tmp_path / "t" / "x" / "mine").write_text("go")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "not-ours").write_text("keep me\n")
        with pytest.raises(OSError):
            remove_tree(tmp_path / "t")
        assert (mnt / "not-ours").read_text() == "keep me\n"
        assert not (tmp_path / "t" / "x" / "mine").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    remove_tree(tmp_path / "t")
