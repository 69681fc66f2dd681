"""The download template: the partial-file protocol, once, for every transport.

:meth:`Transport.download` owns everything that makes a download safe to resume and
safe to trust: opening the partial at the resume offset (hashing the prefix), the
meta naming the prefix's origin, restarting from zero when the origin cannot continue
at the offset, the size cap, the stall rule, the minimum rate, the rate limit and the
bounded queue to the writer thread (:mod:`patchd.fetch.pump`), the final size and
SHA-256 check, and what is discarded on which failure:

- a wrong hash or too many bytes (:class:`BundleHashMismatch`, :class:`DownloadOversize`):
  the file and its meta are deleted; it must never be resumed from;
- anything else (network, stall, truncation, disk full, cancellation): the file stays,
  a prefix of one stream, with its meta, for the next try to resume.

A transport (:mod:`patchd.fetch.http`, :mod:`patchd.fetch.local`) implements only
:meth:`Transport._open`: the body from an offset (a :class:`patchd.fetch.pump.Body`,
read from a worker thread), whether it really starts there, and the origin's
validators; like python-tuf's ``FetcherInterface``, whose
``download_file`` enforces ``max_length`` while a fetcher implements only ``_fetch``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import structlog

from patchd.core.errors import (
    BundleHashMismatch,
    DownloadOversize,
    DownloadTruncated,
    NetworkError,
)
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.partial import PartialFile, Validators, remove_download
from patchd.fetch.pump import Body, Progress, stream_into

log = structlog.get_logger("patchd.fetch.transfer")


@dataclass(frozen=True, slots=True)
class Stream:
    """What a transport hands the template: one response's body and what it says of it.

    ``resumed``: the bytes continue the partial at the offset asked for; False: they
    are the whole file from byte 0. ``length``: the length the origin announced
    (``Content-Length``), checked against the size cap before a byte is read.
    ``validators``: the origin's, recorded in the meta when the stream starts at 0.
    """

    body: Body
    resumed: bool
    length: int | None = None
    validators: Validators = field(default_factory=Validators)


class Transport(ABC):
    """A way for a bundle's bytes to reach the cache; :meth:`download` is the template."""

    #: The origin has validators (ETag, Last-Modified): a partial is resumed only when
    #: its meta names the same url and sha256. False: any partial is resumed as it is.
    validated: ClassVar[bool] = True
    #: No ``download.*`` log events and no progress report before the first bytes
    #: (local copies have never had them).
    quiet: ClassVar[bool] = False

    def __init__(self, policy: DownloadPolicy, limiter: RateLimiter) -> None:
        self.policy = policy
        self.limiter = limiter

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy!r})"

    # --- what a transport supplies ---

    async def _check(self, url: str) -> None:
        """Refuse before the partial is opened (default: nothing to check)."""
        return None

    @abstractmethod
    def _open(
        self, url: str, offset: int, size: int, origin: Validators,
    ) -> contextlib.AbstractAsyncContextManager[Stream | None]:
        """The bytes of ``url`` from ``offset`` (``origin``: the validators the partial
        was recorded with, for a conditional resume), or None: the origin refused to
        continue at ``offset``; the template restarts from zero and asks again.

        The template reads the body inside this context; the body raises patchd's
        classes, and the transport translates its own exceptions around the context.
        Leaving the context closes the body (once no thread is reading it).
        """

    @abstractmethod
    def _truncated(self, url: str, done: int, size: int) -> DownloadTruncated:
        """The error for a stream that ended after ``done`` of ``size`` bytes."""

    # --- the template ---

    async def download(
        self, url: str, dest: Path, *, size: int, sha256: str, offset: int,
        progress: Progress | None,
    ) -> None:
        """Bring ``url`` into ``dest`` resuming at ``offset``; verified and fsynced.

        Raises the classes listed in :mod:`patchd.fetch`. On cancellation the file on
        disk is a prefix of one stream and its meta names that stream's origin.
        """
        events: _Events = _QUIET if self.quiet else log
        await self._check(url)
        part = await _open_partial(dest, offset, size)
        events.info("download.started", url=url, offset=part.done, size=size)
        try:
            restarts = 1
            if part.done == size:
                # Complete on disk (e.g. a crash before the state said downloaded):
                # verify without asking the origin; a mismatch restarts fresh once.
                if part.hexdigest() == sha256:
                    await _finish(part, sha256)
                    events.info("download.complete", url=url, size=size, network=False)
                    return
                restarts -= 1
                await anyio.to_thread.run_sync(part.restart)
            if self.validated and 0 < part.done < size and await anyio.to_thread.run_sync(
                    part.read_origin, url, sha256) is None:
                # The partial belongs to another url or expected hash: never mix streams.
                events.info("download.partial_mismatch", url=url, offset=part.done)
                await anyio.to_thread.run_sync(part.restart)
            kept_from_disk = part.done
            await self._fetch_rest(url, part, restarts, sha256=sha256, progress=progress,
                                   events=events)
            try:
                await _finish(part, sha256)
            except BundleHashMismatch:
                if not kept_from_disk:
                    raise
                # The bytes kept on disk were not what they seemed: a power cut can keep
                # a later write without an earlier one. Suspect them, not the network:
                # fetch the whole bundle once more, now, instead of after a backoff.
                events.warning("download.partial_corrupt", url=url, offset=kept_from_disk)
                part = await _open_partial(dest, 0, size)  # _finish removed the old one
                await self._fetch_rest(url, part, 0, sha256=sha256, progress=progress,
                                       events=events)
                await _finish(part, sha256)
            events.info("download.complete", url=url, size=size, network=True)
        except BundleHashMismatch as exc:
            events.warning("download.failed", url=url, error=str(exc), kept=0)
            await _close(part)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_download, dest)
            raise
        except Exception as exc:
            events.warning("download.failed", url=url, error=str(exc), kept=part.done)
            raise
        finally:
            await _close(part)

    async def _fetch_rest(
        self, url: str, part: PartialFile, restarts: int, *, sha256: str,
        progress: Progress | None, events: _Events,
    ) -> None:
        """Stream from ``part.done`` to the end, restarting from zero at most
        ``restarts`` times when the origin will not resume; all of it, or an error."""
        while True:
            if await self._attempt(url, part, sha256=sha256, progress=progress,
                                   events=events):
                break
            if restarts <= 0:
                raise NetworkError(f"{url}: range requests keep failing; giving up this try")
            restarts -= 1
            await anyio.to_thread.run_sync(part.restart)
        if part.done < part.size:
            raise self._truncated(url, part.done, part.size)

    async def _attempt(
        self, url: str, part: PartialFile, *, sha256: str, progress: Progress | None,
        events: _Events,
    ) -> bool:
        """One stream; False means "restart from zero and ask again"."""
        origin = None
        if self.validated and part.done > 0:
            origin = await anyio.to_thread.run_sync(part.read_origin, url, sha256)
        async with self._open(url, part.done, part.size, origin or Validators()) as stream:
            if stream is None:
                return False
            if not stream.resumed:
                if part.done > 0:
                    events.info("download.restarted", url=url, offset=part.done)
                    await anyio.to_thread.run_sync(part.restart)
                await anyio.to_thread.run_sync(part.record_origin, url, sha256,
                                               stream.validators)
            if stream.length is not None and part.done + stream.length > part.size:
                raise DownloadOversize(
                    f"{url}: Content-Length {stream.length} at offset {part.done} exceeds "
                    f"the manifest's {part.size} bytes; refused"
                )
            if progress is not None and not self.quiet:
                progress(part.done, part.size)
            await stream_into(part, stream.body, policy=self.policy, limiter=self.limiter,
                              progress=progress, url=url)
        return True


class _Events(Protocol):
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...


class _Quiet:
    """The event log of a quiet transport: says nothing."""

    def info(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        pass


_QUIET = _Quiet()


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


async def _finish(part: PartialFile, sha256: str) -> None:
    """fsync, close and check the hash: a mismatch deletes the file and its meta, a
    match deletes the meta (nothing will resume from this file)."""
    digest = await anyio.to_thread.run_sync(part.finish)
    if digest != sha256:
        await anyio.to_thread.run_sync(remove_download, part.dest)
        raise BundleHashMismatch(
            f"{part.dest.name}: sha256 {digest}, manifest says {sha256}; file removed"
        )
    await anyio.to_thread.run_sync(part.drop_origin)
