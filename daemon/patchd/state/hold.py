"""``hold.json``: the operator's hold on this host (``patchd hold``, ``install --hold``).

A held host keeps checking and reporting but changes nothing by itself: the service
reads :func:`read_hold` at start and asks the updater before each install. The file
exists exactly while the host is held; placing and lifting it are atomic, durable
writes, so a hold survives restarts and power cuts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import structlog

from patchd.core import fsio
from patchd.core.model import MAX_HOLD_REASON
from patchd.state.layout import Layout

__all__ = ["Hold", "read_hold", "remove_hold", "write_hold"]

log = structlog.get_logger("patchd.state.hold")


@dataclass(frozen=True, slots=True)
class Hold:
    """Why and since when (UTC) the host is held; ``reason`` may be empty."""

    reason: str
    since: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since}

    def __str__(self) -> str:
        return f"held since {self.since}" + (f": {self.reason}" if self.reason else "")


def read_hold(layout: Layout) -> Hold | None:
    """The hold, or None when the host is not held.

    A file that does not parse still holds the host (with a reason saying so): the
    safe reading of a damaged hold is "held", never "install everything".
    """
    if not layout.hold.exists():
        return None
    doc = fsio.read_json(layout.hold)
    if not isinstance(doc, dict):
        return Hold(f"{layout.hold} is unreadable; patchd unhold lifts it", "")
    reason, since = doc.get("reason"), doc.get("since")
    return Hold(reason[:MAX_HOLD_REASON] if isinstance(reason, str) else "",
                since if isinstance(since, str) else "")


def write_hold(layout: Layout, hold: Hold) -> None:
    fsio.atomic_write_json(layout.hold, hold.to_json())


def remove_hold(layout: Layout) -> None:
    """Lift the hold durably (nothing to do when there is none)."""
    try:
        os.unlink(layout.hold)
    except FileNotFoundError:
        return
    fsio.fsync_dir(layout.state_dir)
