"""HTTP(S): requests, status and header checks, and httpx's errors in patchd's classes.

Two reads go over HTTP: a document (manifest, signature: :func:`get_document`, capped
at :data:`patchd.trust.manifest.MAX_DOCUMENT_BYTES`, one stall rule and one total
deadline from the request on, on the event loop) and a bundle's byte stream
(:class:`HttpTransport`, the transport of the download template in
:mod:`patchd.fetch.transfer`: the bulk client in worker threads, :mod:`patchd.fetch.wire`).

- ``Accept-Encoding: identity`` is sent, and the body is taken as *bytes on the wire*
  (raw, never decoded): a store that labels a stored ``.patchd`` with
  ``Content-Encoding`` (S3/GCS object metadata) still serves the right bytes, and a
  server that really transcodes is caught by the hash against the signed manifest.
- A resume sends ``Range: bytes=N-`` and ``If-Range`` with the partial's strong ETag
  (else its Last-Modified). A ``206`` must answer exactly ``N-…/size``; a ``416`` or a
  wrong ``Content-Range`` makes the template restart from zero and ask again; a
  ``200`` is the whole file (the template restarts the partial to take it).
- 5xx/408/425/429 are :class:`ServerError` with ``retry_after``; 404/410 on a bundle
  :class:`BundleNotFound` (the mirror or CDN edge may lag the signed manifest); other
  statuses, TLS failures, bad URLs and redirect loops :class:`RepositoryError`;
  transport errors and timeouts :class:`NetworkError`.
"""

from __future__ import annotations

import contextlib
import email.utils
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import httpx
import structlog

from patchd.core.errors import (
    BundleNotFound,
    DownloadTruncated,
    ManifestInvalid,
    RepositoryError,
    ServerError,
)
from patchd.fetch.client import RepoClient
from patchd.fetch.limits import DownloadPolicy, RateLimiter, StallDeadline
from patchd.fetch.partial import Validators
from patchd.fetch.transfer import Stream, Transport
from patchd.fetch.wire import http_errors, open_body, send_head
from patchd.trust.manifest import MAX_DOCUMENT_BYTES

log = structlog.get_logger("patchd.fetch.http")


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


def if_range_value(origin: Validators) -> str | None:
    """A strong ETag, else Last-Modified; weak ETags are not allowed in If-Range."""
    if origin.etag and not origin.etag.startswith("W/"):
        return origin.etag
    return origin.last_modified


async def get_document(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], policy: DownloadPolicy,
) -> tuple[bytes, dict[str, str]] | None:
    """The body of ``url`` and its validators, or None on a 304 to a conditional GET."""
    # The download stall rule holds from the request on, and the whole read must end
    # within the document deadline: a manifest trickled just under httpx's per-read
    # timeout, or just above the stall threshold, would otherwise hold a check for hours.
    stall = StallDeadline(policy)
    result: tuple[bytes, dict[str, str]] | None = None
    with http_errors(url), stall.scope:
        async with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 304 and headers:
                return None
            if resp.status_code != 200:
                raise status_error(resp, url, bundle=False)
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_DOCUMENT_BYTES:
                raise ManifestInvalid(f"{url} is larger than 4 MiB "
                                      f"(Content-Length {length}); refused unread")
            body = bytearray()
            # Bytes on the wire, like bundles: the signature decides.
            async for chunk in resp.aiter_raw():
                body += chunk
                stall.received(len(chunk))
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ManifestInvalid(f"{url} is larger than 4 MiB; stopped reading")
            found = {}
            if resp.headers.get("etag"):
                found["etag"] = resp.headers["etag"]
            if resp.headers.get("last-modified"):
                found["last_modified"] = resp.headers["last-modified"]
            result = bytes(body), found
    stall.check(url)
    return result


class HttpTransport(Transport):
    """Bundles over the bulk client of one :class:`RepoClient`: a GET, ranged and
    conditional to resume, its body read in worker threads."""

    def __init__(self, client: RepoClient, policy: DownloadPolicy, limiter: RateLimiter) -> None:
        super().__init__(policy, limiter)
        self.client = client

    @contextlib.asynccontextmanager
    async def _open(
        self, url: str, offset: int, size: int, origin: Validators,
    ) -> AsyncIterator[Stream | None]:
        headers = {"Accept-Encoding": "identity"}
        ranged = offset > 0
        if ranged:
            headers["Range"] = f"bytes={offset}-"
            validator = if_range_value(origin)
            if validator:
                headers["If-Range"] = validator
        with http_errors(url):
            resp = await send_head(self.client.bulk(), url, headers, self.policy.stall_window)
        stream: Stream | None = None
        try:
            stream = self._stream(resp, url, offset, size, ranged=ranged)
            yield stream
        finally:
            # The receive thread may still be in a read (abandoned on cancel): the body
            # closes the response once that read returns.
            close = stream.body.close if stream is not None else resp.close
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)

    def _stream(
        self, resp: httpx.Response, url: str, offset: int, size: int, *, ranged: bool,
    ) -> Stream | None:
        status = resp.status_code
        if status == 416 and ranged:
            log.warning("download.range_refused", url=url, offset=offset)
            return None
        if status == 206 and ranged:
            cr = parse_content_range(resp.headers.get("content-range"))
            if cr is None or cr[0] != offset or cr[2] != size or cr[1] < cr[0]:
                log.warning("download.bad_content_range", url=url, offset=offset,
                            content_range=resp.headers.get("content-range"))
                return None
        elif status != 200:
            raise status_error(resp, url, bundle=True)
        length = resp.headers.get("content-length", "")
        return Stream(
            open_body(resp, url),
            resumed=status == 206,
            length=int(length) if length.isdigit() else None,
            validators=Validators(resp.headers.get("etag") or None,
                                  resp.headers.get("last-modified") or None),
        )

    def _truncated(self, url: str, done: int, size: int) -> DownloadTruncated:
        return DownloadTruncated(
            f"{url}: response ended after {done} of {size} bytes; partial kept"
        )
