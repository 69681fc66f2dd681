"""When to check next: pure functions of the failure count, the interval and chance.

A fleet that reboots together must not hit the repository at once, and a failing
repository must not be hammered: so the first check is spread, every interval is
jittered, and failures back off exponentially with full jitter up to the interval.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta

__all__ = ["FIRST_CHECK_MAX_DELAY", "MIN_BACKOFF", "backoff_delay", "first_check_delay",
           "in_seconds", "jittered"]

#: First check happens a random 0–60 s after start. Tests shorten it with
#: PATCHD_FIRST_CHECK_DELAY.
FIRST_CHECK_MAX_DELAY = 60.0
MIN_BACKOFF = 5.0


def backoff_delay(failures: int, interval: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter, capped at the poll interval."""
    rng = rng or random.Random()
    ceiling = min(interval, MIN_BACKOFF * 2 ** max(failures - 1, 0))
    return rng.uniform(ceiling / 2, ceiling)


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    rng = rng or random.Random()
    return interval * (1 + rng.uniform(-jitter, jitter))


def first_check_delay() -> float:
    override = os.environ.get("PATCHD_FIRST_CHECK_DELAY")
    if override is not None:
        return float(override)
    return random.uniform(0, FIRST_CHECK_MAX_DELAY)


def in_seconds(seconds: float) -> str:
    """The UTC time ``seconds`` from now, as status shows it."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
