"""Start-up: take the state directory, then repair whatever a crash left behind.

Crash safety rests on this module. Each write of a transition is atomic and durable
(``patchd.core.fsio``), and the writes inside a transition are ordered so that any
prefix of them is a state that start-up puts right: the sweep of leftovers, a recompute
of next_boot (which re-points ``current``) and finishing an interrupted promotion. A
release installed by the OS (or a first start) resets the pointers before any of that.

Two steps, around the construction of the :class:`~patchd.state.lifecycle.Lifecycle`:
:func:`load` works on the files alone (what to start from, and the sweep), then
:func:`resume` finishes through the lifecycle's own transitions, so that start-up writes
exactly what they write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from patchd.core import fsio
from patchd.core.durable import make_dirs
from patchd.core.errors import ConfigError, StateLocked
from patchd.core.model import (
    Bad,
    Build,
    Downloaded,
    Downloading,
    Installed,
    is_valid_release,
    release_key,
    version_line,
)
from patchd.state import store
from patchd.state.layout import SET_ASIDE_DIR, STATE_FILE, TRASH_PREFIX, TREE_DIR, Layout
from patchd.state.pointers import Pointers, protected_builds
from patchd.state.trash import Trash

if TYPE_CHECKING:
    from patchd.state.lifecycle import Lifecycle

__all__ = ["Loaded", "load", "read_release", "resume", "take_lock"]

log = structlog.get_logger("patchd.state.recovery")


def take_lock(layout: Layout) -> int:
    """Create the state directory if needed and hold its flock: one process per
    directory. Returns the descriptor to close on release; raises :class:`StateLocked`."""
    if layout.state_dir.exists() and not layout.state_dir.is_dir():
        raise ConfigError(f"{layout.state_dir}: not a directory; check paths.state_dir")
    make_dirs(layout.state_dir)
    path = layout.lock
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:  # a directory or a link where the lock file belongs
        if exc.errno not in (errno.EISDIR, errno.ELOOP):
            raise  # never move aside a lock we may not open: another user's daemon holds it
        _set_aside(layout, path, exc)
        fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        _set_aside(layout, path, "not a regular file")
        fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLocked(f"another patchd process holds {path}: the state directory "
                          f"{layout.state_dir} is in use (stop the other daemon first)") from None
    return fd


#: ``release_dir/VERSION`` is read up to this many bytes; its first line must fit.
MAX_VERSION_BYTES = 256


def read_release(release_dir: Path) -> str:
    """First line of ``release_dir/VERSION``: the release the OS installed.

    Only a regular file is read (a link is followed to one), and only its first
    :data:`MAX_VERSION_BYTES` bytes: a FIFO, a device or a directory is a config error
    naming the file, at once, never a hang or a read without end.
    """
    path = release_dir / "VERSION"
    try:
        data = fsio.read_regular(path, MAX_VERSION_BYTES, follow=True, head=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the release version "
                          f"({exc.strerror or exc}); check app.release_dir") from exc
    if len(data) >= MAX_VERSION_BYTES and b"\n" not in data:
        raise ConfigError(f"{path}: the first line is longer than {MAX_VERSION_BYTES} bytes")
    first = version_line(data)
    if not first:
        raise ConfigError(f"{path}: empty; its first line must name the release")
    if not is_valid_release(first):
        raise ConfigError(f"{path}: {first[:64]!r} is not a valid release name")
    return first


@dataclass(frozen=True, slots=True)
class Loaded:
    """What :func:`load` made of the state directory: the lifecycle starts from it."""

    os_release: str
    pointers: Pointers
    #: The pointers were reset (first start, corrupt pointers or another OS release).
    reset: bool


def load(layout: Layout, release_dir: Path, trash: Trash) -> Loaded:
    """Read the OS release and the pointers, start over when the OS installed another
    release, and sweep what interrupted transitions left. The caller holds the lock.

    Trees under ``builds/`` are not deleted here but moved into ``trash`` (one rename
    each), whose owner deletes them: after a crash mid-install the staging tree may
    hold thousands of files, and the daemon must not spend that time before READY."""
    os_release = read_release(release_dir)
    _odd_layout(layout)
    loaded = store.read_pointers(layout)
    last_seen = (loaded.os_release or loaded.release) if loaded else None
    if loaded is None or last_seen != os_release:
        pointers, reset = _release_change(layout, os_release, last_seen, trash), True
    else:
        pointers, reset = loaded, False
        if pointers.os_release != os_release:
            pointers = replace(pointers, os_release=os_release)
            store.write_pointers(layout, pointers, "open.pointers")
    _sweep(layout, protected_builds(pointers, os_release), trash)
    return Loaded(os_release, pointers, reset)


def open_lifecycle(cls: type[Lifecycle], layout: Layout, release_dir: Path, *,
                   keep_trash: bool) -> Lifecycle:
    """``Lifecycle.open``: take the lock, load and repair, build the lifecycle on it."""
    lock_fd = take_lock(layout)
    try:
        trash = Trash(layout.builds, resisted=partial(_set_aside_trash, layout))
        if keep_trash:
            trash.set_owner(_later)
        loaded = load(layout, release_dir, trash)
        lc = cls(layout, release_dir, loaded.os_release, loaded.pointers, lock_fd, trash)
        resume(lc, loaded)
        if not keep_trash:
            trash.empty()
    except BaseException:
        os.close(lock_fd)
        raise
    return lc


def _later() -> None:
    """The trash's owner from ``open_lifecycle(keep_trash=True)`` until its caller takes
    it over: nothing to wake yet; the new owner's first round empties the queue."""


def resume(lc: Lifecycle, loaded: Loaded) -> None:
    """Finish start-up on the new lifecycle: recompute next_boot (and ``current``),
    then finish a promotion a crash interrupted."""
    lc.recompute_next_boot()
    if not loaded.reset:  # after a reset nothing was being promoted
        _finish_interrupted_promotion(lc)


def _finish_interrupted_promotion(lc: Lifecycle) -> None:
    """Promote an installed build the daemon died before promoting.

    ``record_install_complete`` and ``promote_to_next_boot`` are two writes; a crash
    between them leaves a good, newer installed build that nothing points at (an
    earlier next_boot that never booted is retired by every promotion, and rolled
    back or failed builds are no longer ``Installed``), so it is exactly that case.
    """
    p = lc.pointers
    newer = [b for b, s in lc.builds()
             if isinstance(s, Installed) and lc.tree_path(b).is_dir()
             and b.sort_key() > p.next_boot.sort_key()
             and (b.release == p.release or (b.patch == 0 and b.release != p.release))]
    if newer:
        build = max(newer, key=Build.sort_key)
        log.warning("lifecycle.promotion_resumed", build=str(build))
        lc.promote_to_next_boot(build)


def _release_change(layout: Layout, os_release: str, last_seen: str | None,
                    trash: Trash) -> Pointers:
    """The OS installed another release (or this is the first start): start over.

    Builds of older releases and every cached download go; ``release_dir`` is never
    touched. Builds of the same or newer releases (a full upgrade's tree) are kept:
    they are valid and the strategy may pick them again.
    """
    base = release_key(os_release)
    for entry in store.listdir(layout.builds):
        if not is_valid_release(entry) or release_key(entry) < base:
            _remove(layout, layout.builds / entry, trash)
    if last_seen is not None:
        _remove(layout, layout.downloads)
        make_dirs(layout.downloads)
        log.warning("lifecycle.release_changed", old=last_seen, new=os_release)
    pointers = Pointers.initial(os_release)
    store.write_pointers(layout, pointers, "release_change.pointers")
    return pointers


def _sweep(layout: Layout, protected: set[Build], trash: Trash) -> None:
    """Remove what an interrupted transition left: temp files, staging trees, trees
    of builds that are not installed, state-less build directories, orphan
    downloads and anything not named like ours under ``builds/`` and ``downloads/``
    (the trash, ``builds/.trash-*``, that a crash or a stop left before it was emptied).
    A directory that cannot be repaired is set aside (:func:`_set_aside`).
    """
    for entry in store.listdir(layout.state_dir):
        if entry.startswith(fsio.TEMP_PREFIX):
            _remove(layout, layout.state_dir / entry)
    current = layout.current
    if current.exists() and not current.is_symlink():
        _remove(layout, current)  # a recompute points it again
    for rel in _listdir(layout, layout.builds):
        rel_dir = layout.release_dir(rel)
        if rel.startswith(TRASH_PREFIX) and rel_dir.is_dir() and not rel_dir.is_symlink():
            trash.adopt(rel_dir)
            continue
        if not is_valid_release(rel) or not rel_dir.is_dir() or rel_dir.is_symlink():
            _remove(layout, rel_dir, trash)
            continue
        for patch in _listdir(layout, rel_dir):
            bdir = rel_dir / patch
            if not store.is_patch_name(patch) or not bdir.is_dir() or bdir.is_symlink():
                _remove(layout, bdir, trash)
                continue
            try:
                _sweep_build(layout, Build(rel, int(patch)), protected, trash)
            except OSError as exc:
                _set_aside(layout, bdir, exc)
        if rel_dir.is_dir() and not _listdir(layout, rel_dir):
            _remove(layout, rel_dir)
    wanted = {path for b, s in store.list_builds(layout)
              if isinstance(s, Downloading | Downloaded) for path in layout.download(b)}
    for entry in _listdir(layout, layout.downloads):
        if layout.downloads / entry not in wanted:
            log.info("lifecycle.orphan_removed", path=str(layout.downloads / entry))
            _remove(layout, layout.downloads / entry)


def _sweep_build(layout: Layout, build: Build, protected: set[Build], trash: Trash) -> None:
    bdir = layout.build_dir(build)
    state = store.read_state(layout, build)
    keep = {STATE_FILE} if state is not None else set()
    if isinstance(state, Installed | Bad) or build in protected:
        keep.add(TREE_DIR)
    for entry in store.listdir(bdir):
        if entry not in keep:
            log.info("lifecycle.leftover_removed", path=str(bdir / entry))
            _remove(layout, bdir / entry, trash)
    if not store.listdir(bdir):
        fsio.remove_tree(bdir)


# --- odd layouts ---------------------------------------------------------------------


def _odd_layout(layout: Layout) -> None:
    """Set aside what no patchd wrote where the layout needs a directory or a file: a
    file where ``builds/`` or ``downloads/`` belongs, a directory, FIFO or link where
    a state file belongs (its atomic replacement would fail, its read hang)."""
    for directory in (layout.builds, layout.downloads):
        if os.path.lexists(directory) and not directory.is_dir():
            _set_aside(layout, directory, "not a directory")
        make_dirs(directory)
    for path in (layout.pointers, layout.client, layout.root, layout.events):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            _set_aside(layout, path, "not a regular file")


def _listdir(layout: Layout, path: Path) -> list[str]:
    """The entries of one of our directories; one that cannot be listed is set aside."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        _set_aside(layout, path, exc)
        return []


def _remove(layout: Layout, path: Path, trash: Trash | None = None) -> None:
    """Remove a leftover (a directory under ``builds/``: into ``trash``); one that
    resists (a mount point, an immutable file, EIO) is set aside instead, so that no
    layout of the directories stops the daemon starting."""
    try:
        if trash is not None:
            trash.move(path)
        else:
            fsio.remove_tree(path)
    except OSError as exc:
        _set_aside(layout, path, exc)


def _set_aside_trash(layout: Layout, path: Path, origin: Path, exc: OSError) -> None:
    """What the trash could not delete is set aside under the name it had."""
    _set_aside(layout, path, exc, named=origin)


def _set_aside(layout: Layout, path: Path, why: object, named: Path | None = None) -> None:
    """Move ``path`` into ``set-aside/`` of its state or cache directory and log it (a
    warning: nothing is lost, and the operator may look at it); never raises. The new
    name is made from ``named`` (default: ``path``), relative to that directory."""
    named = named or path
    root = layout.cache_dir if path.is_relative_to(layout.cache_dir) and \
        not path.is_relative_to(layout.state_dir) else layout.state_dir
    rel = str(named.relative_to(root)).replace("/", "_")[:128]
    dest = root / SET_ASIDE_DIR / f"{rel}.{secrets.token_hex(4)}"
    error = why.strerror or str(why) if isinstance(why, OSError) else str(why)
    try:
        make_dirs(dest.parent)
        os.rename(path, dest)
        fsio.fsync_dir(path.parent)
    except OSError as exc:
        log.warning("lifecycle.repair_failed", path=str(path), error=error,
                    set_aside_error=exc.strerror or str(exc))
        return
    log.warning("lifecycle.set_aside", path=str(named), moved_to=str(dest), error=error)
