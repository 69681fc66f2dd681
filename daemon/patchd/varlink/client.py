"""Small varlink clients: synchronous for command-line tools, asynchronous for async code.

Both speak ``message.py``'s wire format and fail the same way, so an application
words its messages once: ``ConnectFailed`` (with the errno: no socket, nobody
listening, or no permission), ``ProtocolError`` (the service hung up, timed out or
sent garbage), and ``VarlinkError`` with its name and parameters for an error reply.
"""

from __future__ import annotations

import array
import socket
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import anyio
from anyio.abc import SocketStream

from .errors import ConnectFailed, ProtocolError, VarlinkError
from .message import decode_message, encode_message

#: Replies may be larger than requests (a long listing), but not unbounded.
MAX_REPLY: Final = 16 << 20
_READ_SIZE: Final = 64 * 1024


def _call_message(
    method: str, parameters: Mapping[str, Any] | None, *, more: bool = False, oneway: bool = False
) -> bytes:
    message: dict[str, Any] = {"method": method, "parameters": dict(parameters or {})}
    if more:
        message["more"] = True
    if oneway:
        message["oneway"] = True
    return encode_message(message)


class _Framer:
    """Splits received bytes into messages; bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        if not data:
            raise ProtocolError("the daemon closed the connection before replying")
        self._buffer += data

    def pop(self) -> dict[str, Any] | None:
        """The next complete reply, or None if more bytes are needed."""
        end = self._buffer.find(b"\0")
        if end < 0:
            if len(self._buffer) > self.limit:
                raise ProtocolError(f"reply larger than {self.limit} bytes")
            return None
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            reply = decode_message(raw)
        except ValueError as exc:
            raise ProtocolError(f"the daemon sent invalid JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise ProtocolError("the daemon sent a reply that is not an object")
        return reply


def _unpack(reply: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(parameters, continues) of a reply; raises VarlinkError for an error reply."""
    parameters = reply.get("parameters") or {}
    if "error" in reply:
        raise VarlinkError(str(reply["error"]), parameters)
    return parameters, reply.get("continues") is True


class VarlinkClient:
    """A blocking connection to a varlink service on a Unix socket (one call at a time)."""

    def __init__(
        self, path: Path | str, *, timeout: float | None = 30.0, max_reply: int = MAX_REPLY
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._framer = _Framer(max_reply)
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(self.path))
        except OSError as exc:
            self.close()
            raise ConnectFailed(self.path, exc) from exc

    def __repr__(self) -> str:
        return f"VarlinkClient({str(self.path)!r}, open={self._sock is not None})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(
        self, method: str, parameters: Mapping[str, Any] | None = None, *, oneway: bool = False,
        fds: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Call ``method`` (fully qualified) and return its reply parameters.

        ``fds`` travel with the call (SCM_RIGHTS); a parameter names one by its index.
        """
        self._send(_call_message(method, parameters, oneway=oneway), fds)
        if oneway:
            return {}
        parameters_out, _ = _unpack(self._receive(self.timeout))
        return parameters_out

    def stream(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Call with ``more`` and yield each reply until the last; ``timeout`` per reply.

        Leaving the loop early closes the connection (the daemon may still be sending).
        """
        self._send(_call_message(method, parameters, more=True))
        finished = False
        try:
            while True:
                reply, continues = _unpack(self._receive(timeout))
                finished = not continues
                yield reply
                if finished:
                    return
        finally:
            if not finished:
                self.close()

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        sock = self._open()
        try:
            if fds:
                # The descriptors ride on the first bytes; the rest follows as usual.
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = sock.sendmsg([data], rights)
                data = data[sent:]
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise ProtocolError(f"the connection to {self.path} broke: {exc}") from exc

    def _receive(self, timeout: float | None) -> dict[str, Any]:
        sock = self._open()
        sock.settimeout(timeout)
        while (reply := self._framer.pop()) is None:
            try:
                self._framer.feed(sock.recv(_READ_SIZE))
            except TimeoutError as exc:
                self.close()
                raise ProtocolError(f"no reply from {self.path} within {timeout} s") from exc
            except OSError as exc:
                self.close()
                raise ProtocolError(f"the connection to {self.path} broke: {exc}") from exc
        return reply

    def _open(self) -> socket.socket:
        if self._sock is None:
            raise ProtocolError(f"the connection to {self.path} is closed")
        return self._sock


class AsyncVarlinkClient:
    """The same client for async code: ``async with await AsyncVarlinkClient.connect(p)``."""

    def __init__(self, stream: SocketStream, path: Path, max_reply: int = MAX_REPLY) -> None:
        self.path = path
        self._stream = stream
        self._framer = _Framer(max_reply)

    def __repr__(self) -> str:
        return f"AsyncVarlinkClient({str(self.path)!r})"

    @classmethod
    async def connect(cls, path: Path | str, *, max_reply: int = MAX_REPLY) -> AsyncVarlinkClient:
        try:
            stream = await anyio.connect_unix(path)
        except OSError as exc:
            raise ConnectFailed(Path(path), exc) from exc
        return cls(stream, Path(path), max_reply)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def call(
        self, method: str, parameters: Mapping[str, Any] | None = None, *, oneway: bool = False
    ) -> dict[str, Any]:
        """Call ``method`` and return its reply parameters (no timeout: wrap in one)."""
        await self._send(_call_message(method, parameters, oneway=oneway))
        if oneway:
            return {}
        reply, _ = _unpack(await self._receive())
        return reply

    async def stream(
        self, method: str, parameters: Mapping[str, Any] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Call with ``more`` and yield each reply until the last."""
        await self._send(_call_message(method, parameters, more=True))
        while True:
            reply, continues = _unpack(await self._receive())
            yield reply
            if not continues:
                return

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ProtocolError(f"the connection to {self.path} broke") from exc

    async def _receive(self) -> dict[str, Any]:
        while (reply := self._framer.pop()) is None:
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            self._framer.feed(data)
        return reply
