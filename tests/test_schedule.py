"""The poll schedule's pure parts: jittered intervals and capped exponential backoff."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from patchd.service.schedule import MIN_BACKOFF, backoff_delay, first_check_delay, jittered


@given(st.integers(1, 40), st.floats(10, 86400), st.integers(0, 2**32))
def test_backoff_grows_and_is_capped_at_the_interval(failures: int, interval: float,
                                                     seed: int) -> None:
    """Backoff is within [ceiling/2, ceiling], ceiling = min(interval, 5 s · 2^(n-1))."""
    delay = backoff_delay(failures, interval, random.Random(seed))
    ceiling = min(interval, MIN_BACKOFF * 2 ** (failures - 1))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_doubles_per_failure_until_the_cap() -> None:
    """The upper bound doubles: 5, 10, 20, 40 s … and never passes the interval."""
    rng = random.Random(1)
    tops = [max(backoff_delay(n, 3600, rng) for _ in range(200)) for n in (1, 2, 3, 4)]
    assert tops[0] <= 5 < tops[1] <= 10 < tops[2] <= 20 < tops[3] <= 40
    assert max(backoff_delay(30, 3600, rng) for _ in range(50)) <= 3600


@given(st.floats(1, 86400), st.floats(0, 0.99), st.integers(0, 2**32))
def test_jitter_stays_within_its_fraction(interval: float, jitter: float, seed: int) -> None:
    """poll_jitter 0.1 keeps every interval within ±10 %."""
    delay = jittered(interval, jitter, random.Random(seed))
    assert interval * (1 - jitter) - 1e-6 <= delay <= interval * (1 + jitter) + 1e-6


def test_first_check_is_within_a_minute(monkeypatch) -> None:
    """The first check comes a random 0–60 s after start (unless overridden for tests)."""
    monkeypatch.delenv("PATCHD_FIRST_CHECK_DELAY", raising=False)
    delays = [first_check_delay() for _ in range(200)]
    assert all(0 <= d <= 60 for d in delays) and max(delays) - min(delays) > 10
    monkeypatch.setenv("PATCHD_FIRST_CHECK_DELAY", "0.5")
    assert first_check_delay() == 0.5
