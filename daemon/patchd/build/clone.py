"""Recreating a release's tree beside it, as cheaply as the filesystem allows.

A patch is applied to a clone of its base tree, never to the base: reflink shares
extents copy-on-write, a hard link shares the inode (safe because ``apply.py`` never
opens an existing file for writing), a copy is the fallback. Directories keep owner
rwx until the bundle is applied, so an unprivileged daemon can write into a directory
the release ships read-only; :func:`restore_dir_modes` gives them their modes back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import structlog

from patchd.core.fsio import DIR_FLAGS, open_dir_at

log = structlog.get_logger("patchd.build.clone")

CloneMode = Literal["auto", "reflink", "hardlink", "copy"]
FICLONE = 0x40049409  # _IOW(0x94, 9, int): share extents copy-on-write (btrfs, xfs)

#: Owner rwx: staging directories keep it until the bundle is applied, so an unprivileged
#: daemon (User=patchd) can write into a directory the release ships read-only.
_OWNER_RWX = 0o700


def clone_tree(base: Path, dest: Path, mode: CloneMode = "auto") -> str:
    """Recreate ``base`` at ``dest`` (which must not exist); returns the method used.

    ``auto`` tries reflink on the first file, then hardlink when on the same filesystem,
    else copies. Symlinks are recreated as links, never followed; other special files
    are skipped (a release tree has no business holding devices or fifos). Directory
    modes are exactly the base's on return.
    """
    chosen, deferred = clone_deferred(base, dest, mode)
    restore_dir_modes(dest, deferred, set())
    return chosen


def clone_deferred(base: Path, dest: Path, mode: CloneMode) -> tuple[CloneMode, dict[str, int]]:
    """Clone like :func:`clone_tree` but leave owner rwx on every directory; returns the
    method and the directories (relative path → base mode) still to be restored."""
    chosen = probe_clone_mode(base, dest.parent) if mode == "auto" else mode
    deferred: dict[str, int] = {}
    src_fd = os.open(base, DIR_FLAGS & ~os.O_NOFOLLOW)  # release_dir itself may be a link
    try:
        os.mkdir(dest, _OWNER_RWX)
        dst_fd = os.open(dest, DIR_FLAGS)
        try:
            _clone_dir(src_fd, dst_fd, "", chosen, deferred)
            _set_dir_mode(dst_fd, "", stat.S_IMODE(os.fstat(src_fd).st_mode), deferred)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    log.debug("install.cloned", base=str(base), method=chosen)
    return chosen, deferred


def probe_clone_mode(base: Path, dest_dir: Path) -> CloneMode:
    """Try the cheap methods for real on one file: equal ``st_dev`` is not enough, a
    bind mount (systemd's ProtectSystem=strict) shares it yet refuses links (EXDEV)."""
    sample = _first_regular_file(base)
    if sample is None:
        return "copy"
    if _try_reflink(sample, dest_dir):
        return "reflink"
    if _try_hardlink(sample, dest_dir):
        return "hardlink"
    return "copy"


def _first_regular_file(root: Path) -> Path | None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                return path
    return None


def _try_hardlink(sample: Path, dest_dir: Path) -> bool:
    probe = dest_dir / ".patchd-tmp-link-probe"
    probe.unlink(missing_ok=True)
    try:
        os.link(sample, probe, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _try_reflink(sample: Path, dest_dir: Path) -> bool:
    probe = dest_dir / ".patchd-tmp-reflink-probe"
    try:
        with open(sample, "rb") as src, open(probe, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _set_dir_mode(fd: int, rel: str, perm: int, deferred: dict[str, int]) -> None:
    """Give a staging directory its base mode now, or owner rwx until the bundle is applied."""
    if perm & _OWNER_RWX != _OWNER_RWX:
        deferred[rel] = perm
        perm |= _OWNER_RWX
    if perm != _OWNER_RWX:  # created with exactly that
        os.fchmod(fd, perm)


def _clone_dir(src_fd: int, dst_fd: int, rel: str, mode: CloneMode,
               deferred: dict[str, int]) -> None:
    """Clone one directory's entries through directory fds (no path resolution, no link
    followed); a hard link costs one syscall, without even a stat."""
    with os.scandir(src_fd) as entries:
        for entry in entries:
            name = entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            elif entry.is_dir(follow_symlinks=False):
                _clone_subdir(src_fd, dst_fd, name, f"{rel}{name}", mode, deferred)
            elif entry.is_file(follow_symlinks=False):
                _clone_file(src_fd, dst_fd, name, mode)
            else:
                log.warning("install.skipped_special_file", path=f"{rel}{name}")


def _clone_subdir(src_fd: int, dst_fd: int, name: str, rel: str, mode: CloneMode,
                  deferred: dict[str, int]) -> None:
    os.mkdir(name, _OWNER_RWX, dir_fd=dst_fd)
    sub_src = os.open(name, DIR_FLAGS, dir_fd=src_fd)
    try:
        sub_dst = os.open(name, DIR_FLAGS, dir_fd=dst_fd)
        try:
            _clone_dir(sub_src, sub_dst, rel + "/", mode, deferred)
            _set_dir_mode(sub_dst, rel, stat.S_IMODE(os.fstat(sub_src).st_mode), deferred)
        finally:
            os.close(sub_dst)
    finally:
        os.close(sub_src)


def _clone_file(src_fd: int, dst_fd: int, name: str, mode: CloneMode) -> None:
    if mode == "hardlink":
        try:
            os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            mode = "copy"  # another mount, a protected file, or too many links
    fsrc = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dst_fd)
        try:
            if mode == "reflink":
                fcntl.ioctl(fd, FICLONE, fsrc)
            else:
                _copy_fd(fsrc, fd)
            os.fchmod(fd, stat.S_IMODE(os.fstat(fsrc).st_mode))
            os.fsync(fd)  # a new inode (a hard link shares the base's, durable already)
        finally:
            os.close(fd)
    finally:
        os.close(fsrc)


def _copy_fd(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.lseek(src, 0, os.SEEK_SET)
        os.lseek(dst, 0, os.SEEK_SET)
        os.ftruncate(dst, 0)
        with os.fdopen(os.dup(src), "rb") as fin, os.fdopen(os.dup(dst), "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def restore_dir_modes(tree: Path, deferred: Mapping[str, int], set_by_bundle: set[str]
                       ) -> None:
    """Give cloned directories their base modes back (deepest first), except those the
    bundle set with a ``dir`` op or removed. Not fsynced here: the installer fsyncs
    every directory of the staging tree once, after this (``core.durable.sync_dirs``)."""
    for rel in sorted(deferred, key=lambda p: p.count("/") if p else -1, reverse=True):
        if rel in set_by_bundle:
            continue
        try:
            fd = open_tree_dir(tree, rel)
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted or replaced by the bundle
        try:
            os.fchmod(fd, deferred[rel])
        finally:
            os.close(fd)


def open_tree_dir(tree: Path, rel: str) -> int:
    """An fd of directory ``rel`` under ``tree``, refusing a symlink on the way (ELOOP
    becomes NotADirectoryError: the bundle replaced that directory with a link)."""
    root = os.open(tree, DIR_FLAGS)
    try:
        return open_dir_at(root, rel)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotADirectoryError(exc.errno, exc.strerror, rel) from exc
        raise
    finally:
        os.close(root)


