"""The read side of the lifecycle: what is on disk about builds, never changing it.

:class:`~patchd.state.lifecycle.Lifecycle` extends :class:`LifecycleView` with the
transitions; code that only looks (status, the boot target, the updater's questions)
reads through these queries, and recovery checks what it may promote with them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from patchd.core.model import Bad, Build, Installed, State
from patchd.state import store
from patchd.state.layout import DownloadFiles, Layout
from patchd.state.pointers import Pointers, boot_elapsed, protected_builds

__all__ = ["LifecycleView"]

_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """Run a method under the store's lock (see ``LifecycleView.lock``); once the
    outermost such call of a thread has released it, :meth:`LifecycleView._unlocked`
    runs (the lifecycle deletes its trash there, outside the lock)."""

    @functools.wraps(method)
    def wrapper(self: LifecycleView, *args: Any, **kwargs: Any) -> Any:
        outermost = False
        try:
            with self.lock:
                self._depth += 1  # only the thread holding the lock changes it
                try:
                    return method(self, *args, **kwargs)
                finally:
                    self._depth -= 1
                    outermost = self._depth == 0
        finally:
            if outermost:
                self._unlocked()

    return cast(_F, wrapper)


class LifecycleView:
    """The builds and boot pointers of one app, as the lifecycle keeps them."""

    def __init__(self, layout: Layout, release_dir: Path, os_release: str,
                 pointers: Pointers) -> None:
        self.layout = layout
        self.release_dir = release_dir
        self.os_release = os_release
        self._pointers = pointers
        #: Transitions run from the event loop and from the installer's worker thread;
        #: each takes this (reentrant) lock so read-modify-write of pointers never races.
        self.lock = threading.RLock()
        #: How deep the thread holding ``lock`` is in ``@locked`` calls.
        self._depth = 0

    def __repr__(self) -> str:
        p = self._pointers
        builds = ", ".join(f"{b}:{s.name}" for b, s in self.builds())
        booting = f" booting={p.currently_booting} pid={p.boot_pid}" if p.currently_booting else ""
        return (f"<{type(self).__name__} {self.state_dir} release={p.release} "
                f"os_release={self.os_release} next_boot={p.next_boot} "
                f"last_booted={p.last_booted}{booting} [{builds}]>")

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    @property
    def cache_dir(self) -> Path:
        return self.layout.cache_dir

    @property
    def release(self) -> str:
        """The last release that booted successfully: the base of patches."""
        return self._pointers.release

    @property
    def pointers(self) -> Pointers:
        return self._pointers

    def state(self, build: Build) -> State | None:
        """The build's state, or None when unknown (never seen, forgotten or corrupt)."""
        return store.read_state(self.layout, build)

    def builds(self) -> list[tuple[Build, State]]:
        """Every build with a readable state, oldest first."""
        return store.list_builds(self.layout)

    def bad_builds(self) -> set[Build]:
        return {b for b, s in self.builds() if isinstance(s, Bad)}

    def tree_path(self, build: Build) -> Path:
        """Where the build's tree is: release_dir for the OS release unless a full
        bundle installed that release under ``builds/R/0/tree``."""
        if build == self._os_base() and not isinstance(self.state(build), Installed):
            return self.release_dir
        return self.layout.tree(build)

    def download_files(self, build: Build) -> DownloadFiles:
        """Where the downloader keeps the build's bundle and its companion ``.meta``.

        The downloader writes them; only the lifecycle deletes them (a fresh
        ``record_download_started``, an install, a retirement, start-up).
        """
        return self.layout.download(build)

    def download_path(self, build: Build) -> Path:
        """The bundle itself: ``download_files(build).data``."""
        return self.layout.download(build).data

    @locked
    def boot_target(self) -> tuple[Build, Path]:
        """What the host should boot now: next_boot and its tree."""
        build = self._pointers.next_boot
        return build, self.tree_path(build)

    def boot_elapsed(self, now: datetime) -> float | None:
        """Seconds the recorded boot has been running, or None when none is recorded.

        The supervisor's boot timeout counts from here after a restart, so a host
        that hangs across a daemon restart still times out on schedule.
        """
        return boot_elapsed(self._pointers, now)

    def _unlocked(self) -> None:
        """After the outermost ``@locked`` call; reading leaves nothing to do."""

    # --- the rules the transitions share ---

    def _os_base(self) -> Build:
        return Build(self.os_release, 0)

    def _protected(self) -> set[Build]:
        """Builds whose tree must stay: the host may run it, or it is a base."""
        return protected_builds(self._pointers, self.os_release)

    def _bootable(self, build: Build) -> bool:
        state = self.state(build)
        if isinstance(state, Bad):
            return False
        if isinstance(state, Installed):
            return self.layout.tree(build).is_dir()
        return build == self._os_base()
