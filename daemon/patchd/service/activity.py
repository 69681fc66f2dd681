"""What the daemon is doing right now, for ``GetStatus``, ``WatchActivity`` and ``STATUS=``.

Watchers wait on a change instead of polling: each change replaces an ``anyio.Event``,
so an idle daemon with many ``patchd watch`` clients costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from patchd.core.model import Build

PHASES = ("idle", "checking", "downloading", "installing")


@dataclass(frozen=True)
class Activity:
    phase: str = "idle"
    build: Build | None = None
    done: int = 0
    total: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "build": self.build.to_json() if self.build else None,
                "done": self.done, "total": self.total}

    def summary(self) -> str:
        """The one-line ``STATUS=`` text, e.g. ``downloading 1.4.0+3: 37%``."""
        if self.phase == "idle" or self.build is None:
            return self.phase
        if self.total:
            return f"{self.phase} {self.build}: {100 * self.done // self.total}%"
        return f"{self.phase} {self.build}"


class ActivityBoard:
    """Holds the current :class:`Activity`; must be updated from the event loop thread."""

    def __init__(self) -> None:
        self.current = Activity()
        self.version = 0
        self._changed = anyio.Event()
        self.listeners: list[Callable[[Activity], None]] = []

    def __repr__(self) -> str:
        return f"<ActivityBoard v{self.version} {self.current.summary()}>"

    def set(self, phase: str, build: Build | None = None, done: int = 0, total: int = 0) -> None:
        self._publish(Activity(phase, build, done, total))

    def progress(self, done: int, total: int) -> None:
        self._publish(replace(self.current, done=done, total=total))

    def idle(self) -> None:
        self._publish(Activity())

    def _publish(self, activity: Activity) -> None:
        if activity == self.current:
            return
        self.current = activity
        self.version += 1
        self._changed.set()
        self._changed = anyio.Event()
        for listener in self.listeners:
            listener(activity)

    async def wait_change(self, seen_version: int) -> tuple[int, Activity]:
        """Return as soon as the version differs from ``seen_version``."""
        while self.version == seen_version:
            await self._changed.wait()
        return self.version, self.current
