"""One client connection on the server side: framing, limits, streaming, hang-ups.

A bad client must never take the server down nor delay other clients, hence: a
per-message size limit, an idle timeout while waiting for a request, a short deadline
for a message once its first byte arrived (slow-loris), a budget shared by every
unprivileged connection for the bytes of messages not yet complete (a thousand
half-sent 1 MiB messages must not cost a GiB), a write timeout (a client that never
reads is dropped), and every per-connection failure caught and logged here, at the
connection's boundary (``serve_connection``). The caps on concurrent connections
(in all, per uid, and the reserve for privileged peers) are the server's.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import inspect
import os
import select
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

import anyio
import structlog
from anyio.lowlevel import checkpoint

from .errors import InvalidParameter, VarlinkError
from .message import (
    BadCall,
    Call,
    Last,
    PeerCred,
    Reply,
    decode_message,
    encode_message,
    parse_call,
)
from .service import VarlinkService

log = structlog.get_logger(__name__)

MAX_MESSAGE: Final = 1 << 20
_READ_SIZE: Final = 64 * 1024
#: File descriptors one call may carry (SCM_RIGHTS); a client that sends more, or
#: whose descriptors the kernel had to truncate, is dropped and all of them closed.
MAX_FDS: Final = 4
_ANCILLARY: Final = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

_Stream: TypeAlias = AsyncGenerator[Reply | Last, None]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost the server; each bound is a way a client can misbehave.

    - ``max_message``: bytes of one message before its NUL; a larger message is
      answered ``InvalidParameter`` and the connection dropped.
    - ``idle_timeout``: seconds to wait for the next complete request.
    - ``write_timeout``: seconds a reply may take to be accepted by the kernel; a
      client that does not read is dropped.
    - ``message_timeout``: seconds a message may take from its first byte to its NUL.
    - ``max_buffered``: bytes of incomplete messages all unprivileged connections
      together may hold; the connection that would pass it is dropped.
    - ``max_connections``: connections beyond this are closed at once (the server's).
    - ``max_per_uid``: connections one unprivileged uid may hold (the server's).
    - ``reserved``: of ``max_connections``, how many only privileged peers may use, so
      that the peers who must always get through (a boot report) always do.
    """

    max_message: int = MAX_MESSAGE
    idle_timeout: float = 300.0
    write_timeout: float = 10.0
    message_timeout: float = 10.0
    max_buffered: int = 16 * MAX_MESSAGE
    max_connections: int = 1024
    max_per_uid: int = 32
    reserved: int = 64


class Budget:
    """Bytes of incomplete messages held by unprivileged connections, all together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def __repr__(self) -> str:
        return f"Budget({self.used}/{self.limit})"


class _Drop(Exception):
    """Internal: end this connection now; ``reason`` is logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def serve_connection(service: VarlinkService, sock: socket.socket, limits: Limits,
                           peer: PeerCred | None = None, budget: Budget | None = None) -> None:
    """Serve one accepted, non-blocking socket until it ends; never raises an error.

    Whatever one client does, or whatever goes wrong while serving it, ends that
    connection and is logged; the caller owns the socket and closes it. ``budget``:
    the shared budget this (unprivileged) connection's incomplete messages count
    against; None for a privileged peer.
    """
    conn: _Connection | None = None
    try:
        peer = peer or PeerCred.of(sock)
        conn = _Connection(service, sock, peer, limits, budget)
        await conn.run()
    except _Drop as exc:
        log.info("varlink.connection_dropped", reason=exc.reason,
                 peer_pid=peer.pid if peer else None, peer_uid=peer.uid if peer else None)
    except Exception:
        log.exception("varlink.connection_failed",
                      peer_pid=peer.pid if peer else None, peer_uid=peer.uid if peer else None)
    finally:
        if conn is not None:
            conn.release()


_END: Final = object()


async def _next_reply(replies: AsyncIterator[Reply | Last]) -> Any:
    """The next item of a stream, or ``_END`` when it is exhausted."""
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return _END


class _Connection:
    """One client: reads calls in order, answers them, enforces the limits."""

    def __init__(
        self, service: VarlinkService, sock: socket.socket, peer: PeerCred, limits: Limits,
        budget: Budget | None = None,
    ) -> None:
        self.service = service
        self.sock = sock
        self.peer = peer
        self.limits = limits
        self._budget = budget
        self._charged = 0
        self._buffer = bytearray()
        self._scanned = 0
        self._eof = False
        #: Descriptors of the message just taken from the buffer, for its call.
        self._message_fds: tuple[int, ...] = ()
        #: Descriptors received and not yet given to a call: (buffer offset, fds).
        self._fds: list[tuple[int, list[int]]] = []
        #: When the first byte of the message being received must be followed by its NUL.
        self._deadline: float | None = None

    def release(self) -> None:
        """Give this connection's share of the buffer budget back; close pending fds."""
        self._charge(0)
        for _, fds in self._fds:
            _close_all(fds)
        self._fds.clear()

    def _take_fds(self, end: int) -> tuple[int, ...]:
        """The descriptors that arrived with the message ending at ``end``."""
        mine = [fd for pos, fds in self._fds if pos <= end for fd in fds]
        self._fds = [(pos - end - 1, fds) for pos, fds in self._fds if pos > end]
        if len(mine) > MAX_FDS:
            _close_all(mine)
            raise _Drop("too_many_fds")
        return tuple(mine)

    def _charge(self, size: int) -> None:
        """Count ``size`` buffered bytes against the shared budget (drop if over it)."""
        if self._budget is None:
            return
        self._budget.used += size - self._charged
        self._charged = size
        if size and self._budget.used > self._budget.limit:
            raise _Drop("buffer_budget")

    def __repr__(self) -> str:
        return f"_Connection(peer={self.peer}, buffered={len(self._buffer)}, eof={self._eof})"

    async def run(self) -> None:
        """Serve calls until EOF, a limit is hit, or the client breaks the protocol."""
        handled = 0
        while True:
            # The idle timeout bounds only the wait for a request (slow handlers and
            # long streams are not idleness); a request trickled in byte by byte
            # counts as idle, so slow-loris clients are dropped too. A request already
            # buffered needs no timer (the hot path of pipelining clients).
            if self._buffer.find(b"\0", self._scanned) >= 0:
                raw = await self._next_message()
            else:
                with anyio.move_on_after(self.limits.idle_timeout) as waiting:
                    raw = await self._next_message()
                if waiting.cancelled_caught:
                    raise _Drop("idle_timeout")
            if raw is None:
                return
            await self._handle(raw)
            handled += 1
            if handled % 16 == 0:
                await checkpoint()  # a client that always has data must not starve others

    async def _next_message(self) -> bytes | None:
        """The next NUL-terminated message body, or None at a clean EOF."""
        while True:
            end = self._buffer.find(b"\0", self._scanned)
            if end >= 0:
                if end > self.limits.max_message:
                    await self._too_large()
                raw = bytes(self._buffer[:end])
                self._message_fds = self._take_fds(end)
                del self._buffer[: end + 1]
                self._scanned = 0
                self._deadline = None
                self._charge(0)
                return raw
            self._scanned = len(self._buffer)
            if self._scanned > self.limits.max_message:
                await self._too_large()
            if self._buffer and self._deadline is None:
                self._deadline = anyio.current_time() + self.limits.message_timeout
            self._charge(len(self._buffer))
            filled = True
            if self._deadline is None:
                filled = await self._fill()
            else:
                with anyio.move_on_at(self._deadline):
                    filled = await self._fill()
                    self._charge(len(self._buffer))
                if anyio.current_time() >= self._deadline and \
                        self._buffer.find(b"\0", self._scanned) < 0:
                    raise _Drop("message_timeout")
            if not filled:
                if self._buffer:
                    raise _Drop("eof_inside_message")
                return None

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF."""
        if self._eof:
            return False
        data, fds, truncated = await _receive(self.sock)
        if fds:
            self._fds.append((len(self._buffer), fds))
            if sum(len(f) for _, f in self._fds) > MAX_FDS:
                raise _Drop("too_many_fds")
        if truncated:
            raise _Drop("fds_truncated")
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def _too_large(self) -> None:
        """Answer an oversized message once, then drop: its end is never looked for."""
        await self._send(InvalidParameter("parameters").to_message())
        raise _Drop("message_too_large")

    async def _handle(self, raw: bytes) -> None:
        fds, self._message_fds = self._message_fds, ()
        try:
            await self._handle_call(raw, fds)
        finally:
            _close_all(fds)

    async def _handle_call(self, raw: bytes, fds: tuple[int, ...]) -> None:
        try:
            call = parse_call(decode_message(raw), self.peer)
            if fds:
                call = dataclasses.replace(call, fds=fds)
        except BadCall as exc:
            if not exc.call.oneway:
                await self._send(exc.to_message())
            return
        except (ValueError, InvalidParameter):
            await self._send(InvalidParameter("method").to_message())
            raise _Drop("malformed_message") from None
        try:
            handler = self.service.resolve(call)
            result = handler(call)
        except VarlinkError as exc:
            await self._reply(call, exc.to_message())
            return
        if inspect.isasyncgen(result):
            replies = cast(_Stream, result)
            if call.more and not call.oneway:
                await self._stream_with_hangup(call, replies)
            else:
                await self._stream(call, replies)
            return
        await self._reply(call, await self._guarded(call, cast(Awaitable[Reply], result)))

    async def _guarded(self, call: Call, reply: Awaitable[Reply]) -> Reply:
        """Await a handler, mapping its failure to an error message (logged if unexpected)."""
        try:
            return {"parameters": await reply}
        except VarlinkError as exc:
            return exc.to_message()
        except Exception:
            log.exception("varlink.handler_failed", method=call.method, peer_pid=self.peer.pid)
            return self.service.internal_error_message()

    async def _stream(self, call: Call, replies: _Stream) -> None:
        """Send a streaming handler's replies; only the first one without ``more``."""
        async with aclosing(replies):
            while True:
                message = await self._guarded(call, _next_reply(replies))
                item = message.get("parameters")
                last = isinstance(item, Last) or item is _END
                if isinstance(item, Last):
                    message["parameters"] = item.reply
                elif item is _END:
                    log.warning("varlink.stream_ended_without_last", method=call.method)
                    message["parameters"] = {}
                elif "error" in message:
                    last = True
                elif call.more and not call.oneway:
                    message["continues"] = True
                else:
                    last = True
                await self._reply(call, message)
                if last:
                    return

    async def _stream_with_hangup(self, call: Call, replies: _Stream) -> None:
        """Stream while watching the socket, so a client that hangs up ends the stream.

        Without this a watch-style stream would hold its connection (and a slot under
        the cap) until the next reply happens to fail. Bytes that arrive meanwhile
        (pipelined calls) are kept in the buffer, up to the message limit.
        """
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while len(self._buffer) <= self.limits.max_message:
                    if not await self._fill():
                        if _peer_closed(self.sock):
                            tg.cancel_scope.cancel()
                        return  # only half-closed: it may still read the stream

            tg.start_soon(watch)
            # Bound before the stream runs: a hang-up cancels the stream mid-await, and
            # then neither branch below runs.
            dropped: _Drop | None = None
            try:
                await self._stream(call, replies)
            except _Drop as exc:  # re-raised below, not as an ExceptionGroup
                dropped = exc
            tg.cancel_scope.cancel()
        if dropped is not None:
            raise dropped
        if tg.cancel_scope.cancelled_caught and self._eof:
            raise _Drop("hangup_during_stream")

    async def _reply(self, call: Call, message: Reply) -> None:
        if not call.oneway:
            await self._send(message)

    async def _send(self, message: Reply) -> None:
        try:
            data = encode_message(message)
        except (TypeError, ValueError):
            log.exception("varlink.reply_not_serialisable", keys=sorted(message))
            data = encode_message(self.service.internal_error_message())
        try:
            sent = _send_now(self.sock, data)
            if sent < len(data):
                with anyio.fail_after(self.limits.write_timeout):
                    await _send_all(self.sock, memoryview(data)[sent:])
        except TimeoutError:
            raise _Drop("write_timeout") from None
        except OSError:  # EPIPE, ECONNRESET: the client went away
            raise _Drop("peer_gone") from None


# The connection does its I/O on the raw non-blocking socket with anyio.wait_readable/
# wait_writable rather than through anyio's asyncio UNIXSocketStream: in anyio 4.16 a
# receive() cancelled just as its socket turns readable makes the loop call set_result
# on a cancelled future (InvalidStateError; cf. agronholm/anyio#1267), which the idle
# timeout, the hang-up watcher and server shutdown all do routinely. wait_readable
# tolerates that race. It is also one layer less per message.


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer closed both directions (POLLHUP), not just shut down writing."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(event & select.POLLHUP for _, event in poller.poll(0))


async def _receive(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """Up to 64 KiB from ``sock`` with the descriptors passed alongside, and whether
    the kernel truncated them; b"" at EOF or when the peer reset the connection."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(_READ_SIZE, _ANCILLARY,
                                                   socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        except OSError:
            return b"", [], False
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        return data, fds, bool(flags & socket.MSG_CTRUNC)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _send_now(sock: socket.socket, data: bytes) -> int:
    """Write what the kernel takes without waiting; the count written (OSError if gone)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


async def _send_all(sock: socket.socket, view: memoryview) -> None:
    """Write all of ``view``, waiting while the client's receive buffer is full."""
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]
