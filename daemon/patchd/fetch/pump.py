"""A response's bytes into the partial file: receive, write and hash threads, the limits.

One pump per response, three worker threads in a pipeline over a few reused buffers:

    receive ──▶ write ──▶ hash ──▶ (the buffer is free again)

The receive thread reads the body with large reads straight into a buffer
(:meth:`Body.readinto`: ``recv_into`` on the connection's socket for HTTP,
``readinto`` for a local file); the writer appends it to the file
(:meth:`PartialFile.write`), the hasher adds it to the running SHA-256
(:meth:`PartialFile.hash`). So the three overlap, a byte is copied once out of the
kernel and once into the page cache, and a download holds ``buffers × buffer_size``
bytes of memory. The event loop only supervises: the stall and minimum-rate watchdogs,
progress reports (each hundredth of the file, or every :data:`PROGRESS_EVERY` seconds,
and the last), and cancellation.

How it stops:

- cancelled: the writer and the hasher notice at their next buffer or within
  :data:`TICK` (``anyio.from_thread.check_cancelled``) and stop, dropping what they
  had not done; the receive thread is left to notice the stop at its next read or
  tick (it never touches the file, so nothing is written after the pump returns);
- the end of the body, a network error, a stall: the receive thread hands over what it
  has and stops; everything received is written and hashed (a prefix of the stream);
- a disk error in the writer: everything not yet written is dropped.

A pump that raised leaves the running hash behind the file: the download template
never finishes a file after an error (the next attempt hashes the prefix again).

Over the manifest's size is refused as the bytes arrive, before they reach the disk.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import anyio
import anyio.from_thread

from patchd.core.errors import DownloadOversize, DownloadStalled
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.partial import DIRECT_ALIGN, PartialFile

#: ``progress(done, total)``: bytes on disk so far and the manifest's size.
Progress = Callable[[int, int], None]

#: The longest a worker thread waits without looking whether it should stop: bounds how
#: late a cancel, a stall verdict or a disk error reaches the other thread.
TICK = 0.25

#: Progress is reported to the event loop when a hundredth of the file (or more) was
#: written since the last report, or this many seconds passed, and at the end: each
#: report is a hop into the loop and the status board's listeners, 0.3 CPU-s/GiB at one
#: report per 1 MiB buffer (bench/bench_download.py's daemon), and the status shows
#: whole percents.
PROGRESS_EVERY = 0.5
PROGRESS_STEPS = 100

#: A buffer that has been filling this long is handed to the writer even if not full,
#: so a slow transfer still reaches the disk (and the progress report) every second.
FLUSH_AFTER = 1.0


class Body:
    """A response body, read from the receive thread; closed from anywhere.

    A subclass implements :meth:`_read` and :meth:`_release`. :meth:`close` releases the
    resource at once, or, while a thread is inside :meth:`readinto` (a receive thread
    left behind by a cancel), interrupts the read and lets that thread release it when
    the read returns: a socket or file is never closed under a read (its descriptor
    number could be reused by the time the read's system call starts).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False

    def readinto(self, view: memoryview, timeout: float) -> int | None:
        """Blocking: bytes read into ``view`` (at least 1), 0 at the end of the body (or
        once closed), None when nothing arrived within ``timeout`` seconds. Raises
        patchd's errors."""
        with self._lock:
            if self._closed:
                return 0
            self._reading = True
        try:
            return self._read(view, timeout)
        finally:
            with self._lock:
                self._reading = False
                release = self._closed
            if release:
                self._release()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        if reading:
            self.interrupt()  # the reader releases it when its read returns
        else:
            self._release()

    def interrupt(self) -> None:
        """End the body now: a read in progress returns soon, later ones find the end
        (default: nothing; the reads return within their timeout anyway)."""

    def _read(self, view: memoryview, timeout: float) -> int | None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class _Pump:
    """Receive thread → writer thread → hasher thread, with stall and rate watchdogs.

    The threads never raise into the event loop: the first error is kept, every thread
    is told to stop, and the caller sees that error itself once they have.
    """

    def __init__(
        self, part: PartialFile, body: Body, policy: DownloadPolicy, limiter: RateLimiter,
        progress: Progress | None, url: str,
    ) -> None:
        self.part = part
        self.body = body
        self.url = url
        self.policy = policy
        self.limiter = limiter
        self.progress = progress
        #: Body bytes read from the network so far (written by the receive thread).
        self.received = 0
        self.held_back = False
        #: When our side (the rate limit, the disk) last held the network back.
        self.held_at = -math.inf
        self.error: BaseException | None = None
        self.stop = threading.Event()
        #: Set with a writer error: nothing more is written.
        self.drop = False
        self.free: queue.Queue[memoryview] = queue.Queue()
        self.full: queue.Queue[memoryview | None] = queue.Queue()
        self.written: queue.Queue[memoryview | None] = queue.Queue()
        #: Where the body starts in the file (the writer moves ``part.done`` on).
        self.start = part.done
        for _ in range(max(policy.buffers, 2)):
            # Page-aligned memory: the writer can hand it to the disk directly.
            self.free.put(memoryview(mmap.mmap(-1, policy.buffer_size)))

    def _fail(self, exc: BaseException, *, drop: bool = False) -> None:
        if self.error is None:
            self.error = exc
        self.drop = self.drop or drop
        self.stop.set()
        # A read that cannot tick (httpx's, for a chunked body) must not hold the pump
        # until the read timeout: the response is given up anyway.
        self.body.interrupt()

    async def run(self) -> None:
        async with anyio.create_task_group() as watchdogs:
            watchdogs.start_soon(self._watch_stall)
            if self.policy.min_rate > 0:
                watchdogs.start_soon(self._watch_rate)
            try:
                async with anyio.create_task_group() as workers:
                    workers.start_soon(self._receiver)
                    workers.start_soon(self._stage, self._write)
                    workers.start_soon(self._stage, self._hash)
            finally:
                self.stop.set()
                watchdogs.cancel_scope.cancel()
        if self.error is not None:
            raise self.error

    async def _receiver(self) -> None:
        # Abandoned on cancel: it only reads the network into buffers nobody will write.
        try:
            await anyio.to_thread.run_sync(self._receive, abandon_on_cancel=True)
        except Exception as exc:
            self._fail(exc)

    async def _stage(self, work: Callable[[], None]) -> None:
        # Never abandoned: once the pump returns, no thread touches the partial file.
        try:
            await anyio.to_thread.run_sync(work)
        except Exception as exc:
            self._fail(exc, drop=True)

    # --- the receive thread ---

    def _hold(self) -> None:
        self.held_back = True
        self.held_at = time.monotonic()

    def _take_buffer(self) -> memoryview | None:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        while not self.stop.is_set():
            self._hold()  # the disk is behind: our side holds the network back
            try:
                return self.free.get(timeout=TICK)
            except queue.Empty:
                continue
        return None

    def _wait(self, seconds: float) -> None:
        """Sleep off the rate limit, in ticks, unless told to stop."""
        end = time.monotonic() + seconds
        while seconds > 0 and not self.stop.is_set():
            self._hold()
            self.stop.wait(min(seconds, TICK))
            seconds = end - time.monotonic()

    def _receive(self) -> None:
        room = self.part.size - self.part.done
        limit = self.limiter.capacity if self.limiter.rate > 0 else self.policy.buffer_size
        buf: memoryview | None = None
        fill = 0
        try:
            while not self.stop.is_set():
                buf = self._take_buffer()
                if buf is None:
                    return
                fill, first = 0, 0.0
                # A buffer that starts off a block boundary in the file (a resume, a
                # short buffer before) only fills up to it: the next one starts on it,
                # and the writer can write it directly (PartialFile.write).
                end = len(buf)
                if misaligned := (self.start + self.received) % DIRECT_ALIGN:
                    end = min(end, DIRECT_ALIGN - misaligned)
                while fill < end and not self.stop.is_set():
                    # One byte past the room, to see a body longer than the manifest says.
                    want = min(end - fill, limit, room - self.received + 1)
                    n = self.body.readinto(buf[fill:fill + want], TICK)
                    now = time.monotonic()
                    if n is None:
                        if fill and now - first >= FLUSH_AFTER:
                            break
                        continue
                    if n == 0:
                        return
                    if self.received + n > room:
                        raise DownloadOversize(
                            f"{self.part.dest.name}: server sent more than the manifest's "
                            f"{self.part.size} bytes; aborted"
                        )
                    self.received += n
                    if not fill:
                        first = now
                    fill += n
                    self._wait(self.limiter.reserve(n))
                    if now - first >= FLUSH_AFTER:
                        break
                if fill:
                    self.full.put(buf[:fill])
                else:
                    self.free.put(buf)
                buf = None
        finally:
            # What was received before the end, an error or a stop is a prefix of the
            # stream: the writer lands it (unless it was told to drop everything).
            if buf is not None and fill:
                self.full.put(buf[:fill])
            self.full.put(None)

    # --- the writer and hasher threads ---

    def _next(self, inbox: queue.Queue[memoryview | None]) -> memoryview | None:
        """The next buffer from ``inbox``, or None: the end, or told to drop the rest."""
        while not self.drop:
            try:
                item = inbox.get(timeout=TICK)
            except queue.Empty:
                anyio.from_thread.check_cancelled()
                continue
            return None if self.drop else item
        return None

    def _write(self) -> None:
        reported, reported_done = -math.inf, -1
        done = self.part.done
        step = self.part.size // PROGRESS_STEPS
        try:
            while (item := self._next(self.full)) is not None:
                done = self.part.write(item)
                self.written.put(item)
                now = time.monotonic()
                if self.progress is not None and (
                        done - reported_done >= step or now - reported >= PROGRESS_EVERY):
                    reported, reported_done = now, done
                    anyio.from_thread.run_sync(self.progress, done, self.part.size)
                anyio.from_thread.check_cancelled()
        finally:
            self.written.put(None)
            if self.progress is not None and -1 < reported_done < done:
                # The last bytes written are always reported (a progress of 100 %, the
                # metrics' byte count), unless the event loop is gone (cancelled).
                with contextlib.suppress(Exception):
                    anyio.from_thread.run_sync(self.progress, done, self.part.size)

    def _hash(self) -> None:
        while (item := self._next(self.written)) is not None:
            self.part.hash(item)
            self.free.put(memoryview(item.obj))  # the whole buffer again
            anyio.from_thread.check_cancelled()

    # --- the watchdogs, on the event loop ---

    def _stall_need(self) -> int:
        """Bytes the stall rule wants per window (less under a low rate limit)."""
        need = self.policy.stall_min_bytes
        if self.limiter.rate > 0:
            need = min(need, int(self.limiter.rate * self.policy.stall_window / 4))
        return need

    async def _watch_stall(self) -> None:
        window = self.policy.stall_window
        need = self._stall_need()
        last = self.received
        while True:
            self.held_back = False
            await anyio.sleep(window)
            got = self.received - last
            last = self.received
            if got < need and not self.held_back:
                self._fail(DownloadStalled(
                    f"{self.url}: only {got} bytes in {window:g}s "
                    f"(stall threshold {need}); partial data kept"
                ))
                return

    async def _watch_rate(self) -> None:
        """The minimum rate: the average over a sliding window of ``stall_window``
        seconds, sampled eight times a window, judged once a whole window has passed and
        only over stretches where nothing on our side held the network back. Fewer bytes
        than the stall rule wants are the stall rule's to report."""
        window = self.policy.stall_window
        need = self.policy.min_rate
        if self.limiter.rate > 0:
            need = min(need, self.limiter.rate // 2)
        stall_need = self._stall_need()
        step = window / 8
        samples: deque[tuple[float, int]] = deque([(time.monotonic(), self.received)])
        while True:
            await anyio.sleep(step)
            now = time.monotonic()
            samples.append((now, self.received))
            # Keep the newest sample at least a window old as the base of the average.
            while len(samples) > 1 and samples[1][0] <= now - window:
                samples.popleft()
            since, base = samples[0]
            got = self.received - base
            if now - since < window or self.held_at >= since or got < stall_need:
                continue
            rate = got / (now - since)
            if rate < need:
                self._fail(DownloadStalled(
                    f"{self.url}: {rate:.0f} bytes/s over the last {now - since:.1f}s, "
                    f"below the minimum rate of {need} bytes/s (server.min_rate); "
                    "partial data kept"
                ))
                return


async def stream_into(
    part: PartialFile, body: Body, *, policy: DownloadPolicy, limiter: RateLimiter,
    progress: Progress | None, url: str,
) -> None:
    """Write ``body`` after what ``part`` holds, hashing, bounded, cancellable;
    ``url`` names the origin in the errors."""
    await _Pump(part, body, policy, limiter, progress, url).run()
