"""The download engine: stream bytes into a partial file, hash them, never trust the server.

A bundle download must survive anything a network does (SPEC §3.2, §3.4): resets,
truncation, lying headers, stalls, cancellation, a SIGKILL. The rules that make that
safe live here, below the repository sources that use them:

- Whatever is on disk is always a prefix of *one* response stream. A restart from zero
  truncates (and fsyncs) the file before the new origin's validators are recorded in
  ``<dest>.meta``, so a resume after a crash never sends ``If-Range`` for bytes that
  came from another version of the file.
- SHA-256 continues over the bytes already on disk, then over new bytes; the hash
  and the writes run in worker threads, fed through a bounded memory stream, so memory
  stays bounded (a few hundred KiB) and the event loop stays responsive.
- Never more than the manifest's ``size`` bytes: a response that announces or sends
  more is aborted at once (:class:`DownloadOversize`, a :class:`BundleHashMismatch`,
  because bytes beyond the signed size cannot hash to the signed value).
- ``Accept-Encoding: identity`` is sent, and the body is taken as *bytes on the wire*
  (``aiter_raw``), never decoded: a store that labels a stored ``.patchd`` with
  ``Content-Encoding`` (S3/GCS object metadata) still serves the right bytes, and a
  server that really transcodes is caught by the hash against the signed manifest.
- A file that fails its hash or size is deleted with its meta before the error is
  raised: it must never be resumed from. The caller marks the build bad.

Failure classes (the supervisor's policy follows from them, see errors.py):

- transient: transport errors and timeouts (:class:`NetworkError`), a body ending short
  (:class:`DownloadTruncated`), a stall (:class:`DownloadStalled`), 5xx/408/429
  (:class:`ServerError` with ``retry_after``), 404/410 on a bundle
  (:class:`BundleNotFound`: the signed manifest may be newer than the mirror or CDN
  edge serving the bundle, so this is retried rather than blamed on the build), ENOSPC
  (:class:`DiskFull`, partial data kept).
- bad input: :class:`BundleHashMismatch`, :class:`DownloadOversize`.
- configuration: :class:`RepositoryError` for TLS failures, unsupported URL schemes,
  other 4xx, and redirect loops (more than ``max_redirects`` hops is a deterministic
  server misconfiguration; retrying within seconds cannot fix it, the next poll will).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import os
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from patchd.core import fsio
from patchd.core.errors import (
    BundleHashMismatch,
    BundleNotFound,
    DiskFull,
    DownloadOversize,
    DownloadStalled,
    DownloadTruncated,
    NetworkError,
    RepositoryError,
    ServerError,
)

log = structlog.get_logger("patchd.fetch.download")

Progress = Callable[[int, int], None]

#: Bytes read from disk per step when hashing an existing prefix or a complete file.
READ_CHUNK = 1024 * 1024





@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Knobs of one download; tests shrink the stall thresholds to make stalls quick.

    ``stall_window``/``stall_min_bytes``: fewer than ``stall_min_bytes`` received from
    the network in a window of ``stall_window`` seconds (while the disk side was not
    holding the network back) raises :class:`DownloadStalled`. ``queue_chunks`` bounds
    the chunks between the network and the writer thread; ``max_batch`` bounds what
    one thread hop writes.
    """

    stall_window: float = 60.0
    stall_min_bytes: int = 16 * 1024
    # Network chunks are ≤ 64 KiB (httpcore's read size): at most (6 + 6) × 64 KiB =
    # 768 KiB is received but not yet on disk, which bounds both memory and what a
    # SIGKILL makes us fetch again (< 1 MiB, see bench/bench_download.py).
    queue_chunks: int = 6
    max_batch: int = 6
    max_rate: int = 0


# --- the partial file's companion meta ----------------------------------------------------


def meta_path(dest: Path) -> Path:
    """Where the validators of the partial's origin live (deleted with the partial)."""
    return dest.with_name(dest.name + ".meta")


def remove_download(dest: Path) -> None:
    """Delete a partial or complete download and its meta (absent is fine)."""
    for path in (dest, meta_path(dest)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read_meta(dest: Path, url: str, sha256: str) -> dict[str, Any] | None:
    """The partial's meta: {} when absent, None when it names another url or sha256."""
    meta = fsio.read_json(meta_path(dest))
    if not isinstance(meta, dict):
        return {}
    if meta.get("url") != url or meta.get("sha256") != sha256:
        return None
    return meta


def _write_meta(dest: Path, url: str, sha256: str, headers: httpx.Headers) -> None:
    meta = {"url": url, "sha256": sha256}
    etag = headers.get("etag")
    if etag:
        meta["etag"] = etag
    last_modified = headers.get("last-modified")
    if last_modified:
        meta["last_modified"] = last_modified
    fsio.atomic_write_json(meta_path(dest), meta)


def if_range_value(meta: dict[str, Any]) -> str | None:
    """A strong ETag, else Last-Modified; weak ETags are not allowed in If-Range."""
    etag = meta.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    last_modified = meta.get("last_modified")
    return last_modified if isinstance(last_modified, str) and last_modified else None


# --- the blocking side: one partial file --------------------------------------------------

#: Bytes written between two requests to start writeback (see PartialFile._start_writeback).
WRITEBACK_STEP = 8 * 1024 * 1024


class PartialFile:
    """The file being downloaded, its running SHA-256 and its length; used from threads.

    Every method is blocking and must run in a worker thread. Writes never go past
    ``size``; the file is always a prefix of one stream.
    """

    def __init__(self, dest: Path, size: int) -> None:
        self.dest = dest
        self.size = size
        self.done = 0
        self._flushed = 0
        self._hash = hashlib.sha256()
        self._fd = -1

    def __repr__(self) -> str:
        return f"PartialFile({str(self.dest)!r}, done={self.done}, size={self.size})"

    @classmethod
    def open(cls, dest: Path, offset: int, size: int) -> PartialFile:
        """Open ``dest`` to continue at ``offset`` (0 or no file: start fresh).

        The bytes already there are hashed first. A file longer than ``offset`` is cut
        back to it (the caller decided where to resume); a shorter one resumes at its
        own length.
        """
        part = cls(dest, size)
        try:
            have = dest.stat().st_size if offset > 0 else 0
        except FileNotFoundError:
            have = 0
        start = min(have, offset, size)
        with _disk_errors(dest):
            if start == 0:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                part._fd = os.open(dest, flags, 0o644)
                return part
            part._fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
            if have > start:
                os.ftruncate(part._fd, start)
            part._hash_prefix(start)
            part._flushed = part.done
        return part

    def _hash_prefix(self, length: int) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        while self.done < length:
            data = os.read(self._fd, min(READ_CHUNK, length - self.done))
            if not data:
                break
            self._hash.update(data)
            self.done += len(data)
        os.lseek(self._fd, self.done, os.SEEK_SET)

    def write_batch(self, chunks: list[bytes]) -> int:
        """Append and hash ``chunks``; raise before writing a byte beyond ``size``.

        The chunks that fit are joined and written and hashed in one call each: every
        call that releases the GIL must win it back from the event loop thread, which
        can take a whole switch interval (5 ms), so fewer calls mean a faster download.
        """
        fits: list[bytes] = []
        end = self.done
        for chunk in chunks:
            if end + len(chunk) > self.size:
                break
            fits.append(chunk)
            end += len(chunk)
        data = fits[0] if len(fits) == 1 else b"".join(fits)
        with _disk_errors(self.dest):
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._hash.update(data)
            self.done = end
            if self.done - self._flushed >= WRITEBACK_STEP:
                self._start_writeback()
        if len(fits) < len(chunks):
            raise DownloadOversize(
                f"{self.dest.name}: server sent more than the manifest's "
                f"{self.size} bytes; refusing it"
            )
        return self.done

    def _start_writeback(self) -> None:
        """Start writing what we wrote to disk now, without waiting for it.

        The final fsync must make the whole file durable; left to the kernel, a large
        download sits dirty in the page cache and that fsync then writes all of it
        while nothing else happens. POSIX_FADV_DONTNEED on Linux starts asynchronous
        writeback of the range (and drops pages already clean), so the disk works
        while the network does.
        """
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._flushed, self.done - self._flushed,
                             os.POSIX_FADV_DONTNEED)
        self._flushed = self.done

    def restart(self) -> None:
        """Start over from zero: truncate and make the truncation durable."""
        with _disk_errors(self.dest):
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.fsync(self._fd)
        self._hash = hashlib.sha256()
        self.done = 0
        self._flushed = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> str:
        """fsync and close; the digest of everything written."""
        with _disk_errors(self.dest):
            os.fsync(self._fd)
        self.close()
        return self.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left writing {path}; partial data kept") from exc
        raise


def _hash_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        remaining = size + 1
        while remaining > 0:
            data = f.read(min(READ_CHUNK, remaining))
            if not data:
                break
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


async def verify_file(path: Path, size: int, sha256: str) -> None:
    """Check a complete download against the manifest (in a thread).

    Raises :class:`BundleHashMismatch` on a wrong size or hash, FileNotFoundError when
    the file is gone (the caller then starts fresh).
    """
    have = (await anyio.to_thread.run_sync(path.stat)).st_size
    if have != size:
        raise BundleHashMismatch(f"{path.name}: {have} bytes on disk, manifest says {size}")
    digest = await anyio.to_thread.run_sync(_hash_file, path, size)
    if digest != sha256:
        raise BundleHashMismatch(f"{path.name}: sha256 {digest}, manifest says {sha256}")


# --- rate limit and the pipeline ----------------------------------------------------------


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


async def _finish(part: PartialFile, sha256: str) -> None:
    digest = await anyio.to_thread.run_sync(part.finish)
    if digest != sha256:
        await anyio.to_thread.run_sync(remove_download, part.dest)
        raise BundleHashMismatch(
            f"{part.dest.name}: sha256 {digest}, manifest says {sha256}; file removed"
        )
    await anyio.to_thread.run_sync(remove_download_meta, part.dest)


def remove_download_meta(dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        meta_path(dest).unlink()


async def _open_partial(dest: Path, offset: int, size: int) -> PartialFile:
    """Open (and hash the prefix) shielded: a cancel here would otherwise leak the fd.

    Costs at most one pass over the partial (~1 s/GiB) before a cancel is honoured.
    """
    with anyio.CancelScope(shield=True):
        part = await anyio.to_thread.run_sync(PartialFile.open, dest, offset, size)
    return part


async def _close(part: PartialFile) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(part.close)


# --- HTTP ---------------------------------------------------------------------------------


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError) and not isinstance(
            cur, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def http_errors(url: str) -> Iterator[None]:
    """Translate httpx's exceptions into patchd's classes at the boundary."""
    try:
        yield
    except httpx.TooManyRedirects as exc:
        raise RepositoryError(f"{url}: too many redirects ({exc}); fix the server") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise RepositoryError(f"{url}: unsupported or invalid URL ({exc})") from exc
    except httpx.TimeoutException as exc:
        raise NetworkError(f"{url}: timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        tls = _tls_failure(exc)
        if tls is not None:
            raise RepositoryError(f"{url}: TLS failure: {tls}") from exc
        raise NetworkError(f"{url}: {type(exc).__name__}: {exc}") from exc


@contextlib.asynccontextmanager
async def open_response(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], policy: DownloadPolicy,
) -> AsyncIterator[httpx.Response]:
    """``client.stream("GET", ...)`` whose response head must arrive within one stall
    window: httpx's read timeout is per read, so a server trickling header lines one
    byte per second would otherwise hold us until h11's 64 KiB head limit."""
    async with contextlib.AsyncExitStack() as stack:
        with anyio.move_on_after(policy.stall_window) as scope:
            resp = await stack.enter_async_context(client.stream("GET", url, headers=headers))
        if scope.cancelled_caught:
            raise DownloadStalled(f"{url}: no complete response head within "
                                  f"{policy.stall_window:g}s; stalled")
        yield resp


class StallDeadline:
    """The stall rule for a read with no writer behind it (manifests, signatures): a
    cancel scope whose deadline moves one window ahead each time ``stall_min_bytes``
    more have arrived, so the request, the head and the body share one rule."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self.window = policy.stall_window
        self.need = policy.stall_min_bytes
        self.scope = anyio.CancelScope(deadline=anyio.current_time() + self.window)
        self._pending = 0

    def __repr__(self) -> str:
        return f"StallDeadline(window={self.window}, need={self.need})"

    def received(self, n: int) -> None:
        self._pending += n
        if self._pending >= self.need:
            self._pending = 0
            self.scope.deadline = anyio.current_time() + self.window

    def check(self, url: str) -> None:
        """Raise :class:`DownloadStalled` if the scope ran out (call after leaving it)."""
        if self.scope.cancelled_caught:
            raise DownloadStalled(f"{url}: fewer than {self.need} bytes in "
                                  f"{self.window:g}s (stall threshold); stopped reading")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def status_error(resp: httpx.Response, url: str, *, bundle: bool) -> Exception:
    """The patchd error for an unexpected status (not raised: the caller raises it)."""
    status = resp.status_code
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    if status in (408, 425, 429) or status >= 500:
        return ServerError(f"{url}: server answered {status}", status=status,
                           retry_after=retry_after)
    if bundle and status in (404, 410):
        return BundleNotFound(f"{url}: {status}; the mirror may lag the manifest",
                              status=status, retry_after=retry_after)
    return RepositoryError(f"{url}: server answered {status}")


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes START-END/TOTAL`` → (start, end, total), None when malformed or ``*``."""
    if not value:
        return None
    unit, _, spec = value.strip().partition(" ")
    rng, _, total = spec.partition("/")
    start, _, end = rng.partition("-")
    if unit.lower() != "bytes" or not (start.isdigit() and end.isdigit() and total.isdigit()):
        return None
    return int(start), int(end), int(total)


async def http_download(
    client: httpx.AsyncClient, url: str, dest: Path, *, size: int, sha256: str,
    offset: int, progress: Progress | None, policy: DownloadPolicy | None = None,
    limiter: RateLimiter | None = None,
) -> None:
    """Download ``url`` into ``dest`` resuming at ``offset``; verified and fsynced.

    Raises the classes listed in the module docstring. On cancellation the file on
    disk is a prefix of one response stream and ``<dest>.meta`` names its origin.
    """
    policy = policy or DownloadPolicy()
    limiter = limiter or RateLimiter(policy.max_rate)
    part = await _open_partial(dest, offset, size)
    log.info("download.started", url=url, offset=part.done, size=size)
    try:
        restarts = 1
        if part.done == size:
            # Complete on disk (e.g. a crash before the state said downloaded):
            # verify without asking the network; a mismatch restarts fresh once.
            if part.hexdigest() == sha256:
                await _finish(part, sha256)
                log.info("download.complete", url=url, size=size, network=False)
                return
            restarts -= 1
            await anyio.to_thread.run_sync(part.restart)
        if 0 < part.done < size and await anyio.to_thread.run_sync(
                _read_meta, dest, url, sha256) is None:
            # The partial belongs to another url or expected hash: never mix streams.
            log.info("download.partial_mismatch", url=url, offset=part.done)
            await anyio.to_thread.run_sync(part.restart)
        while True:
            if await _http_attempt(client, url, part, sha256=sha256, policy=policy,
                                   limiter=limiter, progress=progress):
                break
            if restarts <= 0:
                raise NetworkError(f"{url}: range requests keep failing; giving up this try")
            restarts -= 1
            await anyio.to_thread.run_sync(part.restart)
        if part.done < size:
            raise DownloadTruncated(
                f"{url}: response ended after {part.done} of {size} bytes; partial kept"
            )
        await _finish(part, sha256)
        log.info("download.complete", url=url, size=size, network=True)
    except BundleHashMismatch as exc:
        log.warning("download.failed", url=url, error=str(exc), kept=0)
        await _close(part)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_download, dest)
        raise
    except Exception as exc:
        log.warning("download.failed", url=url, error=str(exc), kept=part.done)
        raise
    finally:
        await _close(part)


async def _http_attempt(
    client: httpx.AsyncClient, url: str, part: PartialFile, *, sha256: str,
    policy: DownloadPolicy, limiter: RateLimiter, progress: Progress | None,
) -> bool:
    """One request; False means "restart from zero and ask again" (bad 206 or 416)."""
    headers = {"Accept-Encoding": "identity"}
    ranged = part.done > 0
    if ranged:
        headers["Range"] = f"bytes={part.done}-"
        meta = await anyio.to_thread.run_sync(_read_meta, part.dest, url, sha256)
        validator = if_range_value(meta or {})
        if validator:
            headers["If-Range"] = validator
    with http_errors(url):
        async with open_response(client, url, headers, policy) as resp:
            status = resp.status_code
            if status == 416 and ranged:
                log.warning("download.range_refused", url=url, offset=part.done)
                return False
            if status == 206 and ranged:
                cr = parse_content_range(resp.headers.get("content-range"))
                if cr is None or cr[0] != part.done or cr[2] != part.size or cr[1] < cr[0]:
                    log.warning("download.bad_content_range", url=url, offset=part.done,
                                content_range=resp.headers.get("content-range"))
                    return False
            elif status == 200:
                if ranged:
                    log.info("download.restarted", url=url, offset=part.done)
                    await anyio.to_thread.run_sync(part.restart)
                await anyio.to_thread.run_sync(_write_meta, part.dest, url, sha256,
                                               resp.headers)
            else:
                raise status_error(resp, url, bundle=True)
            length = resp.headers.get("content-length", "")
            if length.isdigit() and part.done + int(length) > part.size:
                raise DownloadOversize(
                    f"{url}: Content-Length {length} at offset {part.done} exceeds the "
                    f"manifest's {part.size} bytes; refused"
                )
            if progress is not None:
                progress(part.done, part.size)
            await stream_into(part, resp.aiter_raw(), policy=policy, limiter=limiter,
                              progress=progress)
    return True


# --- local files --------------------------------------------------------------------------


async def _read_chunks(
    path: Path, offset: int, chunk: int = 256 * 1024
) -> AsyncGenerator[bytes, None]:
    f = await anyio.to_thread.run_sync(lambda: path.open("rb", buffering=0))
    try:
        await anyio.to_thread.run_sync(f.seek, offset)
        while True:
            data = await anyio.to_thread.run_sync(f.read, chunk)
            if not data:
                return
            yield data
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(f.close)


async def local_copy(
    src: Path, dest: Path, *, size: int, sha256: str, offset: int,
    progress: Progress | None, policy: DownloadPolicy | None = None,
) -> None:
    """Copy a bundle from a local repository with the same rules as a download."""
    policy = policy or DownloadPolicy(stall_window=3600.0, stall_min_bytes=1)
    if not await anyio.to_thread.run_sync(src.is_file):
        raise BundleNotFound(f"{src}: no such bundle in the local repository", status=404)
    part = await _open_partial(dest, offset, size)
    try:
        if part.done == size and part.hexdigest() != sha256:
            await anyio.to_thread.run_sync(part.restart)
        if part.done < size:
            chunks = _read_chunks(src, part.done)
            try:
                await stream_into(part, chunks, policy=policy, limiter=RateLimiter(0),
                                  progress=progress)
            finally:
                with anyio.CancelScope(shield=True):
                    await chunks.aclose()
        if part.done < size:
            raise DownloadTruncated(f"{src}: {part.done} bytes, manifest says {size}")
        await _finish(part, sha256)
    except BundleHashMismatch:
        await _close(part)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_download, dest)
        raise
    finally:
        await _close(part)
