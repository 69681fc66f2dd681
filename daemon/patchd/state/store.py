"""The records under a :class:`~patchd.state.layout.Layout`, one file at a time.

Reading ``state.json`` and ``pointers.json``, writing them, pointing ``current`` and
removing a build's files (its directories into the lifecycle's ``trash.py``, so that no
transition deletes a tree under the lock). Nothing here decides what to write, when, or which builds
must keep their tree: that is the lifecycle's (``lifecycle.py`` for the transitions,
``recovery.py`` at start-up), and only those two modules call this one.

Every write is atomic and durable (``patchd.core.fsio``) and is bracketed by the
failpoints ``SITE.before`` and ``SITE.after``, ``SITE`` being the caller's write site
(one of :data:`WRITE_SITES`), so the crash tests can stop the process on either side of
each write.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from patchd.core import fsio
from patchd.core.durable import make_dirs
from patchd.core.model import Build, Installed, State, is_valid_release, state_from_json
from patchd.host.process import failpoint
from patchd.state.layout import OLD_TREE_PREFIX, STATE_FILE, TREE_DIR, DownloadFiles, Layout
from patchd.state.pointers import Pointers
from patchd.state.trash import Trash

log = structlog.get_logger("patchd.state.store")

#: Every place a state file, the pointers or the link is written; a failpoint fires
#: just before (``SITE.before``) and just after (``SITE.after``) each write.
WRITE_SITES = (
    "release_change.pointers",
    "open.pointers",
    "download_started",
    "download_complete",
    "install_started",
    "install_aborted",
    "install_complete",
    "promote.pointers",
    "current_link",
    "boot_start",
    "boot_success",
    "boot_failure.tombstone",
    "boot_failure.pointers",
    "mark_bad",
    "forget",
    "recompute",
)
FAILPOINTS: tuple[str, ...] = tuple(f"{s}.{w}" for s in WRITE_SITES for w in ("before", "after"))


# --- names found on disk -----------------------------------------------------------------


def listdir(path: Path) -> list[str]:
    """Sorted entries of ``path``; none when it is absent or not a directory."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_patch_name(name: str) -> bool:
    """``builds/R/N``: N is a patch number written the one canonical way."""
    return name.isascii() and name.isdigit() and str(int(name)) == name


# --- reading -----------------------------------------------------------------------------


def read_state(layout: Layout, build: Build) -> State | None:
    """The build's state, or None when absent or corrupt (logged ``state.corrupt``)."""
    path = layout.state_file(build)
    raw = fsio.read_json(path)
    if raw is None:
        return None
    try:
        return state_from_json(raw)
    except ValueError as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc))
        return None


def read_pointers(layout: Layout) -> Pointers | None:
    """``pointers.json``, or None when absent or corrupt (logged ``state.corrupt``)."""
    path = layout.pointers
    raw = fsio.read_json(path)
    if raw is None:
        return None
    try:
        return Pointers.from_json(raw)
    except ValueError as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc))
        return None


def list_builds(layout: Layout) -> list[tuple[Build, State]]:
    """Every build with a readable state, oldest first."""
    found: list[tuple[Build, State]] = []
    for rel in listdir(layout.builds):
        if not is_valid_release(rel):
            continue
        for patch in listdir(layout.release_dir(rel)):
            if is_patch_name(patch):
                build = Build(rel, int(patch))
                state = read_state(layout, build)
                if state is not None:
                    found.append((build, state))
    return sorted(found, key=lambda item: item[0].sort_key())


# --- writing -----------------------------------------------------------------------------


def write_state(layout: Layout, build: Build, state: State, site: str) -> None:
    path = layout.state_file(build)
    make_dirs(path.parent)  # a state file is durable only if its directory is
    failpoint(f"{site}.before")
    fsio.atomic_write_json(path, state.to_json())
    failpoint(f"{site}.after")


def remove_state(layout: Layout, build: Build, site: str) -> None:
    """Delete the build's ``state.json`` durably (nothing to do when there is none)."""
    path = layout.state_file(build)
    if path.exists():
        failpoint(f"{site}.before")
        path.unlink()
        fsio.fsync_dir(path.parent)
        failpoint(f"{site}.after")


def write_pointers(layout: Layout, pointers: Pointers, site: str) -> None:
    failpoint(f"{site}.before")
    fsio.atomic_write_json(layout.pointers, pointers.to_json())
    failpoint(f"{site}.after")


def point_current(layout: Layout, target: str, site: str) -> None:
    """Make ``current`` a link to ``target`` unless it already is one."""
    link = layout.current
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    if link.is_dir() and not link.is_symlink():
        fsio.remove_tree(link)
    failpoint(f"{site}.before")
    fsio.replace_symlink(link, target)
    failpoint(f"{site}.after")


# --- removing ----------------------------------------------------------------------------


def remove_download(files: DownloadFiles) -> None:
    """Both files: the meta outlives the download when a crash came between the
    downloader's last two steps."""
    for path in files:
        fsio.remove_tree(path)


def remove_build_files(layout: Layout, trash: Trash, build: Build, *,
                       keep_tree: bool) -> None:
    """The build's download and everything in ``builds/R/N`` but its state (and its
    tree when ``keep_tree``); directories go to the ``trash``."""
    remove_download(layout.download(build))
    bdir = layout.build_dir(build)
    for entry in listdir(bdir):
        if entry == STATE_FILE or (keep_tree and entry == TREE_DIR):
            continue
        trash.move(bdir / entry)


def remove_empty_release(layout: Layout, release: str) -> None:
    rel_dir = layout.release_dir(release)
    if rel_dir.is_dir() and not listdir(rel_dir):
        with contextlib.suppress(OSError):
            rel_dir.rmdir()


def remove_unprotected_trees(layout: Layout, trash: Trash, protected: set[Build],
                             installing: set[Build]) -> None:
    """After a boot, trees kept only because a host might run them can go (to the
    ``trash``): those of builds no longer protected that are not installed (forgotten,
    bad, or being downloaded again after a rollback), and old trees a reinstall moved
    aside (the host has just booted the tree that replaced them). The directory of a
    build being ``installing`` is the installer's: its new tree is in place but not yet
    recorded. Names that are not releases (the trash itself) are not looked into."""
    for rel in listdir(layout.builds):
        if not is_valid_release(rel):
            continue
        for patch in listdir(layout.release_dir(rel)):
            if not is_patch_name(patch):
                continue
            build = Build(rel, int(patch))
            if build in installing:
                continue
            bdir = layout.build_dir(build)
            for entry in listdir(bdir):
                if entry.startswith(OLD_TREE_PREFIX):
                    trash.move(bdir / entry)
            state = read_state(layout, build)
            if build in protected or isinstance(state, Installed):
                continue
            trash.move(bdir if state is None else layout.tree(build))
        remove_empty_release(layout, rel)
