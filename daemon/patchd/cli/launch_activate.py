"""When ``patchd launch`` restarts the app into a newly installed build (``[activate]``).

A build is *pending* when the daemon's next_boot is not the build the app runs and no
boot is under way. The launcher looks at the status only when something may have
changed: the activity stream returned to idle (an install or update ended), it
reconnected, or the app said it is idle. Then, by policy:

- ``immediate``: now;
- ``idle``: once the app has sent ``PATCHD_IDLE=1`` (and not ``PATCHD_IDLE=0`` since);
- ``window``: at a random point of what is left of the daily window (so a fleet that
  installed together does not restart together), by :class:`Clock`, which a test may
  start at another time (``PATCHD_LAUNCH_NOW``); a wall clock that jumps past the
  window schedules the next one;
- ``next-start``: never while the app runs.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timedelta

import anyio
import structlog

from patchd.cli.launch_daemon import Changes, DaemonLink, build_text
from patchd.config.launch import ActivateSection
from patchd.core.errors import ClientError, UsageError

__all__ = ["Activation", "Clock", "activation_at"]

log = structlog.get_logger("patchd.cli.launch")

Build = dict[str, object]
#: Longest sleep before the wall clock is read again (it may jump).
_RECHECK = 300.0


class Clock:
    """Local wall-clock time; ``PATCHD_LAUNCH_NOW`` (ISO 8601) starts it elsewhere, and
    it then advances with the real clock (tests of activation windows)."""

    def __init__(self, start: str | None = None) -> None:
        self._offset = timedelta(0)
        if start:
            try:
                then = datetime.fromisoformat(start).astimezone()
            except ValueError:
                raise UsageError(f"PATCHD_LAUNCH_NOW must be an ISO 8601 time, got {start!r}"
                                 ) from None
            self._offset = then - datetime.now().astimezone()

    def __repr__(self) -> str:
        return f"<Clock offset={self._offset}>"

    @classmethod
    def from_environment(cls) -> Clock:
        return cls(os.environ.get("PATCHD_LAUNCH_NOW"))

    def now(self) -> datetime:
        return datetime.now().astimezone() + self._offset


def activation_at(activate: ActivateSection, now: datetime,
                  rng: random.Random | None = None) -> datetime | None:
    """When a build pending at ``now`` replaces the running one under ``immediate`` or
    ``window`` (None for ``next-start`` and ``idle``, which wait for an event)."""
    if activate.policy == "immediate":
        return now
    if activate.policy != "window":
        return None
    opens, closes = activate.next_window(now)
    start = max(opens, now)
    spread = (closes - start).total_seconds()
    return start + timedelta(seconds=(rng or random.Random()).uniform(0, spread))


class Activation:
    """The launcher's view of pending builds; :meth:`due` returns when to restart."""

    def __init__(self, activate: ActivateSection, link: DaemonLink, clock: Clock) -> None:
        self.activate = activate
        self.link = link
        self.clock = clock
        #: Bumped on every possible change: activity back to idle, idle reports.
        self.changes = Changes()
        self.app_idle = False

    def __repr__(self) -> str:
        return f"<Activation {self.activate.policy} idle={self.app_idle}>"

    def app_reports_idle(self, idle: bool) -> None:
        self.app_idle = idle
        self.changes.bump()

    async def due(self, running: Build) -> None:
        """Return when a pending build should replace ``running``."""
        policy = self.activate.policy
        announced: Build | None = None
        scheduled: tuple[datetime, datetime, datetime] | None = None  # at, opens, closes
        while True:
            seen = self.changes.version
            pending = await self._pending(running)
            log.debug("activation.looked", running=build_text(running),
                      pending=build_text(pending), version=seen)
            if pending is None:
                announced = scheduled = None
                await self.changes.wait(seen)
                continue
            if policy == "immediate" or (policy == "idle" and self.app_idle):
                return
            if policy == "window":
                while True:  # on the clock alone; a change reads the status again
                    now = self.clock.now()
                    if scheduled is not None and not now < scheduled[2]:
                        scheduled = None  # the window passed (the clock jumped): the next
                    if scheduled is None:
                        at = activation_at(self.activate, now)
                        assert at is not None
                        scheduled = (at, *self.activate.next_window(now))
                        log.info("activation.scheduled", build=build_text(pending),
                                 at=at.isoformat(), window=self.activate.window)
                    if scheduled[0] <= now and scheduled[1] <= now:
                        return
                    if await self._until(scheduled[0], seen):
                        break
                continue
            if pending != announced:
                announced = pending
                log.info("activation.pending", build=build_text(pending), policy=policy,
                         waiting_for="the app to report idle (PATCHD_IDLE=1)"
                         if policy == "idle" else "the next start")
            await self.changes.wait(seen)

    async def _until(self, when: datetime, seen: int) -> bool:
        """Sleep until ``when`` (at most :data:`_RECHECK` at a time: the wall clock may
        jump); True if a change came first."""
        left = (when - self.clock.now()).total_seconds()
        with anyio.move_on_after(min(max(left, 0.0), _RECHECK)):
            await self.changes.wait(seen)
            return True
        return False

    async def _pending(self, running: Build) -> Build | None:
        try:
            status = await self.link.call("GetStatus")
        except ClientError as exc:
            log.info("launch.status_unavailable", error=str(exc))
            return None
        nb = status.get("next_boot")
        if nb == running or status.get("currently_booting") is not None:
            return None
        return nb if isinstance(nb, dict) else None
