"""A small misbehaving HTTP/1.1 server on 127.0.0.1, scripted per test.

nginx is a well-behaved server; this one does what real networks and broken mirrors
do: resets mid-body, lies in Content-Length or Content-Range, trickles, loops
redirects. Each connection runs in a thread; the test sets ``server.handler`` to a
function ``(request, conn) -> None`` that writes whatever it likes with the helpers
on :class:`Conn`. Every request is recorded in ``server.requests``. Responses always
carry ``Connection: close`` so each request is one connection, which keeps scripts
simple and lets a handler count requests by position.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Request:
    """A parsed request head."""

    method: str
    path: str
    headers: dict[str, str]
    index: int

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Conn:
    """One client connection and the ways to (mis)answer it."""

    sock: socket.socket
    stop: threading.Event
    sent: int = 0
    closed: bool = field(default=False)

    def send(self, data: bytes) -> bool:
        """Send bytes; False when the client went away."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def head(self, status: int, headers: dict[str, str] | None = None,
             reason: str = "X") -> bool:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for k, v in {**(headers or {}), "Connection": "close"}.items():
            lines.append(f"{k}: {v}")
        return self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def respond(self, status: int, body: bytes = b"",
                headers: dict[str, str] | None = None) -> bool:
        """A complete response with a truthful Content-Length unless one is given."""
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        return self.head(status, hdrs) and self.send(body)

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def trickle(self, data: bytes, interval: float) -> None:
        """Send one byte per ``interval`` until done, the client leaves or the server stops."""
        for i in range(len(data)):
            if self.stop.wait(interval) or not self.send(data[i : i + 1]):
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.sock.close()


Handler = Callable[[Request, Conn], object]


def _read_head(sock: socket.socket) -> bytes | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 65536:
            return None
    return buf.split(b"\r\n\r\n", 1)[0]


class BadServer:
    """The server; ``handler`` must be set before the client connects."""

    def __init__(self) -> None:
        self.handler: Handler = lambda req, conn: conn.respond(404)
        self.requests: list[Request] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def __repr__(self) -> str:
        return f"BadServer(port={self.port}, requests={len(self.requests)})"

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        self._accepter.start()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepter.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        conn = Conn(sock, self.stop)
        try:
            sock.settimeout(10)
            raw = _read_head(sock)
            if raw is None:
                return
            first, *lines = raw.decode("latin-1").split("\r\n")
            method, path, _version = first.split(" ", 2)
            headers = {}
            for line in lines:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            with self._lock:
                req = Request(method, path, headers, len(self.requests))
                self.requests.append(req)
            self.handler(req, conn)
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def badserver() -> Iterator[BadServer]:
    """A started :class:`BadServer`, stopped (threads joined) after the test."""
    server = BadServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
