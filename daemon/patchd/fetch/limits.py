"""The limits every transfer keeps: the knobs, the rate limit, the stall rule, the minimum
rate and the document deadline.

A bundle download enforces them in :mod:`patchd.fetch.pump` (the receive thread asks
the rate limiter; the stall and minimum-rate watchdogs run on the event loop); a read
with no writer behind it (a manifest, its signature, a root) uses
:class:`StallDeadline`: the stall rule as a moving cancel-scope deadline that never
moves past the document's total deadline.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import anyio

from patchd.core.errors import DownloadStalled


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Knobs of one download; tests shrink the stall thresholds to make stalls quick.

    ``stall_window``/``stall_min_bytes``: fewer than ``stall_min_bytes`` received from
    the network in a window of ``stall_window`` seconds (while the disk side was not
    holding the network back) raises :class:`DownloadStalled`. ``buffers`` buffers of
    ``buffer_size`` bytes go round between the receive thread and the writer thread:
    they bound the memory of a download and what a SIGKILL makes us fetch again (bytes
    received but not yet written: at most ``buffers × buffer_size``).

    ``min_rate``: a bundle whose average rate over the last ``stall_window`` seconds
    (a sliding window, judged once the first window has passed) is below this many
    bytes per second, while nothing on our side held it back, raises
    :class:`DownloadStalled`; 0 turns the rule off. ``document_deadline``: the most
    seconds a document (manifest, signature, root) may take from the request to its
    last byte; 0 means none.
    """

    stall_window: float = 60.0
    stall_min_bytes: int = 16 * 1024
    # Reads large enough that the per-read cost of Python disappears beside the hash;
    # one buffer each for the receive, write and hash threads and one of slack: at most
    # 4 MiB received but not yet on disk (issue #19's bound, bench/bench_download.py).
    buffer_size: int = 1024 * 1024
    buffers: int = 4
    max_rate: int = 0
    min_rate: int = 0
    document_deadline: float = 0.0


class RateLimiter:
    """Token bucket in bytes/s, used from the receive thread. 0 = unlimited.

    :meth:`reserve` takes the tokens and says how long to wait them off; the caller
    sleeps (in short steps, so that it still notices a stop). Reads are at most
    ``capacity`` bytes under a limit, so a burst stays an eighth of a second's worth.
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(rate // 8, 64 * 1024)
        self._tokens = float(self.capacity)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, tokens={self._tokens:.0f})"

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens; the seconds to wait before using them."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity,
                               self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)


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
