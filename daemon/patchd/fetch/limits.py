"""The limits every transfer keeps: the knobs, the rate limit, the stall rule, the minimum
rate and the document deadline.

A bundle download enforces them in :mod:`patchd.fetch.pump` (the stall and minimum-rate
watchdogs beside the writer); a read with no writer behind it (a manifest, its
signature, a root) uses :class:`StallDeadline`: the stall rule as a moving cancel-scope
deadline that never moves past the document's total deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import anyio

from patchd.core.errors import DownloadStalled


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Knobs of one download; tests shrink the stall thresholds to make stalls quick.

    ``stall_window``/``stall_min_bytes``: fewer than ``stall_min_bytes`` received from
    the network in a window of ``stall_window`` seconds (while the disk side was not
    holding the network back) raises :class:`DownloadStalled`. ``queue_chunks`` bounds
    the chunks between the network and the writer thread; ``max_batch`` bounds what
    one thread hop writes.

    ``min_rate``: a bundle whose average rate over the last ``stall_window`` seconds
    (a sliding window, judged once the first window has passed) is below this many
    bytes per second, while nothing on our side held it back, raises
    :class:`DownloadStalled`; 0 turns the rule off. ``document_deadline``: the most
    seconds a document (manifest, signature, root) may take from the request to its
    last byte; 0 means none.
    """

    stall_window: float = 60.0
    stall_min_bytes: int = 16 * 1024
    # Network chunks are ≤ 64 KiB (httpcore's read size): at most (6 + 6) × 64 KiB =
    # 768 KiB is received but not yet on disk, which bounds both memory and what a
    # SIGKILL makes us fetch again (< 1 MiB, see bench/bench_download.py).
    queue_chunks: int = 6
    max_batch: int = 6
    max_rate: int = 0
    min_rate: int = 0
    document_deadline: float = 0.0


class RateLimiter:
    """Token bucket in bytes/s; sleeps off the debt, never spins. 0 = unlimited."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(rate // 8, 64 * 1024)
        self._tokens = float(self.capacity)
        self._stamp = time.monotonic()

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, tokens={self._tokens:.0f})"

    async def consume(self, n: int) -> bool:
        """Take ``n`` bytes' worth of tokens; True when it had to wait."""
        if self.rate <= 0:
            return False
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens >= 0:
            return False
        await anyio.sleep(-self._tokens / self.rate)
        return True


class StallDeadline:
    """The stall rule and the total deadline for a read with no writer behind it
    (manifests, signatures, roots): a cancel scope whose deadline moves one window
    ahead each time ``stall_min_bytes`` more have arrived, but never past
    ``document_deadline`` after the start, so the request, the head and the body share
    one rule and a server trickling just above the stall threshold is still cut off."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self.window = policy.stall_window
        self.need = policy.stall_min_bytes
        self.total = policy.document_deadline
        self.start = anyio.current_time()
        self.hard = self.start + self.total if self.total > 0 else math.inf
        self.scope = anyio.CancelScope(deadline=min(self.start + self.window, self.hard))
        self._pending = 0
        self._received = 0

    def __repr__(self) -> str:
        return f"StallDeadline(window={self.window}, need={self.need}, total={self.total})"

    def received(self, n: int) -> None:
        self._received += n
        self._pending += n
        if self._pending >= self.need:
            self._pending = 0
            self.scope.deadline = min(anyio.current_time() + self.window, self.hard)

    def check(self, url: str) -> None:
        """Raise :class:`DownloadStalled` if the scope ran out (call after leaving it)."""
        if not self.scope.cancelled_caught:
            return
        if self.scope.deadline >= self.hard:
            elapsed = anyio.current_time() - self.start
            raise DownloadStalled(f"{url}: not complete after {elapsed:.1f}s "
                                  f"({self._received} bytes received; document deadline "
                                  f"{self.total:g}s); stopped reading")
        raise DownloadStalled(f"{url}: fewer than {self.need} bytes in "
                              f"{self.window:g}s (stall threshold); stopped reading")
