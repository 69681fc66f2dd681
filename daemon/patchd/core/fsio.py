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
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from patchd.core.errors import DiskFull, UnsafePath

log = structlog.get_logger("patchd.core.fsio")

#: Prefix of every temporary sibling; start-up cleanup may remove anything carrying it.
TEMP_PREFIX = ".patchd-tmp-"
MAX_PATH_BYTES = 4096
#: Parts a bundle path may have at most: the deepest tree a bundle can make. Every walk
#: of a tree is iterative anyway; this keeps trees within what any tool can handle.
MAX_PATH_DEPTH = 256


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


#: A state file larger than this is corrupt (a header's files map is at most 16 MiB).
MAX_STATE_FILE_BYTES = 256 * 1024 * 1024


def read_regular(path: Path, limit: int, *, follow: bool = False, head: bool = False
                 ) -> bytes:
    """The bytes of the regular file at ``path``, refusing anything else with an
    OSError that says what it is (absent stays FileNotFoundError).

    A file over ``limit`` bytes is refused too, or with ``head`` only its first
    ``limit`` bytes are read. A FIFO, a device or a directory is refused without reading
    it (``O_NONBLOCK``: a FIFO never blocks the open); without ``follow`` a link is
    refused too (``ELOOP``), with it the target is checked before it is opened, so no
    device is ever opened.
    """
    if follow:
        _refuse_special(path, os.stat(path).st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise OSError(errno.ELOOP, "a link, not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        _refuse_special(path, st.st_mode)
        if st.st_size > limit and not head:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes ({st.st_size})", str(path))
        chunks, total = [], 0
        while total <= limit and (data := os.read(fd, min(limit + 1 - total, 1 << 20))):
            chunks.append(data)
            total += len(data)
        if total > limit and not head:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)[:limit]
    finally:
        os.close(fd)


def _refuse_special(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a link" if stat.S_ISLNK(mode)
            else "not a regular file")
    raise OSError(errno.EINVAL, f"{kind}, not a regular file", str(path))


def read_json(path: Path) -> Any | None:
    """Parsed JSON of ``path``, or None when it is absent or unreadable.

    A state file that fails to parse, or is no regular file (a directory, a FIFO, a
    link), is treated as absent and logged, never a crash nor a hang: the lifecycle
    then rebuilds what it can from the files that did parse.
    """
    try:
        data = read_regular(path, MAX_STATE_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("state.unreadable", path=str(path), error=exc.strerror or str(exc))
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc)[:200])
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


def walk_dirs(top_fd: int, enter: Callable[[int], list[str]],
              leave: Callable[[int, str], None] | None = None, *, force: bool = False) -> None:
    """Visit the directory tree at ``top_fd`` depth first, without recursion.

    ``enter(fd)`` is called once for each directory, ``top_fd`` first, and returns the
    names of the subdirectories to visit next; ``leave(parent_fd, name)`` is called once
    everything below ``name`` was visited. However deep the tree, the walk holds two
    descriptors at most and no Python recursion: it climbs back through ``..`` and checks
    that it reached the directory it left (same device and inode). Links are never
    followed and another file system mounted inside is not entered. With ``force`` a
    directory that refuses access is first made owner-rwx (a tree we are removing).
    """
    fd = os.dup(top_fd)
    try:
        st = os.fstat(fd)
        stack = [("", (st.st_dev, st.st_ino), enter(fd))]
        while stack:
            name, _ident, pending = stack[-1]
            if pending:
                child = pending.pop()
                cfd = open_subdir(fd, child, force=force)
                if cfd is None:
                    continue
                cst = os.fstat(cfd)
                if cst.st_dev != st.st_dev:
                    os.close(cfd)  # a mount point: never walked into
                    continue
                os.close(fd)
                fd = cfd
                stack.append((child, (cst.st_dev, cst.st_ino), enter(fd)))
                continue
            stack.pop()
            if not stack:
                break
            parent = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            pst = os.fstat(fd)
            if (pst.st_dev, pst.st_ino) != stack[-1][1]:
                raise OSError(errno.ESTALE, "a directory moved while its tree was walked", name)
            if leave is not None:
                leave(fd, name)
    finally:
        os.close(fd)


def open_subdir(dir_fd: int, name: str, *, force: bool = False) -> int | None:
    """A new fd of the directory ``name`` in ``dir_fd``; None when it is gone or is no
    longer a directory. With ``force`` access refused is met by making both owner-rwx."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        if not (force and isinstance(exc, PermissionError)):
            raise
    _make_owner_rwx(dir_fd)
    if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        os.chmod(name, 0o700, dir_fd=dir_fd)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _make_owner_rwx(fd: int) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o700 != 0o700:
        os.fchmod(fd, mode | 0o700)


def _unlink_files(fd: int) -> list[str]:
    """Unlink every entry of the directory ``fd`` but its subdirectories; their names."""
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
            continue
        _remove_entry(os.unlink, fd, name)
    return subdirs


def _rmdir(dir_fd: int, name: str) -> None:
    _remove_entry(os.rmdir, dir_fd, name)


def _remove_entry(remove: Callable[..., None], dir_fd: int, name: str) -> None:
    """``remove(name, dir_fd=dir_fd)`` (``os.unlink`` or ``os.rmdir``) as every removal
    of a tree does it: an entry already gone is fine, and a directory that refuses us
    is made writable and asked once more (we own it and are removing it)."""
    try:
        remove(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _make_owner_rwx(dir_fd)
        remove(name, dir_fd=dir_fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove the file, link or directory tree ``name`` in ``dir_fd`` if present.

    Iterative (:func:`walk_dirs`), so no depth of tree can exhaust the stack, and links
    are never followed out of the tree. Bundles may create read-only directories, so a
    directory that refuses access is made writable (we own it and are removing it).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _remove_entry(os.unlink, dir_fd, name)
        return
    fd = open_subdir(dir_fd, name, force=True)
    if fd is None:
        return remove_at(dir_fd, name)  # replaced by a file or link meanwhile
    try:
        walk_dirs(fd, _unlink_files, _rmdir, force=True)
    finally:
        os.close(fd)
    _rmdir(dir_fd, name)


def remove_tree(path: Path) -> None:
    """Remove a file, link or directory tree at ``path`` if present (:func:`remove_at`)."""
    try:
        path.lstat()
    except FileNotFoundError:
        return
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent, path.name)
    finally:
        os.close(parent)


def check_text(what: str, text: str) -> None:
    """Refuse a string that has no UTF-8 form (a lone surrogate such as ``\\udcff``):
    it could name a file on disk yet never be written to a state file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafePath(f"{what} {text[:64]!a} is not valid Unicode "
                         f"(a lone surrogate at {exc.start})") from None


def check_rel_path(path: object) -> tuple[str, ...]:
    """Validate a bundle path (docs/formats.md) and return its parts.

    Relative, ``/``-separated, normalised: no ``.``, ``..``, empty part, leading ``/``,
    NUL or backslash, valid Unicode, at most 4096 bytes and :data:`MAX_PATH_DEPTH`
    parts. Whether it passes through a symlink of the tree is checked where the tree is
    at hand (the installer), not here.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"path must be a non-empty string, got {path!r:.80}")
    check_text("path", path)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafePath(f"path longer than {MAX_PATH_BYTES} bytes: {path[:64]!r}…")
    if path.count("/") >= MAX_PATH_DEPTH:
        raise UnsafePath(f"path deeper than {MAX_PATH_DEPTH} parts "
                         f"({path.count('/') + 1}): {path[:64]!r}…")
    if "\x00" in path or "\\" in path:
        raise UnsafePath(f"path contains NUL or backslash: {path!r}")
    if path.startswith("/"):
        raise UnsafePath(f"path is absolute: {path!r}")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath(f"path is not normalised (empty, '.' or '..' part): {path!r}")
    return parts
