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

import fcntl
import os
from dataclasses import dataclass, replace
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
)
from patchd.state import store
from patchd.state.layout import STATE_FILE, TREE_DIR, Layout
from patchd.state.pointers import Pointers, protected_builds

if TYPE_CHECKING:
    from patchd.state.lifecycle import Lifecycle

__all__ = ["Loaded", "load", "read_release", "resume", "take_lock"]

log = structlog.get_logger("patchd.state.recovery")


def take_lock(layout: Layout) -> int:
    """Create the state directory if needed and hold its flock: one process per
    directory. Returns the descriptor to close on release; raises :class:`StateLocked`."""
    make_dirs(layout.state_dir)
    path = layout.lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLocked(f"another patchd process holds {path}: the state directory "
                          f"{layout.state_dir} is in use (stop the other daemon first)") from None
    return fd


def read_release(release_dir: Path) -> str:
    """First line of ``release_dir/VERSION``: the release the OS installed."""
    path = release_dir / "VERSION"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the release version ({exc.strerror}); "
                          "check app.release_dir") from exc
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
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


def load(layout: Layout, release_dir: Path) -> Loaded:
    """Read the OS release and the pointers, start over when the OS installed another
    release, and sweep what interrupted transitions left. The caller holds the lock."""
    os_release = read_release(release_dir)
    make_dirs(layout.builds)
    make_dirs(layout.downloads)
    loaded = store.read_pointers(layout)
    last_seen = (loaded.os_release or loaded.release) if loaded else None
    if loaded is None or last_seen != os_release:
        pointers, reset = _release_change(layout, os_release, last_seen), True
    else:
        pointers, reset = loaded, False
        if pointers.os_release != os_release:
            pointers = replace(pointers, os_release=os_release)
            store.write_pointers(layout, pointers, "open.pointers")
    _sweep(layout, protected_builds(pointers, os_release))
    return Loaded(os_release, pointers, reset)


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


def _release_change(layout: Layout, os_release: str, last_seen: str | None) -> Pointers:
    """The OS installed another release (or this is the first start): start over.

    Builds of older releases and every cached download go; ``release_dir`` is never
    touched. Builds of the same or newer releases (a full upgrade's tree) are kept:
    they are valid and the strategy may pick them again.
    """
    base = release_key(os_release)
    for entry in store.listdir(layout.builds):
        if not is_valid_release(entry) or release_key(entry) < base:
            fsio.remove_tree(layout.builds / entry)
    if last_seen is not None:
        fsio.remove_tree(layout.downloads)
        make_dirs(layout.downloads)
        log.warning("lifecycle.release_changed", old=last_seen, new=os_release)
    pointers = Pointers.initial(os_release)
    store.write_pointers(layout, pointers, "release_change.pointers")
    return pointers


def _sweep(layout: Layout, protected: set[Build]) -> None:
    """Remove what an interrupted transition left: temp files, staging trees, trees
    of builds that are not installed, state-less build directories, orphan
    downloads and anything not named like ours under ``builds/`` and ``downloads/``.
    """
    for entry in store.listdir(layout.state_dir):
        if entry.startswith(fsio.TEMP_PREFIX):
            fsio.remove_tree(layout.state_dir / entry)
    for rel in store.listdir(layout.builds):
        rel_dir = layout.release_dir(rel)
        if not is_valid_release(rel) or not rel_dir.is_dir() or rel_dir.is_symlink():
            fsio.remove_tree(rel_dir)
            continue
        for patch in store.listdir(rel_dir):
            bdir = rel_dir / patch
            if not store.is_patch_name(patch) or not bdir.is_dir() or bdir.is_symlink():
                fsio.remove_tree(bdir)
                continue
            _sweep_build(layout, Build(rel, int(patch)), protected)
        if not store.listdir(rel_dir):
            fsio.remove_tree(rel_dir)
    wanted = {path for b, s in store.list_builds(layout)
              if isinstance(s, Downloading | Downloaded) for path in layout.download(b)}
    for entry in store.listdir(layout.downloads):
        if layout.downloads / entry not in wanted:
            log.info("lifecycle.orphan_removed", path=str(layout.downloads / entry))
            fsio.remove_tree(layout.downloads / entry)


def _sweep_build(layout: Layout, build: Build, protected: set[Build]) -> None:
    bdir = layout.build_dir(build)
    state = store.read_state(layout, build)
    keep = {STATE_FILE} if state is not None else set()
    if isinstance(state, Installed | Bad) or build in protected:
        keep.add(TREE_DIR)
    for entry in store.listdir(bdir):
        if entry not in keep:
            log.info("lifecycle.leftover_removed", path=str(bdir / entry))
            fsio.remove_tree(bdir / entry)
    if not store.listdir(bdir):
        fsio.remove_tree(bdir)
