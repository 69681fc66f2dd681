"""The one owner of ``state.json``, ``pointers.json`` and the ``current`` link (docs/lifecycle.md).

Every change to what is on disk about builds goes through a named transition of
:class:`Lifecycle`, and every transition is in this module; async code asks it what to
do (``decide_start``) and reports what it did (``record_*``). Decisions that need no I/O
are pure functions in ``pointers.py``, one file is read or written by ``store.py``, and
``recovery.py`` opens the store and repairs what a crash left: the writes inside a
transition are ordered so that any prefix of them is a state it repairs. A tree or build
directory a transition drops is only renamed into the trash (``trash.py``): deleting it
takes seconds, and that must not happen under the lock (see :meth:`Lifecycle._unlocked`).

Two bases exist: the OS release ``(os_release, 0)`` whose tree is ``release_dir`` and
which can never be tombstoned (nothing lies below it), and ``(pointers.release, 0)``
which differs only after a full upgrade booted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import structlog

from patchd.core.durable import make_dirs
from patchd.core.errors import (
    IllegalTransition,
    InstallLoop,
    NotBootTarget,
    NotMarkedBad,
    RollbackRefused,
)
from patchd.core.model import (
    Bad,
    BadReason,
    Build,
    Downloaded,
    Downloading,
    Installed,
    State,
    utc_now_text,
)
from patchd.host import process
from patchd.state import recovery, store
from patchd.state.layout import Layout
from patchd.state.pointers import (
    Decision,
    Pointers,
    booting_build,
    choose_next_boot,
    decide_download,
)
from patchd.state.store import FAILPOINTS, WRITE_SITES
from patchd.state.trash import Trash
from patchd.state.view import LifecycleView, locked

__all__ = ["FAILPOINTS", "MAX_INSTALL_ATTEMPTS", "WRITE_SITES", "AliveCheck", "EventHook",
           "Lifecycle", "ValidityCheck"]

log = structlog.get_logger("patchd.state.lifecycle")

#: Install attempts that may start without completing before the build is ``install_loop``.
MAX_INSTALL_ATTEMPTS = 5

EventHook = Callable[[str, Build, str], None]
AliveCheck = Callable[[int, int | None], bool]
ValidityCheck = Callable[[Build, Installed, Path], str | None]


class Lifecycle(LifecycleView):
    """State of every build and the boot pointers of one app; see the module docstring.
    The transitions are here, the queries are inherited from :class:`LifecycleView`.

    Synchronous and quick; one instance per process, guarded by an flock on the state
    directory. Not thread-safe: callers serialise access (one task at a time).
    """

    def __init__(self, layout: Layout, release_dir: Path, os_release: str,
                 pointers: Pointers, lock_fd: int, trash: Trash) -> None:
        super().__init__(layout, release_dir, os_release, pointers)
        self._lock_fd: int | None = lock_fd
        self.on_event: EventHook | None = None
        #: Builds whose install runs now (in a worker thread, outside the lock): from
        #: ``record_install_started`` to ``end_install``. Their directory is the
        #: installer's; a boot success must not clear it between the rename of the
        #: staging tree and ``record_install_complete``.
        self._installing: set[Build] = set()
        #: What transitions drop goes here, to be deleted outside the lock (trash.py).
        self.trash = trash

    # --- opening and closing ---

    @classmethod
    def open(cls, state_dir: Path, cache_dir: Path, release_dir: Path, *,
             keep_trash: bool = False) -> Lifecycle:
        """Lock the state directory, load it and repair whatever a crash left behind
        (see ``recovery.py``). The trees the repair drops are deleted before this
        returns, unless ``keep_trash``: then they stay queued in :attr:`trash` for the
        caller, who must take it over (``trash.set_owner``) and empty it."""
        return recovery.open_lifecycle(cls, Layout(state_dir, cache_dir), release_dir,
                                       keep_trash=keep_trash)

    def close(self) -> None:
        """Release the lock; the object must not be used afterwards."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Lifecycle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- the installer's place (it creates a directory, so it is not in the view) ---

    @locked
    def staging_path(self, build: Build) -> Path:
        """Where the installer builds the tree before renaming it to :meth:`tree_path`.

        Creates ``builds/R/N/`` so the rename stays inside one directory; start-up
        removes any staging tree it finds.
        """
        # Durable: the tree renamed into it must not vanish with it after a power cut.
        make_dirs(self.layout.build_dir(build))
        return self.layout.staging(build)

    # --- download ---

    @locked
    def decide_start(self, build: Build, url: str, sha256: str, size: int) -> Decision:
        """Before a download: fresh, resume, verify, skip the network, or skip the build.

        A downloading file that is already ``size`` long is verified, never resumed with
        a Range at its end (servers answer 416); a file longer than ``size`` or evicted
        by the OS restarts fresh.
        """
        path = self.download_path(build)
        try:
            file_size: int | None = path.stat().st_size
        except FileNotFoundError:
            file_size = None
        decision = decide_download(self.state(build), url, sha256, size, file_size,
                                   self.layout.tree(build).is_dir())
        log.debug("lifecycle.decided", build=str(build), action=decision.action.value,
                  offset=decision.offset)
        return decision

    @locked
    def record_download_started(self, build: Build, url: str, sha256: str, size: int) -> None:
        """A fresh download: remember what is being downloaded before the first byte
        lands, so a restart can resume it; install attempts carry over when the bytes
        are the same.

        Whatever download files the build had are deleted first (the downloader then
        starts from byte 0). A crash between the two steps leaves the old state with no
        file, which :meth:`decide_start` answers with a fresh start again.
        """
        state = self.state(build)
        if (isinstance(state, Bad) and state.bans(sha256)) or (
                isinstance(state, Installed) and self.layout.tree(build).is_dir()):
            raise IllegalTransition(build, state, "start downloading")
        attempts = 0
        if isinstance(state, Downloading | Downloaded) and state.sha256 == sha256:
            attempts = state.attempts
        store.remove_download(self.download_files(build))
        self._write_state(build, Downloading(url, sha256, size, attempts), "download_started")
        log.info("lifecycle.download_started", build=str(build), url=url, size=size)

    @locked
    def record_download_complete(self, build: Build) -> None:
        """The downloader verified the whole file: installs may now skip the network."""
        state = self.state(build)
        if not isinstance(state, Downloading):
            raise IllegalTransition(build, state, "complete a download of")
        if not self.download_path(build).is_file():
            raise IllegalTransition(build, state, "complete a download of", "no file")
        done = Downloaded(state.url, state.sha256, state.size, state.attempts)
        self._write_state(build, done, "download_complete")
        log.info("lifecycle.download_complete", build=str(build), size=state.size)

    # --- install ---

    @locked
    def record_install_started(self, build: Build) -> None:
        """Count an install attempt before it can crash the daemon (loop guard, §3.2).

        A build that already started ``MAX_INSTALL_ATTEMPTS`` installs without finishing
        is marked bad (``install_loop``) and :class:`InstallLoop` is raised. A build with
        no state (a local bundle) has nothing to count on.
        """
        state = self.state(build)
        if isinstance(state, Bad | Installed):
            raise IllegalTransition(build, state, "install")
        if state is None:
            self._installing.add(build)
            log.info("lifecycle.install_started", build=str(build), attempts=None)
            return
        if state.attempts >= MAX_INSTALL_ATTEMPTS:
            detail = f"install started {state.attempts} times without completing"
            self.mark_bad(build, BadReason.INSTALL_LOOP, detail)
            raise InstallLoop(f"build {build}: {detail}; marked bad")
        self._write_state(build, replace(state, attempts=state.attempts + 1), "install_started")
        self._installing.add(build)
        log.info("lifecycle.install_started", build=str(build), attempts=state.attempts + 1)

    @locked
    def record_install_aborted(self, build: Build) -> None:
        """A transient failure ended the install cleanly: that attempt does not count."""
        state = self.state(build)
        if isinstance(state, Downloading | Downloaded) and state.attempts > 0:
            self._write_state(build, replace(state, attempts=state.attempts - 1),
                              "install_aborted")
        log.info("lifecycle.install_aborted", build=str(build))

    @locked
    def end_install(self, build: Build) -> None:
        """The installer is done with the build's directory, however it ended."""
        self._installing.discard(build)

    @locked
    def record_install_complete(self, build: Build, size: int, files: dict[str, str]) -> None:
        """The tree is in place at ``builds/R/N/tree``: the build is installed and its
        download is no longer needed."""
        state = self.state(build)
        if isinstance(state, Bad):
            raise IllegalTransition(build, state, "complete an install of")
        tree = self.layout.tree(build)
        if not tree.is_dir():
            raise IllegalTransition(build, state, "complete an install of", f"{tree} missing")
        self._write_state(build, Installed(size, dict(files)), "install_complete")
        self._installing.discard(build)
        store.remove_download(self.download_files(build))
        self.trash.move(self.layout.staging(build))
        log.info("lifecycle.installed", build=str(build), size=size, files=len(files))

    @locked
    def promote_to_next_boot(self, build: Build) -> None:
        """Make an installed build the one the host boots next (``current`` follows).

        The previous next_boot, if it never booted and nothing protects it, is retired:
        it can never be chosen again by a recompute, so its tree is dead weight.
        """
        if not self._bootable(build):
            raise IllegalTransition(build, self.state(build), "promote",
                                    "only an installed, good build can boot")
        old = self._pointers.next_boot
        if old == build:
            self._sync_current()
            return
        self._write_pointers(replace(self._pointers, next_boot=build), "promote.pointers")
        self._sync_current()
        log.info("lifecycle.promoted", build=str(build), previous=old)
        if not isinstance(self.state(old), Bad) and old not in self._protected():
            self._forget(old)

    # --- boot protocol ---

    @locked
    def record_boot_start(self, build: Build | None, pid: int | None,
                          pid_start: int | None) -> tuple[Build, Path]:
        """The host is about to boot: leave a breadcrumb so a crash is noticed.

        A breadcrumb from an earlier boot whose host has gone is a boot crash first.
        ``build`` None means next_boot, taken atomically with the breadcrumb, so a shell
        launcher never boots one tree and reports another.
        """
        self.detect_boot_crash()
        target = self._pointers.next_boot
        if build is not None and build != target:
            raise NotBootTarget(target, build)
        if pid is not None and pid_start is None:
            pid_start = process.pid_start_time(pid)
        p = replace(self._pointers, currently_booting=target, boot_pid=pid,
                    boot_pid_start=pid_start, boot_started_at=utc_now_text())
        self._write_pointers(p, "boot_start")
        log.info("lifecycle.boot_started", build=str(target), pid=pid)
        return target, self.tree_path(target)

    @locked
    def record_boot_success(self, build: Build | None) -> Build:
        """The host booted: it becomes last_booted and older builds are cleaned up.

        A full upgrade that booted makes its release the base of patches. Older builds
        go (never next_boot or the base, and tombstones keep their state.json); files of
        bad builds that were protected while the host might run them go now. Newer
        downloads are kept.
        """
        booted = booting_build(self._pointers, build)
        previous = self._pointers.last_booted
        self._write_pointers(self._pointers.after_boot(booted), "boot_success")
        log.info("lifecycle.boot_success", build=str(booted), previous=previous)
        self._emit("boot_success", booted, "booted successfully")
        for other, state in self.builds():
            if other == booted or other in self._protected() or other in self._installing:
                continue
            if isinstance(state, Bad) or other.sort_key() < booted.sort_key():
                self.cleanup(other)
        store.remove_unprotected_trees(self.layout, self.trash, self._protected(),
                                       self._installing)
        return booted

    @locked
    def record_boot_failure(self, build: Build | None, reason: BadReason, detail: str) -> Build:
        """The host failed to boot: tombstone first, then clear the breadcrumb, then
        recompute — a crash between the two writes still leaves the build bad.

        The failed tree stays until another build boots (the host may still run it).
        """
        failed = booting_build(self._pointers, build)
        self._tombstone(failed, reason, detail, "boot_failure.tombstone")
        self._write_pointers(self._pointers.without_breadcrumb(), "boot_failure.pointers")
        self.recompute_next_boot()
        self._emit("boot_failure", failed, f"{reason.value}: {detail}")
        store.remove_build_files(self.layout, self.trash, failed, keep_tree=True)
        return failed

    @locked
    def detect_boot_crash(self, is_alive: AliveCheck = process.pid_alive) -> Build | None:
        """A breadcrumb whose host is gone (or was never named) is a boot crash.

        Returns the build marked bad, or None when no boot is recorded or its host still
        runs (the caller then watches the pid).
        """
        p = self._pointers
        if p.currently_booting is None:
            return None
        if p.boot_pid is not None and is_alive(p.boot_pid, p.boot_pid_start):
            return None
        detail = (f"host pid {p.boot_pid} exited before reporting success"
                  if p.boot_pid is not None else "boot started without a pid and never finished")
        log.warning("boot.crash_detected", build=str(p.currently_booting), pid=p.boot_pid)
        return self.record_boot_failure(None, BadReason.BOOT_CRASH, detail)

    # --- validation, recompute, bad builds ---

    @locked
    def validate_next_boot(self, check: ValidityCheck) -> None:
        """Strict mode: re-check next_boot's tree before a boot; a problem marks it bad
        (``validation_failed``) and the fallback is checked in turn."""
        while True:
            build = self._pointers.next_boot
            if build == self._os_base() and not isinstance(self.state(build), Installed):
                return
            state = self.state(build)
            if not isinstance(state, Installed):
                problem: str | None = f"next_boot is {state.name if state else 'unknown'}"
            else:
                problem = check(build, state, self.tree_path(build))
            if problem is None:
                return
            self.mark_bad(build, BadReason.VALIDATION_FAILED, problem)

    @locked
    def recompute_next_boot(self) -> Build:
        """Keep a valid next_boot; else last_booted if installed and good; else a base."""
        chosen = choose_next_boot(self._pointers, self._bootable)
        if chosen != self._pointers.next_boot:
            old = self._pointers.next_boot
            self._write_pointers(replace(self._pointers, next_boot=chosen), "recompute")
            log.info("lifecycle.next_boot_recomputed", build=str(chosen), previous=old)
        self._sync_current()
        return chosen

    @locked
    def mark_bad(self, build: Build, reason: BadReason, detail: str,
                 sha256: str | None = None) -> None:
        """Tombstone a build so it is never downloaded, installed or booted again, then
        drop its files (except a tree the host may be running).

        ``sha256``: only the bundle with these (signed, matching) bytes is banned; a
        manifest naming another sha256 for the build gives it a fresh try. An existing
        tombstone keeps its first reason: that is the cause worth keeping. The OS
        release itself cannot be tombstoned (nothing lies below it); that is logged and
        ignored.
        """
        self._tombstone(build, reason, detail, "mark_bad", sha256)
        self.recompute_next_boot()
        store.remove_build_files(self.layout, self.trash, build,
                                 keep_tree=build in self._protected())

    @locked
    def cleanup(self, build: Build) -> None:
        """State-aware retirement: a bad build keeps only its tombstone, any other build
        is forgotten entirely — but a tree the host may run (last_booted,
        currently_booting, next_boot, or a bad build's tree kept when it failed) stays
        until another build has booted (:meth:`record_boot_success` sweeps it)."""
        if not isinstance(self.state(build), Bad):
            self._forget(build)
        else:  # a tombstone's tree, if any, was kept for a host: it goes at the next boot
            store.remove_build_files(self.layout, self.trash, build, keep_tree=True)

    @locked
    def forget_rolled_back(self, build: Build) -> None:
        """Server rollback: forget the build so a later roll-forward installs again, but
        never lift a local tombstone."""
        log.info("lifecycle.rolled_back", build=str(build))
        self.cleanup(build)
        self.recompute_next_boot()
        self._emit("rollback", build, "rolled back by the server")

    @locked
    def manual_rollback(self) -> Build:
        """Operator rollback: next_boot is marked bad (``manual``); returns the new one."""
        build = self._pointers.next_boot
        if build in (self._os_base(), Build(self._pointers.release, 0)):
            raise RollbackRefused(f"next_boot is {build}, the release itself; "
                                  "there is nothing older to roll back to")
        self.mark_bad(build, BadReason.MANUAL, "rolled back by an operator")
        self._emit("rollback", build, "rolled back by an operator")
        return self._pointers.next_boot

    @locked
    def unmark(self, build: Build) -> Bad:
        """Operator: lift a tombstone. The build is forgotten, so the next check may
        download and install it afresh; a tree kept for a host that may run it stays
        until another build boots. Returns the tombstone lifted."""
        state = self.state(build)
        if not isinstance(state, Bad):
            raise NotMarkedBad(build, state)
        self._forget(build)
        log.warning("lifecycle.unmarked", build=str(build), reason=state.reason.value,
                    detail=state.detail)
        self._emit("unmark", build, f"tombstone lifted by an operator (was "
                                    f"{state.reason.value}: {state.detail})")
        return state

    @locked
    def discard(self, path: Path) -> None:
        """Drop a tree the lifecycle no longer needs (the installer's moved-aside tree):
        moved to the trash at once, deleted outside the lock (see trash.py)."""
        self.trash.move(path)

    # --- internals ---

    def _unlocked(self) -> None:
        """The outermost locked call returned: without an owner, delete the trash now."""
        if not self.trash.owned:
            self.trash.empty()

    def _tombstone(self, build: Build, reason: BadReason, detail: str, site: str,
                   sha256: str | None = None) -> None:
        state = self.state(build)
        if isinstance(state, Bad):
            log.info("lifecycle.already_bad", build=str(build), reason=state.reason.value,
                     new_reason=reason.value)
            return
        if build == self._os_base() and not isinstance(state, Installed):
            log.warning("lifecycle.base_not_marked", build=str(build), reason=reason.value,
                      detail=detail)
            return
        self._write_state(build, Bad(reason, detail, utc_now_text(), sha256), site)
        log.warning(reason.value, build=str(build), detail=detail)

    def _forget(self, build: Build) -> None:
        """Drop the state, recompute if it was next_boot, then the unprotected files."""
        store.remove_state(self.layout, build, "forget")
        if build == self._pointers.next_boot:
            self.recompute_next_boot()
        keep = build in self._protected()
        if keep:
            store.remove_build_files(self.layout, self.trash, build, keep_tree=True)
        else:  # the whole directory in one rename
            store.remove_download(self.download_files(build))
            self.trash.move(self.layout.build_dir(build))
            store.remove_empty_release(self.layout, build.release)
        log.info("lifecycle.forgotten", build=str(build), tree_kept=keep)

    def _emit(self, kind: str, build: Build, message: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, build, message)
        except Exception:  # the hook must never break a transition already on disk
            log.exception("lifecycle.event_hook_failed", type=kind, build=str(build))

    def _write_state(self, build: Build, state: State, site: str) -> None:
        store.write_state(self.layout, build, state, site)

    def _write_pointers(self, pointers: Pointers, site: str) -> None:
        store.write_pointers(self.layout, pointers, site)
        self._pointers = pointers

    def _sync_current(self) -> None:
        """Point ``current`` at next_boot's tree if it does not already."""
        tree = self.tree_path(self._pointers.next_boot)
        target = (str(tree) if tree == self.release_dir
                  else os.path.relpath(tree, self.layout.state_dir))
        store.point_current(self.layout, target, "current_link")

