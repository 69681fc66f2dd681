"""Making new directories and whole trees durable with the fewest fsyncs a power cut allows.

After a power cut a file system keeps a directory entry (a create, mkdir, link, rename
or unlink) only once that directory was fsynced, and a file's bytes only once the file
was. ``mkdir -p`` fsyncs nothing, so a state file written into a directory that was just
created can vanish with its directory even though the file itself was fsynced; and a
tree built in a staging directory can appear, after its rename, with empty files or
missing entries. ``syncfs(2)`` would cover the tree, but it never reaches FUSE or
network file systems and it waits on the whole file system's dirty data, the app's
included: the power-cut campaign (tests/e2e/test_powercut.py) proves what is here.
"""

from __future__ import annotations

import os
from pathlib import Path

from patchd.core.fsio import DIR_FLAGS, fsync_dir, walk_dirs

__all__ = ["make_dirs", "sync_dirs"]


def make_dirs(path: Path, mode: int = 0o777) -> None:
    """``mkdir -p`` whose new directories survive a power cut.

    Each directory created is made durable by an fsync of its parent, top down, so the
    parent of a new one is already durable when it is. Nothing is fsynced when ``path``
    already exists: the cost is paid once, when a build's directory first appears.
    """
    missing: list[Path] = []
    here = path
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode)
        except FileExistsError:
            if not new.is_dir():
                raise
        fsync_dir(new.parent)


def sync_dirs(root: Path) -> int:
    """fsync every directory of the tree at ``root`` (``root`` included); the count.

    For a tree made in a staging directory: every directory there is new, so every one
    holds entries (names, links, renames) that only its own fsync makes durable. Files
    written into the tree are fsynced by their writer; hard-linked clones need no fsync
    (their bytes are the base's, durable already). Links are never followed.
    """
    count = 0

    def sync(fd: int) -> list[str]:
        nonlocal count
        with os.scandir(fd) as entries:
            subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        os.fsync(fd)
        count += 1
        return subdirs

    fd = os.open(root, DIR_FLAGS)
    try:
        walk_dirs(fd, sync)  # iterative, two descriptors at most, however wide or deep
    finally:
        os.close(fd)
    return count
