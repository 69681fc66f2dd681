"""The bulk body path (fetch/wire.py, fetch/pump.py) against a misbehaving server:
cancellation within a second wherever the worker threads wait, the bytes h11 read past
the head, chunked bodies, slow bodies within the read timeout, and which socket may be
read directly."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from patchd.core.errors import DownloadStalled, NetworkError
from patchd.fetch import DownloadPolicy
from patchd.fetch.pump import Progress
from patchd.fetch.sources import HttpSource
from patchd.fetch.wire import body_socket
from support import badserver as _badserver
from support.badserver import BadServer, Conn, Request

badserver = _badserver.badserver  # the fixture
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

DATA = os.urandom(3 * 1024 * 1024 + 17)  # more than a buffer: several hand-overs
SIZE = len(DATA)
SHA = hashlib.sha256(DATA).hexdigest()


async def fetch(server: BadServer, dest: Path, *, read_timeout: float = 30.0,
                size: int = SIZE, sha: str = SHA, progress: Progress | None = None) -> None:
    async with HttpSource(server.url("/manifest.json"), timeout=read_timeout) as src:
        await src.download(server.url("/b.patchd"), dest, size=size, sha256=sha, offset=0,
                           progress=progress)


def wait_closed(conn: Conn, seconds: float) -> float | None:
    """Seconds until the client closes the connection, or None (server side)."""
    started = time.monotonic()
    conn.sock.settimeout(0.05)
    while time.monotonic() - started < seconds:
        try:
            if conn.sock.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


async def test_cancel_during_a_silent_body_returns_at_once_and_closes(
        badserver: BadServer, tmp_path: Path) -> None:
    """Cancelled while the receive thread waits in a read of a silent body (the bytes
    before it are on disk: a buffer goes to the writer after a second), the download
    returns within a second, leaves them, and the connection is closed soon after."""
    closed_after: list[float | None] = []

    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.send(DATA[:1000])
        closed_after.append(wait_closed(conn, 5))

    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:
        def progress(done: int, total: int) -> None:
            nonlocal cancelled_at
            if done == 1000:
                cancelled_at = time.monotonic()
                scope.cancel()
        await fetch(badserver, dest, progress=progress)
    assert scope.cancelled_caught and cancelled_at
    assert time.monotonic() - cancelled_at < 1.0
    assert dest.read_bytes() == DATA[:1000]
    await anyio.to_thread.run_sync(lambda: badserver.close())  # joins the handler
    assert closed_after and closed_after[0] is not None and closed_after[0] < 2.0


async def test_a_stalled_chunked_body_ends_in_a_window_and_keeps_its_bytes(
        badserver: BadServer, tmp_path: Path) -> None:
    """A chunked body is read through httpx, whose read cannot tick: when it goes silent
    the stall rule still ends the download within a window (not at the 30 s read
    timeout), the bytes received before are kept, and the connection is closed."""
    closed_after: list[float | None] = []

    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Transfer-Encoding": "chunked"})
        conn.send(b"3e8\r\n" + DATA[:1000] + b"\r\n")
        closed_after.append(wait_closed(conn, 5))

    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    src = HttpSource(badserver.url("/manifest.json"), timeout=30.0,
                     policy=DownloadPolicy(stall_window=0.5, stall_min_bytes=1))
    async with src:  # open throughout, like the daemon's client
        started = time.monotonic()
        with pytest.raises(DownloadStalled):
            await src.download(badserver.url("/b.patchd"), dest, size=SIZE, sha256=SHA,
                               offset=0, progress=None)
        assert time.monotonic() - started < 2.0
        await anyio.to_thread.run_sync(lambda: badserver.close())  # joins the handler
    assert dest.read_bytes() == DATA[:1000]
    assert closed_after and closed_after[0] is not None and closed_after[0] < 2.0


async def test_cancel_while_waiting_for_the_head_returns_at_once(
        badserver: BadServer, tmp_path: Path) -> None:
    """Cancelled while the head thread waits for a server that never answers, the
    download returns within a second, and the thread left behind lets go of the
    connection at once (not after the 30 s read timeout)."""
    asked = threading.Event()
    closed_after: list[float | None] = []

    def handler(req: Request, conn: Conn) -> None:
        asked.set()
        closed_after.append(wait_closed(conn, 5))

    badserver.handler = handler
    cancelled_at = 0.0
    async with HttpSource(badserver.url("/manifest.json"), timeout=30.0) as src:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(src.download, badserver.url("/b.patchd"),
                                  tmp_path / "b.patchd", size=SIZE, sha256=SHA, offset=0,
                                  progress=None))
            await anyio.to_thread.run_sync(asked.wait, 10)
            assert asked.is_set()
            cancelled_at = time.monotonic()
            tg.cancel_scope.cancel()
        assert time.monotonic() - cancelled_at < 1.0
        # The client stays open (the daemon's does): the thread must let go by itself.
        await anyio.to_thread.run_sync(lambda: badserver.close())  # joins the handler
    assert closed_after and closed_after[0] is not None and closed_after[0] < 2.0


async def test_a_head_trickled_past_the_stall_window_is_cut_off(
        badserver: BadServer, tmp_path: Path) -> None:
    """Header lines trickled forever end in DownloadStalled after one stall window, and
    the connection is closed then, not left to the thread until h11's head limit."""
    gone: list[float] = []
    cut = threading.Event()

    def handler(req: Request, conn: Conn) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\n")
        while not conn.stop.wait(0.05):
            if not conn.send(b"X-Slow: 1\r\n"):
                gone.append(time.monotonic())
                cut.set()
                return

    badserver.handler = handler
    src = HttpSource(badserver.url("/manifest.json"), timeout=5.0,
                     policy=DownloadPolicy(stall_window=0.5))
    async with src:  # open throughout, like the daemon's client
        with pytest.raises(DownloadStalled, match="no complete response head"):
            await src.download(badserver.url("/b.patchd"), tmp_path / "b.patchd", size=SIZE,
                               sha256=SHA, offset=0, progress=None)
        stalled_at = time.monotonic()
        await anyio.to_thread.run_sync(cut.wait, 5)
    assert gone and gone[0] - stalled_at < 1.5


async def test_body_slower_than_a_tick_within_the_read_timeout_completes(
        badserver: BadServer, tmp_path: Path) -> None:
    """Pieces 0.6 s apart with a 1 s read timeout: every wait is under the timeout, so
    the download completes (the timeout counts from the last bytes, the first included)."""
    small = DATA[:40_000]

    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(len(small))})
        for pos in range(0, len(small), 10_000):
            if conn.stop.wait(0.6) or not conn.send(small[pos:pos + 10_000]):
                return

    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    await fetch(badserver, dest, read_timeout=1.0, size=len(small),
                sha=hashlib.sha256(small).hexdigest())
    assert dest.read_bytes() == small


async def test_silence_after_the_head_is_a_read_timeout(
        badserver: BadServer, tmp_path: Path) -> None:
    """A head and then nothing is a timeout after the read timeout, not a hang."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.stop.wait(10)

    badserver.handler = handler
    started = time.monotonic()
    with pytest.raises(NetworkError, match="timed out"):
        await fetch(badserver, tmp_path / "b.patchd", read_timeout=0.5)
    assert time.monotonic() - started < 5


async def test_body_bytes_sent_with_the_head_come_first(
        badserver: BadServer, tmp_path: Path) -> None:
    """The head and the body's start in one segment (h11 reads them together), the rest
    after a pause: the bytes h11 kept are written first, the socket's after them."""
    def handler(req: Request, conn: Conn) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n".encode()
        conn.send(head + DATA[:5000])
        if not conn.stop.wait(0.2):
            conn.send(DATA[5000:])

    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    await fetch(badserver, dest)
    assert dest.read_bytes() == DATA


async def test_chunked_body_is_read_through_httpx(badserver: BadServer, tmp_path: Path) -> None:
    """A chunked body (no Content-Length) is unframed by httpx and lands exactly."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Transfer-Encoding": "chunked"})
        for pos in range(0, SIZE, 300_000):
            piece = DATA[pos:pos + 300_000]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")

    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    await fetch(badserver, dest)
    assert dest.read_bytes() == DATA


class _Stream:
    def __init__(self, **info: Any) -> None:
        self.info = info

    def get_extra_info(self, name: str) -> Any:
        return self.info.get(name)


def _response(stream: _Stream, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers=headers, extensions={"network_stream": stream})


def test_only_a_socket_carrying_exactly_the_body_is_read_directly() -> None:
    """The socket is read directly for a Content-Length body on a plain socket or on an
    SSLSocket; never for TLS inside TLS (an HTTPS proxy), chunked bodies or no length."""
    plain = socket.socket()
    ctx = ssl.create_default_context()
    tls_sock = ctx.wrap_socket(socket.socket(), server_hostname="x",
                               do_handshake_on_connect=False)
    inner = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    try:
        length = {"content-length": "10"}
        assert body_socket(_response(_Stream(socket=plain), **length)) is plain
        assert body_socket(_response(_Stream(socket=tls_sock, ssl_object=object()),
                                     **length)) is tls_sock
        assert body_socket(_response(_Stream(socket=tls_sock, ssl_object=inner),
                                     **length)) is None
        assert body_socket(_response(_Stream(socket=plain, ssl_object=inner),
                                     **length)) is None
        assert body_socket(_response(_Stream(socket=plain))) is None
        assert body_socket(_response(_Stream(socket=plain), **length,
                                     **{"transfer-encoding": "chunked"})) is None
        assert body_socket(_response(_Stream(), **length)) is None
    finally:
        plain.close()
        tls_sock.close()
