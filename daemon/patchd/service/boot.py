"""The boot keeper: which tree the host boots, and what became of each boot.

Everything about a boot lives here: answering the boot target (fast, from memory, on
the hot path of every host start), recording BootStart/Success/Failure through the
lifecycle, watching the booting process's pid so a crash before BootSuccess is seen
at once, and the boot timeout, which keeps counting across a daemon restart. Boots are
not jobs of the runner: a host report must never wait behind a download. Nor does the
event loop ever wait here for the lifecycle lock: worker threads take it (or it is
tried without blocking), and strict verification hashes without it (``strict.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from patchd.core.model import BadReason, Build, Installed
from patchd.host import process
from patchd.service.strict import StrictVerifier, Verdict
from patchd.state.lifecycle import Lifecycle

if TYPE_CHECKING:
    from patchd.config import Config

__all__ = ["BootKeeper", "wait_pid_exit"]

log = structlog.get_logger("patchd.service.boot")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Report:
    """A BootStart: the build the host names (None: next_boot) and its pid."""

    build: Build | None
    pid: int | None
    pid_start: int | None


class _Unverified(Exception):
    """Strict mode met a next_boot with no fresh verdict while holding the lock."""

    def __init__(self, build: Build) -> None:
        super().__init__(str(build))
        self.build = build


class BootKeeper:
    """The boot protocol for one app, over its lifecycle."""

    def __init__(self, lifecycle: Lifecycle, config: Callable[[], Config],
                 on_change: Callable[[], None]) -> None:
        self.lifecycle = lifecycle
        self._config = config
        self._on_change = on_change
        self._tg: TaskGroup | None = None
        self._watch_scope: anyio.CancelScope | None = None
        #: The last boot target and the pointers object it was computed from.
        self._cached: tuple[object, tuple[Build, Path]] | None = None
        #: Strict mode's verifications: off the lock, shared, kept until a tree changes.
        self.verifier = StrictVerifier(lifecycle)
        #: Set by a worker thread that recorded a boot crash; the event loop wakes the sender.
        self._changed = threading.Event()

    def __repr__(self) -> str:
        p = self.lifecycle.pointers
        return (f"<BootKeeper next_boot={p.next_boot} booting={p.currently_booting} "
                f"watching={self._watch_scope is not None}>")

    def attach(self, tg: TaskGroup) -> None:
        """The task group that owns the pid watch, the timeout and strict verifications
        (the daemon's)."""
        self._tg = tg
        self.verifier.attach(tg)

    # --- the target ----------------------------------------------------------------

    async def target(self) -> tuple[Build, Path]:
        """The build and tree to boot now, for anyone on the socket: it changes nothing.

        A read-only caller must never change boot state, so a breadcrumb is not judged
        here (BootStart, the pid watch, the timeout and start-up do that). Without
        ``verify = "strict"`` the answer is in memory: it is cached against the pointers
        object it came from (the lifecycle replaces that object on every write); the
        worker thread is only for a lock held by another thread. With it, see
        :meth:`_strict`.
        """
        lc = self.lifecycle
        if self._config().trust.verify == "strict":
            return await self._strict(None)
        pointers = lc.pointers
        cached = self._cached
        if cached is not None and cached[0] is pointers:
            return cached[1]
        if lc.lock.acquire(blocking=False):
            try:
                pointers = lc.pointers
                answer = lc.boot_target()
                self._cached = (pointers, answer)
                return answer
            finally:
                lc.lock.release()
        return await anyio.to_thread.run_sync(self._read_target)

    def _read_target(self) -> tuple[Build, Path]:
        with self.lifecycle.lock:
            return self.lifecycle.boot_target()

    async def _strict(self, report: _Report | None) -> tuple[Build, Path]:
        """Strict mode: verify next_boot without the lifecycle lock (one verification
        shared by every request, kept until the tree changes: ``service/strict.py``),
        then take the lock only to act on the verdicts: a problem marks the build bad
        (``validation_failed``) and its fallback is verified in turn; BootStart
        (``report``) records the boot of the very build that was verified.

        A read-only caller whose next_boot passed is answered without the lock at all.
        """
        verdicts: dict[Build, Verdict] = {}
        while True:
            build = self.lifecycle.pointers.next_boot
            verdict = verdicts.get(build)
            if verdict is None:
                verdicts[build] = await self.verifier.verify(build)
                continue  # next_boot may have moved meanwhile
            if report is None and verdict.problem is None:
                return build, verdict.tree
            answer = await anyio.to_thread.run_sync(self._settle, verdicts, report)
            if isinstance(answer, Build):
                del verdicts[answer]  # changed since it was verified: verify it again
                continue
            if answer is not None:
                return answer

    def _settle(self, verdicts: dict[Build, Verdict] | None,
                report: _Report | None) -> tuple[Build, Path] | Build | None:
        """Under the lock, in a worker thread: judge a stale breadcrumb (BootStart only),
        act on the strict ``verdicts`` (None: not strict), then record the boot or name
        the target. A Build: it has no fresh verdict yet; None: nothing to answer (the
        caller looks again)."""
        lc = self.lifecycle
        with lc.lock:
            if report is not None and lc.detect_boot_crash() is not None:
                self._changed.set()
            if verdicts is not None:
                def check(build: Build, state: Installed, tree: Path) -> str | None:
                    verdict = verdicts.get(build)
                    if verdict is None or verdict.state != state or verdict.tree != tree:
                        raise _Unverified(build)
                    return verdict.problem

                try:
                    lc.validate_next_boot(check)
                except _Unverified as exc:
                    return exc.build if exc.build in verdicts else None
            if report is None:
                return lc.boot_target()
            return lc.record_boot_start(report.build, report.pid, report.pid_start)

    # --- reports -------------------------------------------------------------------

    async def start(self, build: Build | None, pid: int | None) -> tuple[Build, Path]:
        """``BootStart``: leave the breadcrumb, then watch the host until it reports.

        A stale breadcrumb is judged first; in strict mode next_boot is verified (off
        the lock) and exactly the verified build is recorded as booting.
        """
        pid_start = process.pid_start_time(pid) if pid is not None else None
        report = _Report(build, pid, pid_start)
        try:
            if self._config().trust.verify == "strict":
                booted, path = await self._strict(report)
            else:
                answer = await anyio.to_thread.run_sync(self._settle, None, report)
                assert isinstance(answer, tuple)
                booted, path = answer
        finally:
            self._report_changes()
        self._watch(booted, pid, resumed=False)
        log.info("boot.started", release=booted.release, patch=booted.patch, pid=pid)
        return booted, path

    async def success(self, build: Build | None) -> Build:
        """``BootSuccess``: the build becomes last_booted; older builds are cleaned up
        (in a worker thread: that removes trees)."""
        booted = await anyio.to_thread.run_sync(self._locked, self.lifecycle.record_boot_success,
                                                build)
        self._finished()
        log.info("boot.success", release=booted.release, patch=booted.patch)
        return booted

    async def failure(self, build: Build | None, reason: str | None) -> Build:
        """``BootFailure``: the build is tombstoned and the host falls back."""
        failed = await anyio.to_thread.run_sync(
            self._locked, self.lifecycle.record_boot_failure, build, BadReason.BOOT_FAILURE,
            reason or "reported by the host")
        self._finished()
        log.warning("boot.failure_reported", release=failed.release, patch=failed.patch,
                    reason=reason)
        return failed

    def _locked(self, transition: Callable[..., _T], *args: Any) -> _T:
        """A lifecycle call under the lock; run in a worker thread, so the event loop
        never waits for a lock another thread holds during file work."""
        with self.lifecycle.lock:
            return transition(*args)

    def _report_changes(self) -> None:
        """Wake the event sender if a worker thread recorded a boot crash (on the loop)."""
        if self._changed.is_set():
            self._changed.clear()
            self._on_change()

    async def resume(self) -> None:
        """At start-up: a breadcrumb whose pid is gone is a crash; a live one is watched."""
        await anyio.to_thread.run_sync(self._locked, self.lifecycle.detect_boot_crash)
        p = self.lifecycle.pointers
        if p.currently_booting is not None:
            self._watch(p.currently_booting, p.boot_pid, resumed=True)

    # --- watching ------------------------------------------------------------------

    def _finished(self) -> None:
        self._stop_watch()
        self._on_change()

    def _stop_watch(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            self._watch_scope = None

    def _watch(self, build: Build, pid: int | None, resumed: bool) -> None:
        """Watch the booting host: its exit before BootSuccess is a crash; and the timeout.

        ``resumed``: the boot began before this daemon started (a restart mid-boot).
        """
        self._stop_watch()
        if self._tg is None:
            return
        scope = anyio.CancelScope()
        self._watch_scope = scope
        self._tg.start_soon(self._watch_boot, build, pid, scope, resumed)

    async def _watch_boot(self, build: Build, pid: int | None, scope: anyio.CancelScope,
                          resumed: bool) -> None:
        config = self._config()
        timeout = config.boot.timeout or None
        elapsed = self.lifecycle.boot_elapsed(datetime.now(UTC))
        if resumed and timeout is not None and elapsed is not None:
            # After a daemon restart the boot has been running for a while already;
            # boot_started_at has whole seconds, so count one less, never fire early.
            timeout = max(0.0, timeout - max(0.0, elapsed - 1))
        with scope:
            with anyio.move_on_after(timeout) as timer:
                if pid is not None and config.boot.watch_pid:
                    await wait_pid_exit(pid)
                    crashed = await anyio.to_thread.run_sync(self._locked,
                                                             self.lifecycle.detect_boot_crash)
                    if crashed is not None:  # the lifecycle logged it (boot_crash)
                        self._on_change()
                    return
                await anyio.sleep_forever()
            if timer.cancelled_caught:
                await anyio.to_thread.run_sync(
                    self._time_out, build, f"no BootSuccess within {config.boot.timeout:g} s")
                self._on_change()

    def _time_out(self, build: Build, detail: str) -> None:
        with self.lifecycle.lock:
            if self.lifecycle.pointers.currently_booting == build:
                self.lifecycle.record_boot_failure(build, BadReason.BOOT_TIMEOUT, detail)


async def wait_pid_exit(pid: int) -> None:
    """Return when process ``pid`` exits, without polling (a pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OverflowError, ValueError):
        return  # gone, or a number no process can have: either way it is not running
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
