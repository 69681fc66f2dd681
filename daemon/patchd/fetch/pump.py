"""Network chunks into the partial file, under the limits, in bounded memory.

One pump per response: the chunks go through a bounded memory stream to a writer that
writes and hashes them in worker threads, a batch per thread hop; watchdogs apply the
stall rule and the minimum rate, and the rate limiter paces the reads. Over the
manifest's size is refused as the bytes arrive, before they reach the disk.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import AsyncIterable, Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from patchd.core.errors import DownloadOversize, DownloadStalled
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.partial import PartialFile

#: ``progress(done, total)``: bytes on disk so far and the manifest's size.
Progress = Callable[[int, int], None]


class _Pump:
    """Network chunks → bounded stream → writer thread, with stall and rate watchdogs.

    Child tasks never raise: the first error is kept and the group cancelled, so the
    caller sees the error itself rather than an ExceptionGroup. A network error still
    lets the writer land what was received before it; a writer or stall error drops
    the queue (the file stays a prefix either way).
    """

    def __init__(
        self, part: PartialFile, policy: DownloadPolicy, limiter: RateLimiter,
        progress: Progress | None, url: str,
    ) -> None:
        self.part = part
        self.url = url
        self.policy = policy
        self.limiter = limiter
        self.progress = progress
        self.received = 0
        self.held_back = False
        #: When our side (the rate limit, the disk) last held the network back.
        self.held_at = -math.inf
        self.error: BaseException | None = None
        self._scope: anyio.CancelScope | None = None

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, chunks: AsyncIterable[bytes]) -> None:
        send, recv = anyio.create_memory_object_stream[bytes](self.policy.queue_chunks)
        writer_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            tg.start_soon(self._writer, recv, writer_done)
            tg.start_soon(self._watch_stall)
            if self.policy.min_rate > 0:
                tg.start_soon(self._watch_rate)
            try:
                async with send:
                    await self._produce(chunks, send)
            except Exception as exc:
                # Chunks already received are bytes of this stream: let the writer
                # land them (the stream is closed, so it drains and stops).
                if self.error is None:
                    self.error = exc
            await writer_done.wait()
            tg.cancel_scope.cancel()
        if self.error is not None:
            raise self.error

    async def _produce(
        self, chunks: AsyncIterable[bytes], send: MemoryObjectSendStream[bytes]
    ) -> None:
        room = self.part.size - self.part.done
        async for chunk in chunks:
            if not chunk:
                continue
            self.received += len(chunk)
            if self.received > room:
                raise DownloadOversize(
                    f"{self.part.dest.name}: server sent more than the manifest's "
                    f"{self.part.size} bytes; aborted"
                )
            if await self.limiter.consume(len(chunk)):
                self._hold()
            if send.statistics().current_buffer_used >= self.policy.queue_chunks:
                self._hold()
            await send.send(chunk)

    def _hold(self) -> None:
        self.held_back = True
        self.held_at = anyio.current_time()

    async def _writer(
        self, recv: MemoryObjectReceiveStream[bytes], done: anyio.Event
    ) -> None:
        try:
            async with recv:
                while True:
                    try:
                        batch = [await recv.receive()]
                    except anyio.EndOfStream:
                        return
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        while len(batch) < self.policy.max_batch:
                            batch.append(recv.receive_nowait())
                    # Not abandoned on cancel: the batch lands whole, so the file
                    # stays a prefix of the stream and no thread writes after we return.
                    total = await anyio.to_thread.run_sync(self.part.write_batch, batch)
                    if self.progress is not None:
                        self.progress(total, self.part.size)
        except Exception as exc:
            self._fail(exc)
        finally:
            done.set()

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
        samples: deque[tuple[float, int]] = deque([(anyio.current_time(), self.received)])
        while True:
            await anyio.sleep(step)
            now = anyio.current_time()
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
    part: PartialFile, chunks: AsyncIterable[bytes], *, policy: DownloadPolicy,
    limiter: RateLimiter, progress: Progress | None, url: str,
) -> None:
    """Write ``chunks`` after what ``part`` holds, hashing, bounded, cancellable;
    ``url`` names the origin in the errors."""
    await _Pump(part, policy, limiter, progress, url).run(chunks)

