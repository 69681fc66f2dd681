"""The varlink protocol (https://varlink.org) over a Unix socket, server side.

Generic on purpose: this module knows framing, limits, ``org.varlink.service``,
streaming and peer credentials, and nothing of patchd's methods (``api.py`` maps
``io.patchd.Updater`` onto the daemon). The synchronous client lives in
``varlink_client.py``.

Wire format: each message is one JSON object followed by a NUL byte. A call is
``{"method": "iface.Method", "parameters": {...}, "more"?: bool, "oneway"?: bool}``;
a reply is ``{"parameters": {...}, "continues"?: true}`` or
``{"error": "iface.Error", "parameters": {...}}``. Calls on one connection are
answered in order.

A bad client must never take the daemon down nor delay other clients, hence: a
per-message size limit, an idle timeout while waiting for a request, a write timeout
(a client that never reads is dropped), a cap on concurrent connections, and every
per-connection failure caught and logged at the connection's boundary.
"""

from __future__ import annotations

import errno
import grp
import inspect
import json
import os
import select
import socket
import stat
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias, cast

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.lowlevel import checkpoint

from patchd.core.errors import ConfigError, PatchdError, SocketInUse

log = structlog.get_logger("patchd.varlink.protocol")

SERVICE_INTERFACE: Final = "org.varlink.service"

#: The standard service interface (varlink.org/Service), with the two errors later
#: added there (``PermissionDenied``, ``ExpectedMore``).
SERVICE_DESCRIPTION: Final = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""

MAX_MESSAGE: Final = 1 << 20
_READ_SIZE: Final = 64 * 1024
_ACCEPT_RETRY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EINTR}
)

Reply: TypeAlias = dict[str, Any]


# --- errors ----------------------------------------------------------------------------


class VarlinkError(PatchdError):
    """A varlink error reply: a fully-qualified name and its parameters.

    Handlers raise it (or a subclass) to answer a call with an error; the client
    raises it when the server answered with one.
    """

    def __init__(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.parameters: dict[str, Any] = dict(parameters or {})
        super().__init__(f"{name} {json.dumps(self.parameters, sort_keys=True)}")

    def to_message(self) -> Reply:
        """The reply message carrying this error."""
        return {"error": self.name, "parameters": self.parameters}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.parameters!r})"


class InterfaceNotFound(VarlinkError):
    """The call names an interface this service does not have."""

    def __init__(self, interface: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.InterfaceNotFound", {"interface": interface})


class MethodNotFound(VarlinkError):
    """The interface exists but does not declare the method."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.MethodNotFound", {"method": method})


class MethodNotImplemented(VarlinkError):
    """The interface declares the method but no handler was registered for it."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.MethodNotImplemented", {"method": method})


class InvalidParameter(VarlinkError):
    """A parameter is missing, of the wrong type or out of range; names the parameter."""

    def __init__(self, parameter: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.InvalidParameter", {"parameter": parameter})


class PermissionDenied(VarlinkError):
    """The default refusal when the authorisation hook answers False."""

    def __init__(self) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.PermissionDenied")


class ExpectedMore(VarlinkError):
    """The method only makes sense as a stream and was called without ``more``."""

    def __init__(self) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.ExpectedMore")



class SocketGroupMissing(ConfigError):
    """The group configured for the socket file does not exist on this host."""


class SocketGroupUnusable(ConfigError):
    """The socket's group exists but this process may not give files to it (EPERM)."""


class _Drop(Exception):
    """Internal: end this connection now; ``reason`` is logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- calls and services ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The connecting process as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        """Read SO_PEERCRED from a connected Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class Call:
    """One method call as a handler sees it."""

    method: str
    parameters: dict[str, Any]
    more: bool
    oneway: bool
    peer: PeerCred

    @property
    def interface(self) -> str:
        """The interface part of the fully-qualified method name."""
        return self.method.rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class Last:
    """Wraps the final reply of a streaming handler.

    A streaming handler's replies are sent as soon as they are yielded (with
    ``continues: true`` when the client asked for ``more``); looking ahead to find the
    last one would hold every reply back until the next exists, which is wrong for
    watch-style streams. So a stream that ends marks its last reply with ``Last``.
    """

    reply: Reply


Handler: TypeAlias = Callable[[Call], Awaitable[Reply] | AsyncIterator[Reply | Last]]
_Stream: TypeAlias = AsyncGenerator[Reply | Last, None]
Authorize: TypeAlias = Callable[[str, PeerCred], bool]


@dataclass(frozen=True, slots=True)
class _Interface:
    name: str
    description: str
    methods: Mapping[str, Handler]
    declared: frozenset[str]
    requires_more: frozenset[str]


def _declared_methods(name: str, description: str) -> frozenset[str]:
    """Check the description names ``name`` and return the methods it declares."""
    words = [line.split() for line in description.splitlines()]
    words = [w for w in words if w and not w[0].startswith("#")]
    if not words or words[0][:2] != ["interface", name]:
        raise ValueError(f"interface description does not start with 'interface {name}'")
    return frozenset(w[1].partition("(")[0] for w in words if w[0] == "method" and len(w) > 1)


class VarlinkService:
    """The interfaces and handlers one socket serves, plus ``org.varlink.service``.

    ``authorize(method_fqname, peer)`` is asked before every call outside
    ``org.varlink.service`` (introspection is open to anyone who can open the socket);
    it answers False for the standard ``PermissionDenied`` or raises a
    ``VarlinkError`` of its own (e.g. ``io.patchd.Updater.NotAuthorized``).
    """

    def __init__(
        self,
        *,
        vendor: str,
        product: str,
        version: str,
        url: str,
        authorize: Authorize | None = None,
        internal_error: str = f"{SERVICE_INTERFACE}.InternalError",
        internal_error_parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.info: dict[str, Any] = {
            "vendor": vendor,
            "product": product,
            "version": version,
            "url": url,
        }
        self.authorize = authorize
        #: The error sent when a handler fails unexpectedly (the failure is logged). A
        #: service may name one its interface declares, with the parameters it requires,
        #: so clients generated from the description recognise it.
        self.internal_error = internal_error
        self.internal_error_parameters: dict[str, Any] = dict(internal_error_parameters or {})
        self._interfaces: dict[str, _Interface] = {}
        self.add_interface(
            SERVICE_INTERFACE,
            SERVICE_DESCRIPTION,
            {"GetInfo": self._get_info, "GetInterfaceDescription": self._get_description},
        )

    def __repr__(self) -> str:
        return f"VarlinkService({self.info['product']!r}, interfaces={list(self._interfaces)})"

    def add_interface(
        self,
        name: str,
        description: str,
        methods: Mapping[str, Handler],
        *,
        requires_more: Collection[str] = (),
    ) -> None:
        """Serve ``name``: ``description`` is returned verbatim, ``methods`` by short name.

        A handler is ``async def h(call) -> dict`` or, for a streaming method, an async
        generator yielding reply dicts (the last one wrapped in ``Last`` if the stream
        ends). Methods in ``requires_more`` answer ``ExpectedMore`` without ``more``.
        """
        if name in self._interfaces:
            raise ValueError(f"interface {name} is already registered")
        for method, handler in methods.items():
            if not (inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)):
                raise TypeError(f"handler for {name}.{method} must be async (def or generator)")
        declared = _declared_methods(name, description)
        unknown = (set(methods) | set(requires_more)) - declared
        if unknown:
            raise ValueError(f"{name} does not declare methods {sorted(unknown)}")
        self._interfaces[name] = _Interface(
            name, description, dict(methods), declared, frozenset(requires_more)
        )

    @property
    def interfaces(self) -> list[str]:
        """Names of the served interfaces, ``org.varlink.service`` first."""
        return list(self._interfaces)

    def resolve(self, call: Call) -> Handler:
        """The handler for ``call``, or the varlink error the call must be answered with."""
        interface_name, _, method_name = call.method.rpartition(".")
        interface = self._interfaces.get(interface_name)
        if interface is None:
            raise InterfaceNotFound(interface_name)
        handler = interface.methods.get(method_name)
        if handler is None:
            if method_name in interface.declared:
                raise MethodNotImplemented(call.method)
            raise MethodNotFound(call.method)
        if (
            interface_name != SERVICE_INTERFACE
            and self.authorize is not None
            and not self.authorize(call.method, call.peer)
        ):
            raise PermissionDenied()
        if method_name in interface.requires_more and not call.more:
            raise ExpectedMore()
        return handler

    def internal_error_message(self) -> Reply:
        """The reply sent for an unexpected failure."""
        return {"error": self.internal_error, "parameters": dict(self.internal_error_parameters)}

    async def _get_info(self, call: Call) -> Reply:
        return {**self.info, "interfaces": self.interfaces}

    async def _get_description(self, call: Call) -> Reply:
        name = call.parameters.get("interface")
        if not isinstance(name, str):
            raise InvalidParameter("interface")
        interface = self._interfaces.get(name)
        if interface is None:
            raise InterfaceNotFound(name)
        return {"description": interface.description}


# --- messages --------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads/dumps with options build a new coder on every call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def decode_message(raw: bytes) -> Any:
    """Parse one message body (without its NUL); ValueError when it is not JSON."""
    try:
        return _DECODER.decode(raw.decode())
    except RecursionError as exc:  # absurdly deep nesting
        raise ValueError("JSON nested too deeply") from exc


def encode_message(message: Mapping[str, Any]) -> bytes:
    """Serialise one message with its NUL terminator (NaN/Infinity refused)."""
    return _ENCODER.encode(message).encode() + b"\0"


class _BadCall(InvalidParameter):
    """A recognisable call with a malformed envelope: answered, connection kept."""

    def __init__(self, call: Call, parameter: str) -> None:
        super().__init__(parameter)
        self.call = call


def parse_call(message: Any, peer: PeerCred) -> Call:
    """Turn a decoded message into a ``Call``.

    A message without a method string is not a call at all (``InvalidParameter``
    naming ``method``; the connection is then dropped). A call whose envelope is wrong
    (``parameters`` not an object, ``more``/``oneway`` not booleans) raises
    ``_BadCall``: it is answered and the connection goes on.
    """
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        raise InvalidParameter("method")
    parameters = message.get("parameters")
    more = message.get("more", False)
    oneway = message.get("oneway", False)
    call = Call(
        message["method"],
        parameters if isinstance(parameters, dict) else {},
        more is True,
        oneway is True,
        peer,
    )
    checks = (
        ("parameters", parameters is None or isinstance(parameters, dict)),
        ("more", isinstance(more, bool)),
        ("oneway", isinstance(oneway, bool)),
    )
    for name, valid in checks:
        if not valid:
            raise _BadCall(call, name)
    return call


_END: Final = object()


async def _next_reply(replies: AsyncIterator[Reply | Last]) -> Any:
    """The next item of a stream, or ``_END`` when it is exhausted."""
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return _END


# --- connections -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost the server; each bound is a way a client can misbehave.

    - ``max_message``: bytes of one message before its NUL; a larger message is
      answered ``InvalidParameter`` and the connection dropped.
    - ``idle_timeout``: seconds to wait for the next complete request.
    - ``write_timeout``: seconds a reply may take to be accepted by the kernel; a
      client that does not read is dropped.
    - ``max_connections``: connections beyond this are closed at once.
    """

    max_message: int = MAX_MESSAGE
    idle_timeout: float = 300.0
    write_timeout: float = 10.0
    max_connections: int = 1024


class _Connection:
    """One client: reads calls in order, answers them, enforces the limits."""

    def __init__(
        self, service: VarlinkService, sock: socket.socket, peer: PeerCred, limits: Limits
    ) -> None:
        self.service = service
        self.sock = sock
        self.peer = peer
        self.limits = limits
        self._buffer = bytearray()
        self._scanned = 0
        self._eof = False

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
                del self._buffer[: end + 1]
                self._scanned = 0
                return raw
            self._scanned = len(self._buffer)
            if self._scanned > self.limits.max_message:
                await self._too_large()
            if not await self._fill():
                if self._buffer:
                    raise _Drop("eof_inside_message")
                return None

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF."""
        if self._eof:
            return False
        data = await _receive(self.sock)
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
        try:
            call = parse_call(decode_message(raw), self.peer)
        except _BadCall as exc:
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
            try:
                await self._stream(call, replies)
            except _Drop as exc:  # re-raised below, not as an ExceptionGroup
                dropped: _Drop | None = exc
            else:
                dropped = None
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


async def _receive(sock: socket.socket) -> bytes:
    """Up to 64 KiB from ``sock``; b"" at EOF or when the peer reset the connection."""
    while True:
        try:
            return sock.recv(_READ_SIZE)
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except OSError:
            return b""


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


# --- the socket file -------------------------------------------------------------------


def lookup_group(name: str | None) -> int | None:
    """The gid of group ``name``; ``SocketGroupMissing`` when there is no such group."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketGroupMissing(
            f"socket group {name!r} does not exist; create it or change the configured group"
        ) from None


def _group_hint(path: Path, gid: int) -> str:
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    return (f"cannot give the socket {path} to group {name!r}: this process (uid "
            f"{os.geteuid()}) is not a member; add SupplementaryGroups={name} to the "
            f"service unit, make its user a member of {name!r}, or run as root")


def _check_not_live(path: Path) -> None:
    """Refuse ``path`` when something answers there; a stale socket is fine (replaced)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or use another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("varlink.stale_socket_replaced", path=str(path))
            return
        except OSError as exc:  # EAGAIN (full backlog), timeout: someone is there
            raise SocketInUse(f"{path} is busy ({exc}); is patchd already running?") from exc
    raise SocketInUse(f"another process is listening on {path}; is patchd already running?")


def bind_unix_socket(path: Path, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode``/``gid``; returns it and its inode.

    The socket is bound under a temporary name, given its mode and group, put in
    listen state and only then renamed over ``path``. So no client can ever connect
    while the mode is still the umask's, and a stale socket file is replaced
    atomically. (``anyio.create_unix_listener`` would unlink any socket file, a live
    daemon's included, and chmod only after listening.)
    """
    _check_not_live(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(temp))
        except OSError as exc:
            raise SocketInUse(f"cannot create the socket {path}: {exc}") from exc
        os.chmod(temp, mode)
        if gid is not None:
            try:
                os.chown(temp, -1, gid)
            except PermissionError:
                raise SocketGroupUnusable(_group_hint(path, gid)) from None
        sock.listen(4096)
        sock.setblocking(False)
        os.rename(temp, path)
        return sock, os.stat(path).st_ino
    except BaseException:
        sock.close()
        temp.unlink(missing_ok=True)
        raise


def unlink_if_same(path: Path, inode: int) -> None:
    """Remove our socket file at exit, unless another process has replaced it since."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


# --- the server ------------------------------------------------------------------------


class VarlinkServer:
    """Listens on a Unix socket and serves one ``VarlinkService`` to many clients.

    Each connection runs in its own task of the server's task group; the count of
    open connections is ``connections`` (tests and the watchdog read it).
    """

    def __init__(
        self,
        service: VarlinkService,
        path: Path,
        *,
        mode: int = 0o660,
        group: str | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self.service = service
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.limits = limits
        self.connections = 0
        self.refused = 0
        self._changed: anyio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"VarlinkServer({str(self.path)!r}, connections={self.connections}, "
            f"refused={self.refused})"
        )

    async def wait_connections(self, predicate: Callable[[int], bool]) -> None:
        """Wait until ``predicate(open connections)`` holds (for draining and tests)."""
        while not predicate(self.connections):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _count(self, delta: int) -> None:
        self.connections += delta
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started once listening, and serve until cancelled."""
        gid = lookup_group(self.group)
        sock, identity = await anyio.to_thread.run_sync(bind_unix_socket, self.path, self.mode, gid)
        log.info("varlink.listening", path=str(self.path), mode=oct(self.mode), group=self.group)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                await self._accept_loop(sock, tg)
        finally:
            sock.close()
            unlink_if_same(self.path, identity)

    async def _accept_loop(self, listener: socket.socket, tg: TaskGroup) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                await anyio.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                # Out of descriptors or memory: connections already open keep being
                # served; give them a moment to finish before accepting again.
                log.warning("varlink.accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            await checkpoint()
            if self.connections >= self.limits.max_connections:
                self.refused += 1
                log.warning(
                    "varlink.connection_refused",
                    reason="too_many_connections",
                    open=self.connections,
                    refused=self.refused,
                )
                client.close()
                continue
            client.setblocking(False)
            self._count(+1)
            tg.start_soon(self._connection, client)

    async def _connection(self, sock: socket.socket) -> None:
        peer: PeerCred | None = None
        try:
            peer = PeerCred.of(sock)
            await _Connection(self.service, sock, peer, self.limits).run()
        except _Drop as exc:
            log.info("varlink.connection_dropped", reason=exc.reason, peer=peer)
        except Exception:
            log.exception("varlink.connection_failed", peer=peer)
        finally:
            self._count(-1)
            sock.close()

