"""Turning a verified bundle into a bootable tree beside the running one (SPEC §2.3, §3.3).

The new tree is built in a staging directory next to its final place, from a clone of
the release's tree (reflink, hardlink or copy), then renamed into place in one step:
a tree appears complete or not at all, and neither ``release_dir`` nor the tree the
host is running is ever written. Hard-linked clones are safe because ``apply.py`` never
opens an existing file for writing: it writes a new inode and renames it over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from patchd.core.errors import InstallCancelled
from patchd.build.apply import apply_bundle
from patchd.trust.bundle import (
    BundleHeader,
    BundleReader,
    DeltaOp,
    DirOp,
    Expected,
    FileOp,
    Op,
    Payload,
    open_bundle,
)
from patchd.core.errors import BadInputError, DiskFull, UsageError
from patchd.core.fsio import fsync_dir, remove_tree
from patchd.state import OLD_TREE_PREFIX, Lifecycle
from patchd.core.model import BadReason, Build, Installed
from patchd.host.process import failpoint
from patchd.trust.signing import TrustedKeys

log = structlog.get_logger("patchd.build.install")

CloneMode = Literal["auto", "reflink", "hardlink", "copy"]

#: Crash-campaign failpoints of the installer (see patchd.host.process.failpoint): around the
#: rename of the staging tree into place.
FAILPOINTS: tuple[str, ...] = ("install_rename.before", "install_rename.after")
FICLONE = 0x40049409  # _IOW(0x94, 9, int): share extents copy-on-write (btrfs, xfs)


@dataclass(frozen=True)
class InstallRequest:
    build: Build
    bundle: Path
    kind: Literal["patch", "full"]
    app: str
    arch: str
    trust: TrustedKeys
    clone: CloneMode = "auto"
    min_free: int = 0
    #: A bad downloaded bundle tombstones its build; a bad file an operator handed us
    #: (``Install``) is only refused, or one corrupt USB stick would ban a good patch.
    mark_bad_on_bad_input: bool = True



class _StoppableReader:
    """The bundle reader, with a cancellation check before each op is handed out."""

    def __init__(self, reader: BundleReader, check: Callable[[], None]) -> None:
        self._reader = reader
        self._check = check
        self.header = reader.header

    def __getattr__(self, name: str) -> object:
        return getattr(self._reader, name)

    def ops(self, read_base: Callable[[str], bytes]) -> Iterator[tuple[Op, Payload | None]]:
        for item in self._reader.ops(read_base):
            self._check()
            yield item


def install(lifecycle: Lifecycle, req: InstallRequest,
            check_cancelled: Callable[[], None] | None = None) -> Installed:
    """Install ``req.bundle`` as ``req.build`` and make it next_boot. Blocking: run in a thread.

    Bad input marks the build bad (the download goes with it); a transient failure
    (disk full) removes the staging tree, keeps the download and does not count as an
    install attempt; anything else leaves the attempt counted, so a bundle that keeps
    killing us ends as ``install_loop`` instead of a crash loop.
    """
    build = req.build
    final = lifecycle.tree_path(build)
    if final == lifecycle.release_dir:
        # (os_release, 0) is release_dir itself: the rename below would replace it.
        raise UsageError(f"build {build} is the release the OS installed in {final}; "
                         "patchd never writes there, so it cannot be installed")
    lifecycle.record_install_started(build)
    staging = lifecycle.staging_path(build)
    try:
        expected = Expected(app=req.app, kind=req.kind, release=build.release,
                            patch=build.patch, arch=req.arch)
        with open_bundle(req.bundle, req.trust, expected) as reader:
            remove_tree(staging)  # an older attempt's, if a sweep has not run since
            base = lifecycle.tree_path(Build(build.release, 0)) if req.kind == "patch" else None
            method = req.clone
            if base is not None and method == "auto":
                method = _probe_clone_mode(base, staging.parent)
            needed = _space_needed(reader.header, base, method, staging.parent)
            _check_free_space(staging.parent, needed + req.min_free)
            deferred: dict[str, int] = {}
            if base is not None:
                _method, deferred = _clone(base, staging, method)
            else:
                staging.mkdir(mode=0o755)
            # apply_bundle ends with syncfs() on the staging tree: the cloned entries and
            # the written files are durable before the rename below makes them visible.
            source = reader if check_cancelled is None else \
                _StoppableReader(reader, check_cancelled)
            files = apply_bundle(source, staging)  # type: ignore[arg-type]
            set_by_bundle = {op.path for op in reader.header.ops if isinstance(op, DirOp)}
            _restore_dir_modes(staging, deferred, set_by_bundle)
            size = reader.header.unpacked_size
        _retire_existing_tree(lifecycle, build, final)
        failpoint("install_rename.before")
        os.rename(staging, final)
        fsync_dir(final.parent)
        failpoint("install_rename.after")
    except BadInputError as exc:
        remove_tree(staging)
        if req.mark_bad_on_bad_input:
            lifecycle.mark_bad(build, BadReason(exc.bad_reason), str(exc))
        else:
            lifecycle.record_install_aborted(build)
        raise
    except DiskFull:
        remove_tree(staging)
        lifecycle.record_install_aborted(build)
        raise
    except OSError as exc:
        remove_tree(staging)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            lifecycle.record_install_aborted(build)
            raise DiskFull(f"no space left installing {build}: {exc}") from exc
        raise
    except BaseException:
        remove_tree(staging)
        # A stop request (SIGTERM) ends the install cleanly: not an attempt that failed.
        if not isinstance(sys.exc_info()[1], Exception) or \
                isinstance(sys.exc_info()[1], InstallCancelled):
            lifecycle.record_install_aborted(build)
        raise
    installed = Installed(size=size, files=dict(files))
    lifecycle.record_install_complete(build, size, dict(files))
    lifecycle.promote_to_next_boot(build)
    log.info("install.complete", release=build.release, patch=build.patch,
             files=len(files), size=size)
    return installed


def _retire_existing_tree(lifecycle: Lifecycle, build: Build, final: Path) -> None:
    """Clear the final place without deleting files under a running app.

    A tree already there is one a host may still run: a build the server rolled back
    while it was booted, now rolled forward again. It is moved aside (open files stay
    valid) and removed at once only when no host can be running it; otherwise the
    next start-up sweep removes it.
    """
    if not os.path.lexists(final):
        return
    p = lifecycle.pointers
    aside = final.with_name(f"{OLD_TREE_PREFIX}{secrets.token_hex(4)}")
    os.rename(final, aside)
    if build not in (p.last_booted, p.currently_booting):
        remove_tree(aside)


def _space_needed(header: BundleHeader, base: Path | None, method: CloneMode,
                  where: Path) -> int:
    """Bytes the install will take: ``unpacked_size``, or more when every written file
    rounds up to whole blocks, plus the base tree itself when it must be copied."""
    block = max(os.statvfs(where).f_frsize, 1)
    rounded = sum(-(-op.size // block) * block for op in header.ops
                  if isinstance(op, FileOp | DeltaOp))
    needed = max(header.unpacked_size, rounded)
    if base is not None and method == "copy":
        needed += _tree_blocks(base)
    return needed


def _tree_blocks(root: Path) -> int:
    """Allocated bytes of the regular files under ``root`` (what a copy will take)."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


def _check_free_space(where: Path, needed: int) -> None:
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise DiskFull(f"{free} bytes free in {where}, the install needs {needed} "
                       "(bundle's unpacked size, the base tree if it must be copied, "
                       "plus install.min_free)")


# --- cloning -----------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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
    chosen, deferred = _clone(base, dest, mode)
    _restore_dir_modes(dest, deferred, set())
    return chosen


def _clone(base: Path, dest: Path, mode: CloneMode) -> tuple[CloneMode, dict[str, int]]:
    """Clone like :func:`clone_tree` but leave owner rwx on every directory; returns the
    method and the directories (relative path → base mode) still to be restored."""
    chosen = _probe_clone_mode(base, dest.parent) if mode == "auto" else mode
    deferred: dict[str, int] = {}
    src_fd = os.open(base, _DIR_FLAGS & ~os.O_NOFOLLOW)  # release_dir itself may be a link
    try:
        os.mkdir(dest, _OWNER_RWX)
        dst_fd = os.open(dest, _DIR_FLAGS)
        try:
            _clone_dir(src_fd, dst_fd, "", chosen, deferred)
            _set_dir_mode(dst_fd, "", stat.S_IMODE(os.fstat(src_fd).st_mode), deferred)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    log.debug("install.cloned", base=str(base), method=chosen)
    return chosen, deferred


def _probe_clone_mode(base: Path, dest_dir: Path) -> CloneMode:
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
    sub_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
    try:
        sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
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


def _restore_dir_modes(tree: Path, deferred: Mapping[str, int], set_by_bundle: set[str]
                       ) -> None:
    """Give cloned directories their base modes back (deepest first), except those the
    bundle set with a ``dir`` op or removed; each is fsynced (the rename follows)."""
    for rel in sorted(deferred, key=lambda p: p.count("/") if p else -1, reverse=True):
        if rel in set_by_bundle:
            continue
        try:
            fd = _open_dir_nofollow(tree, rel)
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted or replaced by the bundle
        try:
            os.fchmod(fd, deferred[rel])
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_dir_nofollow(tree: Path, rel: str) -> int:
    """An fd of directory ``rel`` under ``tree``, refusing a symlink on the way (ELOOP
    becomes NotADirectoryError: the bundle replaced that directory with a link)."""
    fd = os.open(tree, _DIR_FLAGS)
    for part in rel.split("/") if rel else []:
        try:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ELOOP:
                raise NotADirectoryError(exc.errno, exc.strerror, rel) from exc
            raise
        os.close(fd)
        fd = nfd
    return fd


# --- strict verification -----------------------------------------------------------------


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
    dfd = _open_dir_nofollow(tree, parent)
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
