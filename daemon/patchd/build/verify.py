"""Strict verification: is an installed tree still exactly what its bundle wrote?

Used before a boot when ``trust.verify = "strict"``: every file the bundle wrote is
hashed again, walking through directory fds without following links, so a file or
directory swapped for a symlink is caught even when the link's target has the right
bytes. :func:`tree_stamp` is the cheap half: what the file system says about those
files (no byte read), so a verification that passed can be kept until the tree changes
(``service/strict.py``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from patchd.build.clone import open_tree_dir

__all__ = ["SETTLE_NS", "TreeStamp", "tree_stamp", "verify_tree"]

#: A file whose status changed this recently (or later: a clock set back) may change again
#: within the same time stamp, unseen by a stamp: a verification of it is not kept.
#: Two seconds cover the coarsest time stamps Linux file systems keep (FAT's).
SETTLE_NS = 2_000_000_000

_CHUNK = 1 << 20


def verify_tree(tree: Path, files: Mapping[str, str],
                check_cancelled: Callable[[], None] | None = None) -> str | None:
    """Re-hash the files the bundle wrote; the first problem as text, or None when intact.

    Paths are walked without following links: a file or directory swapped for a
    symlink is a problem even when the link's target has the right bytes.
    ``check_cancelled`` is called between files and every 64 MiB (it raises to stop).
    """
    for rel, expected in sorted(files.items()):
        if check_cancelled is not None:
            check_cancelled()
        try:
            digest = _hash_in_tree(tree, rel, check_cancelled)
        except NotADirectoryError:
            return f"{rel}: a directory on its path is no longer a directory"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{rel} is no longer a regular file (a symlink)"
            return f"{rel}: {exc.strerror}"
        if digest is None:
            return f"{rel} is no longer a regular file"
        if digest != expected:
            return f"{rel} hashes to {digest}, expected {expected}"
    return None


def _hash_in_tree(tree: Path, rel: str,
                  check_cancelled: Callable[[], None] | None) -> str | None:
    parent, _, name = rel.rpartition("/")
    dfd = open_tree_dir(tree, parent)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        digest = hashlib.sha256()
        chunks = 0
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            chunks += 1
            if check_cancelled is not None and chunks % 64 == 0:
                check_cancelled()
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class TreeStamp:
    """A digest of what the file system says about the listed files of a tree."""

    #: Changes when any listed file's inode, type, mode, size, mtime or ctime changes.
    digest: bytes
    #: No listed file's ctime lies within :data:`SETTLE_NS` of the stamp (or after it).
    settled: bool


def tree_stamp(tree: Path, files: Iterable[str]) -> TreeStamp | None:
    """The stamp of ``files`` under ``tree``, reached like :func:`verify_tree` (no link
    followed); None when one of them is not a regular file reached that way (only a
    full verification can then say what is wrong). No file's bytes are read.

    Writing, truncating or renaming over a file, a chmod, a chown or a new hard link all
    change the file's inode or its ctime, and only the clock sets a ctime: a tree whose
    stamp is unchanged has the bytes it had. Bytes that change on the medium itself,
    under the file system, change no stamp. A ctime within :data:`SETTLE_NS` of now
    leaves the stamp unsettled: a second change within that same time stamp would not
    show.
    """
    start = time.time_ns()
    by_parent: dict[str, list[str]] = {}
    for rel in files:
        parent, _, name = rel.rpartition("/")
        by_parent.setdefault(parent, []).append(name)
    digest = hashlib.sha256()
    settled = True
    try:
        for parent in sorted(by_parent):
            dfd = open_tree_dir(tree, parent)
            try:
                for name in sorted(by_parent[parent]):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        return None
                    digest.update(f"{parent}/{name}\0{st.st_dev} {st.st_ino} {st.st_mode} "
                                  f"{st.st_uid} {st.st_gid} {st.st_size} {st.st_mtime_ns} "
                                  f"{st.st_ctime_ns}\0".encode("utf-8", "surrogatepass"))
                    if st.st_ctime_ns > start - SETTLE_NS:
                        settled = False
            finally:
                os.close(dfd)
    except (OSError, ValueError):  # gone, a link on the way, a name the OS cannot take
        return None
    return TreeStamp(digest.digest(), settled)
