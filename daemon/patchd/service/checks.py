"""Checking for updates: on the poll schedule, and when an operator asks (``CheckNow``).

A check reads the manifest, forgets builds the server rolled back, and decides; the
decided update then runs as the job runner's background job. A decision for another
build than the one being downloaded (rolled back or superseded) cancels that update
first. Every failure is recorded once, with its class, for ``status`` and STATUS=.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from patchd.core.errors import (
    BadInputError,
    ConfigError,
    PatchdError,
    TransientError,
    UnexpectedError,
)
from patchd.core.model import utc_now_text
from patchd.core.text import printable
from patchd.fetch.sources import Source
from patchd.service.activity import Activity
from patchd.service.jobs import Job, JobRunner
from patchd.service.schedule import backoff_delay, first_check_delay, in_seconds, jittered
from patchd.service.supervise import take_fault
from patchd.service.updater import Updater
from patchd.trust import Decision

if TYPE_CHECKING:
    from patchd.config import Config

__all__ = ["Checker"]

log = structlog.get_logger("patchd.service.checks")


class Checker:
    """The poll loop and manual checks of one app."""

    def __init__(self, updater: Updater, runner: JobRunner, source: Callable[[], Source],
                 config: Callable[[], Config], on_change: Callable[[], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self.updater = updater
        self.runner = runner
        self._source = source
        self._config = config
        self._on_change = on_change
        self._on_error = on_error
        self._wake = anyio.Event()
        #: Seconds to the next check asked for since the loop last slept (0: now).
        self._soon: float | None = None
        #: Transient failures in a row, of checks and of updates, for the backoff.
        self.failures = 0
        #: The update the last check left running (started or kept), for the poll loop.
        self.update_job: Job | None = None
        self.last_check: str | None = None
        #: When the last check began, whatever its outcome (``last_check``: succeeded).
        self.last_attempt: str | None = None
        self.next_check: str | None = None
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return (f"<Checker last={self.last_check} next={self.next_check} "
                f"error={self.last_error!r}>")

    def wake(self) -> None:
        """Check now instead of at the scheduled time (a config reload)."""
        self._retry_in(0.0)

    def _retry_in(self, delay: float) -> None:
        """Bring the next check forward to ``delay`` seconds from now (never later)."""
        self._soon = delay if self._soon is None else min(self._soon, delay)
        self._wake.set()

    def _backoff(self, error: BaseException) -> float:
        """Count a transient failure; the delay before the next try."""
        self.failures += 1
        interval = self._config().server.poll_interval
        delay = backoff_delay(self.failures, interval)
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            delay = max(delay, min(retry_after, interval))
        log.info("check.retry_scheduled", in_seconds=round(delay, 1), failures=self.failures)
        return delay

    async def check_now(self) -> Decision:
        """Check and start the decided update in the background; joins a running check."""
        return await self.runner.check(self._check)

    async def _check(self) -> Decision:
        self.last_attempt = utc_now_text()
        try:
            take_fault("check")
            manifest = await self.updater.fetch_verified(self._source())
            forgotten = self.updater.apply_rollbacks(manifest)
            decision = self.updater.decide(manifest)
        except PatchdError as exc:
            self.record_error(exc)
            if isinstance(exc, TransientError):
                # Whoever asked (the poll loop or an operator's CheckNow), a transient
                # failure is retried on the backoff schedule, not at the next poll.
                self._retry_in(self._backoff(exc))
            raise
        except Exception as exc:
            # A bug, or a parser that let a RecursionError out: still logged once with
            # its class and recorded, and the caller gets a PatchdError naming it.
            self.record_error(exc)
            raise UnexpectedError.wrapping(exc) from exc
        self.last_check = utc_now_text()
        running = self.runner.job
        if running is not None and running.kind == "update" and (
                running.build in forgotten or decision.build != running.build):
            log.warning("update.superseded", building=str(running.build),
                        decided=str(decision))
            await self.runner.cancel()
        hold = self.updater.hold  # a held host decides, logs it and does nothing
        if decision.kind != "none" and decision.build is not None and self.runner.job is None \
                and hold is None:
            size = decision.bundle.size if decision.bundle else 0
            self.runner.start("update", decision.build, self._update(decision),
                              Activity("downloading", decision.build, 0, size))
        running = self.runner.job
        self.update_job = running if running is not None and running.kind == "update" else None
        if self.update_job is None:
            # Nothing left to do: this check is the latest outcome. An update it left
            # running reports its own (success clears the error, failure records it).
            self.last_error = None
        log.info("check.held" if hold is not None and decision.build is not None
                 else "check.decided", strategy=decision.kind,
                 build=str(decision.build) if decision.build else None)
        self._on_change()
        return decision

    def _update(self, decision: Decision) -> Callable[[Job], Awaitable[None]]:
        async def run(job: Job) -> None:
            assert decision.build is not None
            with structlog.contextvars.bound_contextvars(
                    release=decision.build.release, patch=decision.build.patch):
                try:
                    await self.updater.perform(decision, self._source(), job)
                    self.last_error = None
                    self.failures = 0
                except Exception as exc:
                    self.record_error(exc)
                    if isinstance(exc, TransientError):
                        # Whoever started the update (the poll loop or CheckNow), a
                        # transport fault is retried with backoff, not at the next poll.
                        self._retry_in(self._backoff(exc))
                    raise
        return run

    def record_error(self, exc: BaseException) -> None:
        self.last_error = printable(f"{type(exc).__name__}: {exc}")
        event = exc.bad_reason if isinstance(exc, BadInputError) else "check.failed"
        kind = ("transient" if isinstance(exc, TransientError) else
                "bad_input" if isinstance(exc, BadInputError) else
                "config" if isinstance(exc, ConfigError) else "error")
        if isinstance(exc, TransientError):
            # Retried on its own with backoff: a network outage is a normal flow, and
            # `journalctl -p err` must not page anyone for it (docs/operations.md).
            log.warning(event, error=str(exc), error_class=type(exc).__name__, kind=kind)
        elif isinstance(exc, PatchdError):
            log.error(event, error=str(exc), error_class=type(exc).__name__, kind=kind)
        else:
            log.error(event, error=str(exc), error_class=type(exc).__name__, kind=kind,
                      exc_info=exc)
        self._on_error(exc)

    async def poll_loop(self) -> None:
        """Check on schedule; back off after transient failures; never stop."""
        delay = first_check_delay()
        while True:
            await self._sleep(delay)
            await self.runner.wait_check_allowed()
            error: BaseException | None = None
            try:
                await self.check_now()
                job = self.update_job
                if job is not None:
                    await job.done.wait()
                    error = job.error
            except Exception as exc:
                error = exc  # a transient one was counted and scheduled by the check
            interval = self._config().server.poll_interval
            if isinstance(error, TransientError):
                # Counted and scheduled where it happened (the check, or the update
                # task): the retry it asked for wakes the sleep below.
                delay = interval
            else:
                self.failures = 0
                delay = jittered(interval, self._config().server.poll_jitter)

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when a wake or a retry brings it forward."""
        deadline = anyio.current_time() + delay
        while True:
            self.next_check = in_seconds(max(0.0, deadline - anyio.current_time()))
            with anyio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = anyio.Event()
            soon, self._soon = self._soon, None
            if soon is None:
                return  # the deadline passed
            deadline = min(deadline, anyio.current_time() + soon)
            if deadline <= anyio.current_time():
                return
