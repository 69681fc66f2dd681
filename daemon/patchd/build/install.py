"""Turning a verified bundle into a tree beside the running one: materialise only.

The new tree is built in a staging directory next to its final place, from a clone of
the release's tree (``clone.py``), the bundle applied onto it (``apply.py``), then
renamed into place in one step: a tree appears complete or not at all, and neither
``release_dir`` nor the tree the host is running is ever written.

What the tree is *for* is not decided here: the updater promotes it to next boot, and
is the one place that decides what bad input means for the build (a downloaded bundle
is tombstoned, an operator's file only refused).
"""

from __future__ import annotations

import errno
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from patchd.build.apply import apply_bundle
from patchd.build.clone import (
    CloneMode,
    clone_deferred,
    probe_clone_mode,
    restore_dir_modes,
)
from patchd.core.durable import sync_dirs
from patchd.core.errors import BadInputError, DiskFull, InstallCancelled, UsageError
from patchd.core.fsio import DIR_FLAGS, fsync_dir, remove_tree, walk_dirs
from patchd.core.model import Build, Installed
from patchd.host.process import failpoint
from patchd.state import OLD_TREE_PREFIX, Lifecycle
from patchd.trust import (
    BundleHeader,
    BundleReader,
    DeleteOp,
    DeltaOp,
    DirOp,
    Expected,
    FileOp,
    Op,
    Payload,
    TrustedKeys,
    open_bundle,
)

log = structlog.get_logger("patchd.build.install")

#: Crash-campaign failpoints of the installer (see patchd.host.process.failpoint): around
#: the rename of the staging tree into place.
FAILPOINTS: tuple[str, ...] = ("install_rename.before", "install_rename.after")


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


def materialise(lifecycle: Lifecycle, req: InstallRequest,
                check_cancelled: Callable[[], None] | None = None) -> Installed:
    """Build ``req.bundle``'s tree at its final place and record it installed.

    Blocking: run it in a worker thread. Bad input leaves no trace (the staging tree
    goes, the state is untouched) and is re-raised for the caller to judge; a transient
    failure (disk full) or a stop request removes the staging tree and does not count
    as an install attempt; anything else leaves the attempt counted, so a bundle that
    keeps killing us ends as ``install_loop`` instead of a crash loop.
    """
    build = req.build
    final = lifecycle.tree_path(build)
    if final == lifecycle.release_dir:
        # (os_release, 0) is release_dir itself: the rename below would replace it.
        raise UsageError(f"build {build} is the release the OS installed in {final}; "
                         "patchd never writes there, so it cannot be installed")
    lifecycle.record_install_started(build)
    try:
        return _materialise_started(lifecycle, req, final, check_cancelled)
    finally:
        lifecycle.end_install(build)


def _materialise_started(lifecycle: Lifecycle, req: InstallRequest, final: Path,
                         check_cancelled: Callable[[], None] | None) -> Installed:
    build = req.build
    staging = lifecycle.staging_path(build)
    try:
        size, files = _build_tree(lifecycle, req, staging, check_cancelled)
        _retire_existing_tree(lifecycle, build, final)
        failpoint("install_rename.before")
        os.rename(staging, final)
        fsync_dir(final.parent)
        failpoint("install_rename.after")
    except BadInputError:
        remove_tree(staging)
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
    log.info("install.complete", release=build.release, patch=build.patch,
             files=len(files), size=size)
    return installed


def _build_tree(lifecycle: Lifecycle, req: InstallRequest, staging: Path,
                check_cancelled: Callable[[], None] | None) -> tuple[int, dict[str, str]]:
    """Clone the base into ``staging`` and apply the bundle; (unpacked size, files)."""
    build = req.build
    expected = Expected(app=req.app, kind=req.kind, release=build.release,
                        patch=build.patch, arch=req.arch)
    with open_bundle(req.bundle, req.trust, expected) as reader:
        remove_tree(staging)  # an older attempt's, if a sweep has not run since
        base = lifecycle.tree_path(Build(build.release, 0)) if req.kind == "patch" else None
        method = req.clone
        if base is not None and method == "auto":
            method = probe_clone_mode(base, staging.parent)
        needs = _space_needed(reader.header, base, method, staging.parent)
        _check_free_space(staging.parent, needs, req.min_free)
        deferred: dict[str, int] = {}
        if base is not None:
            _method, deferred = clone_deferred(base, staging, method)
        else:
            staging.mkdir(mode=0o755)
        source = reader if check_cancelled is None else \
            _StoppableReader(reader, check_cancelled)
        files = apply_bundle(source, staging)  # type: ignore[arg-type]
        set_by_bundle = {op.path for op in reader.header.ops if isinstance(op, DirOp)}
        restore_dir_modes(staging, deferred, set_by_bundle)
        # Written files were fsynced as they were written; every directory is new and
        # holds entries only its own fsync makes durable. All before the rename that
        # makes the tree visible, and so before the state that says it is installed.
        sync_dirs(staging)
        return reader.header.unpacked_size, files


def _retire_existing_tree(lifecycle: Lifecycle, build: Build, final: Path) -> None:
    """Clear the final place without deleting files under a running app.

    A tree already there is one a host may still run: a build the server rolled back
    while it was booted, now rolled forward again. Then it is moved aside in its build
    directory (open files stay valid) and goes after the next successful boot or at the
    next start-up. When no host can be running it, it goes to the lifecycle's trash
    like every tree a transition drops: one rename now, the deletion by the trash's
    owner (the daemon's worker thread), so this install does not wait for it.
    """
    if not os.path.lexists(final):
        return
    with lifecycle.lock:
        p = lifecycle.pointers
        in_use = build in (p.last_booted, p.currently_booting)
    if in_use:
        os.rename(final, final.with_name(f"{OLD_TREE_PREFIX}{secrets.token_hex(4)}"))
    else:
        lifecycle.discard(final)


@dataclass(frozen=True)
class _Needs:
    """What an install will take on the staging file system."""

    bytes: int
    inodes: int


#: Inodes kept beyond the tree's own: the state files written after it (temp + rename).
INODE_MARGIN = 64


def _space_needed(header: BundleHeader, base: Path | None, method: CloneMode,
                  where: Path) -> _Needs:
    """Bytes and inodes the install will take. Bytes: ``unpacked_size``, or more when
    every written file rounds up to whole blocks and every new directory takes one,
    plus the base tree itself when it must be copied. Inodes: one per op that makes an
    entry (file, delta, dir, symlink), plus the clone of the base: its directories and
    links always, its files unless they are hard-linked."""
    block = max(os.statvfs(where).f_frsize, 1)
    rounded = sum(-(-op.size // block) * block for op in header.ops
                  if isinstance(op, FileOp | DeltaOp))
    rounded += block * sum(isinstance(op, DirOp) for op in header.ops)
    needed = max(header.unpacked_size, rounded)
    inodes = sum(not isinstance(op, DeleteOp) for op in header.ops)
    if base is not None:
        usage = _tree_usage(base)
        inodes += usage.dirs + usage.links + (usage.files if method != "hardlink" else 0)
        if method == "copy":
            needed += usage.file_bytes
    return _Needs(needed, inodes + INODE_MARGIN)


@dataclass
class _Usage:
    dirs: int = 0
    files: int = 0
    links: int = 0
    file_bytes: int = 0  # allocated bytes of the regular files (what a copy takes)


def _tree_usage(root: Path) -> _Usage:
    """What the tree at ``root`` holds, by an iterative walk that never follows a link."""
    usage = _Usage()

    def count(fd: int) -> list[str]:
        subdirs = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                elif entry.is_symlink():
                    usage.links += 1
                elif entry.is_file(follow_symlinks=False):
                    usage.files += 1
                    usage.file_bytes += entry.stat(follow_symlinks=False).st_blocks * 512
        usage.dirs += 1
        return subdirs

    fd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)  # release_dir itself may be a link
    try:
        walk_dirs(fd, count)
    finally:
        os.close(fd)
    return usage


def _check_free_space(where: Path, needs: _Needs, min_free: int) -> None:
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < needs.bytes + min_free:
        raise DiskFull(f"{free} bytes free in {where}, the install needs "
                       f"{needs.bytes + min_free} (bundle's unpacked size, the base tree if "
                       "it must be copied, plus install.min_free)")
    # f_files is 0 where the file system has no inode limit (btrfs, tmpfs nr_inodes=0).
    if st.f_files and st.f_favail < needs.inodes:
        raise DiskFull(f"{st.f_favail} inodes free in {where}, the install needs "
                       f"{needs.inodes} (one per entry the bundle makes, the base tree's "
                       "directories and links, its files unless hard-linked)")


