"""A bundle's response over the wire: the head through httpx, the body in bulk reads.

A bundle is fetched with the bulk client (:meth:`patchd.fetch.client.RepoClient.bulk`,
httpx's synchronous client built from the same settings as the control traffic's: TLS,
proxy, headers, timeouts, redirects) from worker threads, so the event loop never
handles a byte of it:

- :func:`send_head`: the request and the response head, in a worker thread, within one
  stall window; a cancel is honoured at once (the thread is left to close what it gets);
- :func:`open_body`: the body for the pump (:mod:`patchd.fetch.pump`).

The body is read with ``recv_into`` on the connection's socket, straight into the
pump's buffers (:class:`SocketBody`): a whole buffer per read (one ``MSG_WAITALL``
system call on a plain socket, a loop over TLS records on a TLS one), no HTTP framing
in Python and no copy on the way. The socket comes from the response's
``network_stream`` extension (httpx and httpcore document it and its
``get_extra_info``; every httpcore backend answers ``get_extra_info("socket")``, and
without an answer the body is read through httpx, below). It is used only where it
certainly carries exactly the body's bytes:

- HTTP/1.x with a ``Content-Length`` and no ``Transfer-Encoding``: the body is the next
  ``Content-Length`` bytes, and nothing past them is read;
- the stream's TLS, if any, is that socket's own (an ``ssl.SSLSocket``), not TLS inside
  another TLS connection (an HTTPS proxy's), whose socket carries the proxy's records.

The bytes h11 read past the head come first, as the response iterator's first chunk
(h11 hands over everything it holds of a ``Content-Length`` body at once). Every other
response is read through that iterator (:class:`IterBody`): slower, still exact. A
connection whose body was read off its socket is closed afterwards (h11 never saw the
body end), so the next bundle opens a new one.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx

from patchd.core.errors import DownloadStalled, NetworkError, RepositoryError
from patchd.fetch.pump import Body


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


def _shut(stream: object) -> None:
    """Wake a thread blocked on ``stream``'s socket: it reads the end and gives up.

    ``socket.socket.shutdown`` rather than the stream's own: on an ``ssl.SSLSocket``
    that would also drop its TLS state under the reading thread.
    """
    get_extra_info = getattr(stream, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _HeadCall:
    """``client.send(stream=True)`` in a worker thread that may be abandoned.

    A response that arrives after the caller gave up is closed by the thread itself, and
    :meth:`abandon` shuts down the connections the request opened (learnt from httpx's
    documented ``trace`` extension), so a thread held by a server trickling its head
    ends at once instead of after h11's head limit.
    """

    def __init__(self, client: httpx.Client, url: str, headers: dict[str, str]) -> None:
        self.client = client
        self.request = client.build_request("GET", url, headers=headers,
                                            extensions={"trace": self._trace})
        self._lock = threading.Lock()
        self._abandoned = False
        self._response: httpx.Response | None = None
        self._streams: list[object] = []

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        stream = info.get("return_value")
        if not event.endswith(".complete") or not hasattr(stream, "get_extra_info"):
            return
        with self._lock:
            self._streams.append(stream)
            abandoned = self._abandoned
        if abandoned:
            _shut(stream)

    def run(self) -> httpx.Response:
        response = self.client.send(self.request, stream=True)
        with self._lock:
            if not self._abandoned:
                self._response = response
                return response
        response.close()
        return response

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            response, self._response = self._response, None
            streams = list(self._streams)
        if response is not None:
            response.close()
            return
        for stream in streams:
            _shut(stream)


async def send_head(
    client: httpx.Client, url: str, headers: dict[str, str], window: float,
) -> httpx.Response:
    """GET ``url`` with the bulk client: the response with its body unread. The head must
    arrive within ``window`` seconds (httpx's read timeout is per read, so a server
    trickling header lines would otherwise hold us until h11's 64 KiB head limit)."""
    call = _HeadCall(client, url, headers)
    response: httpx.Response | None = None
    try:
        with anyio.move_on_after(window):
            response = await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
        if response is None:
            raise DownloadStalled(f"{url}: no complete response head within "
                                  f"{window:g}s; stalled")
        return response
    finally:
        if response is None:
            call.abandon()


def body_socket(response: httpx.Response) -> socket.socket | None:
    """The socket whose next bytes are exactly the body, or None (see the module)."""
    if response.http_version not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    if "transfer-encoding" in response.headers:
        return None
    if not response.headers.get("content-length", "").isdigit():
        return None
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    sock = stream.get_extra_info("socket")
    tls = stream.get_extra_info("ssl_object")
    if isinstance(tls, ssl.SSLObject):  # TLS inside TLS: not this socket's records
        return None
    if isinstance(sock, ssl.SSLSocket):
        return sock if tls is not None else None
    if isinstance(sock, socket.socket) and tls is None:
        return sock
    return None


def _read_timeout(response: httpx.Response) -> float | None:
    timeouts = response.request.extensions.get("timeout") or {}
    value = timeouts.get("read")
    return float(value) if isinstance(value, int | float) else None


class IterBody(Body):
    """The body through httpx's iterator of raw chunks (any framing, any stream)."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        super().__init__()
        self.response = response
        self.url = url
        self._chunks = response.iter_raw()
        self._pending = memoryview(b"")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _next_chunk(self) -> bool:
        """Wait for the iterator's next chunk; False at the end of the body."""
        with http_errors(self.url):
            chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._pending = memoryview(chunk)
        return True

    def _copy(self, view: memoryview) -> int:
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _read(self, view: memoryview, timeout: float) -> int | None:
        while not self._pending:
            if not self._next_chunk():
                return 0
        return self._copy(view)

    def _release(self) -> None:
        self.response.close()

    def interrupt(self) -> None:
        _shut(self.response.extensions.get("network_stream"))


class SocketBody(IterBody):
    """A ``Content-Length`` body read with ``recv_into`` on the connection's socket."""

    def __init__(self, response: httpx.Response, url: str, sock: socket.socket) -> None:
        super().__init__(response, url)
        self.sock = sock
        self.length = int(response.headers["content-length"])
        self.read_timeout = _read_timeout(response)
        #: Body bytes not yet read; None until h11's buffered part has been taken.
        self._left: int | None = None
        self._timeout: float | None = -1.0
        self._last = time.monotonic()
        #: An error met after some bytes of a read: raised by the next read.
        self._error: NetworkError | None = None

    def _read(self, view: memoryview, timeout: float) -> int | None:
        if self._left is None:
            # Whatever h11 read past the head: its first chunk holds all of it.
            self._left = self.length
            if self.length and self._next_chunk():
                self._left -= len(self._pending)
            self._last = time.monotonic()
        if self._pending:
            return self._copy(view)
        if self._error is not None:
            raise self._error
        if self._left <= 0:
            return 0
        want = min(len(view), self._left)
        try:
            got = self._fill(view[:want], timeout)
        except TimeoutError as exc:
            if (self.read_timeout is not None
                    and time.monotonic() - self._last > self.read_timeout):
                raise NetworkError(f"{self.url}: timed out (ReadTimeout)") from exc
            return None
        except _Partial as partial:
            got, self._error = partial.got, partial.error  # those bytes first
        except OSError as exc:  # ssl.SSLError included: a broken record mid-body
            raise NetworkError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        self._left -= got
        if got:
            self._last = time.monotonic()
        return got

    def _fill(self, view: memoryview, timeout: float) -> int:
        """Read into ``view`` until it is full, the body ends or ``timeout`` passes;
        raise TimeoutError when nothing came, :class:`_Partial` for an error after some
        bytes.

        The caller's round per read (locks, clocks, the rate limiter) costs more than
        the read itself, so one call fills as much as it can. A plain socket does it in
        one system call: blocking, with ``SO_RCVTIMEO`` as the time limit and
        ``MSG_WAITALL`` (measured: 0.3 CPU-s/GiB less than reads of what the kernel
        holds, which return 64-256 KiB each). A TLS read returns one record (16 KiB),
        so a TLS socket loops, on Python's own timeout.
        """
        if isinstance(self.sock, ssl.SSLSocket):
            return self._fill_tls(view, timeout)
        if timeout != self._timeout:
            self.sock.settimeout(None)
            seconds = int(timeout)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(
                "ll", seconds, max(int((timeout - seconds) * 1e6), 1 if not seconds else 0)))
            self._timeout = timeout
        try:
            return self.sock.recv_into(view, len(view), socket.MSG_WAITALL)
        except BlockingIOError:  # SO_RCVTIMEO passed with nothing received
            raise TimeoutError from None

    def _fill_tls(self, view: memoryview, timeout: float) -> int:
        if timeout != self._timeout:  # settimeout costs a system call
            self.sock.settimeout(timeout)
            self._timeout = timeout
        deadline = time.monotonic() + timeout
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    break  # closed before Content-Length: the template says truncated
                got += n
                if time.monotonic() >= deadline:
                    break
        except TimeoutError:
            if got == 0:
                raise
        except OSError as exc:
            if got == 0:
                raise
            error = NetworkError(f"{self.url}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            raise _Partial(got, error) from exc
        return got


class _Partial(Exception):
    """Some bytes arrived before an error: the caller hands them over first."""

    def __init__(self, got: int, error: NetworkError) -> None:
        super().__init__(got)
        self.got = got
        self.error = error


def open_body(response: httpx.Response, url: str) -> IterBody:
    """The fastest exact reader of ``response``'s body (see the module)."""
    sock = body_socket(response)
    if sock is None:
        return IterBody(response, url)
    return SocketBody(response, url, sock)
