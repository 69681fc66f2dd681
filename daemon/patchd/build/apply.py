"""Apply a bundle's ops onto a staging tree, safely against a hostile tree or bundle.

Every path is walked one component at a time through directory file descriptors with
``O_NOFOLLOW``, so a symlink anywhere in the tree can never redirect a write outside it
(walking through one is refused as UnsafePath). An existing file is never opened for
writing — it may be a hard link into the running release — so new content goes to a
fresh temp file in the same directory, is fsynced and given its mode on the new inode,
then renamed over the old name. Each written file is fsynced here (its bytes and mode);
the installer fsyncs every directory of the staging tree once, before the rename that
makes it visible (``patchd.core.durable``). ``syncfs`` of the staging filesystem would
be one call instead, but it never reaches FUSE or network file systems and waits on
every dirty page of the file system, the running app's included.
Directory modes are set at the end, deepest first, so a read-only directory in the
bundle does not stop its own files from being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import structlog

from patchd.core.errors import BundleInvalid, DiskFull, UnsafePath
from patchd.core.fsio import DIR_FLAGS, open_dir_at, remove_at, temp_name
from patchd.trust import (
    BundleReader,
    DeleteOp,
    DeltaOp,
    DirOp,
    FileOp,
    Payload,
    SymlinkOp,
)

log = structlog.get_logger("patchd.build.apply")

#: A delta's base file is read whole into memory; larger ones are refused.
MAX_DELTA_BASE = 64 * 1024 * 1024
_CHUNK = 1024 * 1024


class _Tree:
    """Directory-fd access to one staging tree, caching the last parent directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, DIR_FLAGS)
        self._parent: tuple[str, int] | None = None

    def __repr__(self) -> str:
        cached = self._parent[0] if self._parent else None
        return f"<_Tree {str(self.root)!r} parent={cached!r}>"

    def open_dir(self, rel: str) -> int:
        """A new fd of directory ``rel`` ("" is the root), refusing any symlink on the way."""
        try:
            return open_dir_at(self.root_fd, rel)
        except OSError as exc:
            raise self._walk_error(str(exc.filename), exc) from exc

    def _walk_error(self, where: str, exc: OSError) -> Exception:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            if os.path.islink(self.root / where):
                return UnsafePath(f"{where!r} is a symlink; bundle paths must not pass through one")
            return BundleInvalid(f"{where!r} is not a directory")
        if exc.errno == errno.ENOENT:
            return BundleInvalid(f"directory {where!r} does not exist (the bundle must create it)")
        return exc

    def parent(self, path: str) -> tuple[int, str]:
        """(fd of the parent directory, leaf name) of ``path``."""
        rel, _, name = path.rpartition("/")
        if self._parent is None or self._parent[0] != rel:
            self.release_parent()
            self._parent = (rel, self.open_dir(rel))
        return self._parent[1], name

    def release_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def close(self) -> None:
        self.release_parent()
        os.close(self.root_fd)

    def lstat(self, path: str) -> os.stat_result | None:
        fd, name = self.parent(path)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read_base(self, path: str) -> bytes:
        """The staging tree's current bytes at ``path``, never following a symlink."""
        fd, name = self.parent(path)
        try:
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"delta base {path!r} is a symlink") from exc
            if exc.errno == errno.ENOENT:
                raise BundleInvalid(f"delta base {path!r} does not exist") from exc
            raise
        with os.fdopen(ffd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DELTA_BASE:
                raise BundleInvalid(f"delta base {path!r} is not a regular file up to 64 MiB")
            return f.read()


def _refuse_dir(tree: _Tree, path: str, what: str) -> None:
    st = tree.lstat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BundleInvalid(f"{what} {path!r} would replace a directory; the bundle must delete it")


def _write_file(tree: _Tree, op: FileOp | DeltaOp, payload: Payload) -> None:
    _refuse_dir(tree, op.path, "file")
    dfd, name = tree.parent(op.path)
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    try:
        try:
            while chunk := payload.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, op.mode)
            os.fsync(fd)  # bytes and mode durable before the name can be
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _make_dir(tree: _Tree, op: DirOp) -> None:
    dfd, name = tree.parent(op.path)
    try:
        os.mkdir(name, 0o700, dir_fd=dfd)
    except FileExistsError:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise BundleInvalid(
                f"dir {op.path!r} would replace a file or link; the bundle must delete it"
            ) from None


def _make_link(tree: _Tree, op: SymlinkOp) -> None:
    _refuse_dir(tree, op.path, "symlink")
    dfd, name = tree.parent(op.path)
    tmp = temp_name(name)
    os.symlink(op.target, tmp, dir_fd=dfd)
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _delete(tree: _Tree, op: DeleteOp) -> bool:
    """Remove whatever is at ``op.path``; True when it was a directory."""
    st = tree.lstat(op.path)
    if st is None:
        return False
    dfd, name = tree.parent(op.path)
    if stat.S_ISDIR(st.st_mode):
        remove_at(dfd, name)  # iterative: no depth of tree exhausts the stack
        return True
    os.unlink(name, dir_fd=dfd)
    return False


def _forget(files: dict[str, str], modes: dict[str, int], path: str, whole_dir: bool) -> None:
    files.pop(path, None)
    modes.pop(path, None)
    if whole_dir:
        prefix = path + "/"
        for table in (files, modes):
            for key in [k for k in table if k.startswith(prefix)]:
                del table[key]


def _set_dir_modes(tree: _Tree, modes: dict[str, int]) -> None:
    tree.release_parent()
    for path in sorted(modes, key=lambda p: p.count("/"), reverse=True):
        fd = tree.open_dir(path)
        try:
            os.fchmod(fd, modes[path])
        finally:
            os.close(fd)


def apply_bundle(reader: BundleReader, staging: Path) -> dict[str, str]:
    """Apply every op of ``reader`` onto ``staging``; path → SHA-256 of each file written.

    ENOSPC/EDQUOT become DiskFull; staging is then half-applied and must be discarded.
    """
    tree = _Tree(Path(staging))
    files: dict[str, str] = {}
    modes: dict[str, int] = {}
    try:
        for op, payload in reader.ops(tree.read_base):
            if isinstance(op, FileOp | DeltaOp):
                assert payload is not None
                _write_file(tree, op, payload)
                files[op.path] = op.sha256
            elif isinstance(op, DirOp):
                _make_dir(tree, op)
                files.pop(op.path, None)
                modes[op.path] = op.mode
            elif isinstance(op, SymlinkOp):
                _make_link(tree, op)
                _forget(files, modes, op.path, whole_dir=False)
            else:
                _forget(files, modes, op.path, whole_dir=_delete(tree, op))
        _set_dir_modes(tree, modes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left applying {reader.path.name} to {staging}") from exc
        raise
    finally:
        tree.close()
    log.info("apply.complete", bundle=reader.path.name, files=len(files))
    return files
