"""Atomic, durable file operations and the one definition of a safe relative path.

A crash at any instant must leave either the old or the new version of a state file,
never a torn one, and a rename must survive power loss: so every write goes to a sibling
temp file, is fsynced, renamed over the target, and the directory is fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from patchd.core.errors import DiskFull, UnsafePath

log = structlog.get_logger("patchd.core.fsio")

#: Prefix of every temporary sibling; start-up cleanup may remove anything carrying it.
TEMP_PREFIX = ".patchd-tmp-"
MAX_PATH_BYTES = 4096


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Open a directory without following a link, for walks through directory fds.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(name: str) -> str:
    """A unique temporary name for a sibling of ``name`` that start-up repair may remove."""
    return f"{TEMP_PREFIX}{name[:64]}.{secrets.token_hex(4)}"


def open_dir_at(base_fd: int, rel: str) -> int:
    """A new fd of directory ``rel`` below ``base_fd`` ("" is ``base_fd`` itself).

    Every component is opened relative to the previous one with ``O_NOFOLLOW``, so a
    symlink anywhere on the way fails (ELOOP/ENOTDIR) instead of leading outside the
    tree. The OSError raised names, as ``filename``, the prefix of ``rel`` that failed.
    """
    fd = os.dup(base_fd)
    parts = rel.split("/") if rel else []
    for i, part in enumerate(parts):
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            exc.filename = "/".join(parts[: i + 1])
            raise
        os.close(fd)
        fd = nfd
    return fd


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write a file that appears at ``path`` complete and durable, or not at all.

    The body writes to a temporary sibling; on success it is fsynced, renamed over
    ``path`` and the directory fsynced. On any failure the sibling is removed and the
    old file stays. ENOSPC/EDQUOT become :class:`DiskFull`.
    """
    tmp = path.with_name(temp_name(path.name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left writing {path}") from exc
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or new bytes, never a mix.

    ENOSPC/EDQUOT become :class:`DiskFull` and leave the old file in place.
    """
    with atomic_file(path, mode) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as pretty, sorted JSON atomically and durably."""
    data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    atomic_write_bytes(path, data, mode)


def read_json(path: Path) -> Any | None:
    """Parsed JSON of ``path``, or None when it is absent or unreadable.

    A state file that fails to parse is treated as absent and logged, never a crash:
    the lifecycle then rebuilds what it can from the files that did parse.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("state.unreadable", path=str(path), error=str(exc))
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc))
        return None


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (create a temp link, rename it over)."""
    tmp = link.with_name(temp_name(link.name))
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    """Remove a file, link or directory tree if present, never following links out of it.

    Bundles may create read-only directories, so permission errors are met by making
    the directory in question writable (we own it and are removing it anyway).
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return

    def retry(func: Any, p: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if not isinstance(exc, PermissionError):
            raise exc
        if func in (os.open, os.scandir, os.listdir):
            os.chmod(p, 0o700)
            shutil.rmtree(p, **{_RMTREE_HOOK: _hook(retry)})
        else:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)

    shutil.rmtree(path, **{_RMTREE_HOOK: _hook(retry)})


# shutil.rmtree's error hook is `onexc` from 3.12 on and `onerror` (with exc_info) before.
_RMTREE_HOOK = "onexc" if sys.version_info >= (3, 12) else "onerror"


def _hook(fn: Any) -> Any:
    if _RMTREE_HOOK == "onexc":
        return fn
    return lambda func, p, exc_info: fn(func, p, exc_info[1])


def check_rel_path(path: object) -> tuple[str, ...]:
    """Validate a bundle path (docs/formats.md) and return its parts.

    Relative, ``/``-separated, normalised: no ``.``, ``..``, empty part, leading ``/``,
    NUL or backslash, at most 4096 bytes. Whether it passes through a symlink of the
    tree is checked where the tree is at hand (the installer), not here.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"path must be a non-empty string, got {path!r}")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePath(f"path longer than {MAX_PATH_BYTES} bytes: {path[:64]!r}…")
    if "\x00" in path or "\\" in path:
        raise UnsafePath(f"path contains NUL or backslash: {path!r}")
    if path.startswith("/"):
        raise UnsafePath(f"path is absolute: {path!r}")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath(f"path is not normalised (empty, '.' or '..' part): {path!r}")
    return parts
