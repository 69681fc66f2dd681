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
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from patchd.apply import apply_bundle
from patchd.bundle import Expected, open_bundle
from patchd.errors import BadInputError, DiskFull
from patchd.fsio import fsync_dir, remove_tree
from patchd.lifecycle import Lifecycle
from patchd.model import BadReason, Build, Installed
from patchd.signing import TrustedKeys

log = structlog.get_logger("patchd.install")

CloneMode = Literal["auto", "reflink", "hardlink", "copy"]
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


def install(lifecycle: Lifecycle, req: InstallRequest) -> Installed:
    """Install ``req.bundle`` as ``req.build`` and make it next_boot. Blocking: run in a thread.

    Bad input marks the build bad (the download goes with it); a transient failure
    (disk full) removes the staging tree, keeps the download and does not count as an
    install attempt; anything else leaves the attempt counted, so a bundle that keeps
    killing us ends as ``install_loop`` instead of a crash loop.
    """
    build = req.build
    lifecycle.record_install_started(build)
    staging = lifecycle.staging_path(build)
    try:
        expected = Expected(app=req.app, kind=req.kind, release=build.release,
                            patch=build.patch, arch=req.arch)
        with open_bundle(req.bundle, req.trust, expected) as reader:
            _check_free_space(staging.parent, reader.header.unpacked_size + req.min_free)
            remove_tree(staging)
            if req.kind == "patch":
                base = lifecycle.tree_path(Build(build.release, 0))
                clone_tree(base, staging, req.clone)
            else:
                staging.mkdir(mode=0o755)
            # apply_bundle ends with syncfs() on the staging tree: the cloned entries and
            # the written files are durable before the rename below makes them visible.
            files = apply_bundle(reader, staging)
            size = reader.header.unpacked_size
        final = lifecycle.tree_path(build)
        remove_tree(final)  # a half-removed tree from an older attempt
        os.rename(staging, final)
        fsync_dir(final.parent)
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
        raise
    installed = Installed(size=size, files=dict(files))
    lifecycle.record_install_complete(build, size, dict(files))
    lifecycle.promote_to_next_boot(build)
    log.info("install.complete", release=build.release, patch=build.patch,
             files=len(files), size=size)
    return installed


def _check_free_space(where: Path, needed: int) -> None:
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise DiskFull(f"{free} bytes free in {where}, the install needs {needed} "
                       "(bundle's unpacked size plus install.min_free)")


# --- cloning -----------------------------------------------------------------------------


def clone_tree(base: Path, dest: Path, mode: CloneMode = "auto") -> str:
    """Recreate ``base`` at ``dest`` (which must not exist); returns the method used.

    ``auto`` tries reflink on the first file, then hardlink when on the same filesystem,
    else copies. Symlinks are recreated as links, never followed; other special files
    are skipped (a release tree has no business holding devices or fifos).
    """
    chosen = mode
    if mode == "auto":
        chosen = _probe_clone_mode(base, dest.parent)
    dest.mkdir(mode=0o700)
    _clone_dir(base, dest, chosen)
    os.chmod(dest, stat.S_IMODE(base.stat().st_mode))
    log.debug("install.cloned", base=str(base), method=chosen)
    return chosen


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


def _clone_dir(src: Path, dst: Path, mode: CloneMode) -> None:
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            s, d = Path(entry.path), dst / entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(st.st_mode):
                d.mkdir(mode=0o700)
                _clone_dir(s, d, mode)
                os.chmod(d, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                _clone_file(s, d, mode, stat.S_IMODE(st.st_mode))
            else:
                log.warning("install.skipped_special_file", path=str(s))


def _clone_file(src: Path, dst: Path, mode: CloneMode, perm: int) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dst, follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            mode = "copy"  # another mount, a protected file, or too many links
    with open(src, "rb") as fsrc:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if mode == "reflink":
                fcntl.ioctl(fd, FICLONE, fsrc.fileno())
            else:
                _copy_fd(fsrc.fileno(), fd)
            os.fchmod(fd, perm)
        finally:
            os.close(fd)


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


# --- strict verification -----------------------------------------------------------------


def verify_tree(tree: Path, files: Mapping[str, str]) -> str | None:
    """Re-hash the files the bundle wrote; the first problem as text, or None when intact."""
    for rel, expected in sorted(files.items()):
        path = tree / rel
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                return f"{rel} is no longer a regular file"
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            return f"{rel}: {exc.strerror}"
        if digest.hexdigest() != expected:
            return f"{rel} hashes to {digest.hexdigest()}, expected {expected}"
    return None
