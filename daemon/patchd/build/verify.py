"""Strict verification: is an installed tree still exactly what its bundle wrote?

Used before a boot when ``trust.verify = "strict"``: every file the bundle wrote is
hashed again, walking through directory fds without following links, so a file or
directory swapped for a symlink is caught even when the link's target has the right
bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from patchd.build.clone import open_tree_dir


def verify_tree(tree: Path, files: Mapping[str, str]) -> str | None:
    """Re-hash the files the bundle wrote; the first problem as text, or None when intact.

    Paths are walked without following links: a file or directory swapped for a
    symlink is a problem even when the link's target has the right bytes.
    """
    for rel, expected in sorted(files.items()):
        try:
            digest = _hash_in_tree(tree, rel)
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


def _hash_in_tree(tree: Path, rel: str) -> str | None:
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
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

