"""Network chunks into the partial file, under the limits, in bounded memory.

One pump per response: the chunks go through a bounded memory stream to a writer that
writes and hashes them in worker threads, a batch per thread hop; a watchdog applies
the stall rule and the rate limiter paces the reads. Over the manifest's size is
refused as the bytes arrive, before they reach the disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from patchd.core.errors import DownloadOversize, DownloadStalled
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.partial import PartialFile

#: ``progress(done, total)``: bytes on disk so far and the manifest's size.
Progress = Callable[[int, int], None]


class _Pump:
    """Network chunks → bounded stream → writer thread, with a stall watchdog.

    Child tasks never raise: the first error is kept and the group cancelled, so the
    caller sees the error itself rather than an ExceptionGroup. A network error still
    lets the writer land what was received before it; a writer or stall error drops
    the queue (the file stays a prefix either way).
    """

    def __init__(
        self, part: PartialFile, policy: DownloadPolicy, limiter: RateLimiter,
        progress: Progress | None,
    ) -> None:
        self.part = part
        self.policy = policy
        self.limiter = limiter
        self.progress = progress
        self.received = 0
        self.held_back = False
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
                self.held_back = True
            if send.statistics().current_buffer_used >= self.policy.queue_chunks:
                self.held_back = True
            await send.send(chunk)

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

    async def _watch_stall(self) -> None:
        window = self.policy.stall_window
        need = self.policy.stall_min_bytes
        if self.limiter.rate > 0:
            need = min(need, int(self.limiter.rate * window / 4))
        last = self.received
        while True:
            self.held_back = False
            await anyio.sleep(window)
            got = self.received - last
            last = self.received
            if got < need and not self.held_back:
                self._fail(DownloadStalled(
                    f"{self.part.dest.name}: only {got} bytes in {window:g}s "
                    f"(stall threshold {need}); partial data kept"
                ))
                return


async def stream_into(
    part: PartialFile, chunks: AsyncIterable[bytes], *, policy: DownloadPolicy,
    limiter: RateLimiter, progress: Progress | None,
) -> None:
    """Write ``chunks`` after what ``part`` holds, hashing, bounded, cancellable."""
    await _Pump(part, policy, limiter, progress).run(chunks)

