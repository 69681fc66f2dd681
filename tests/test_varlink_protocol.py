"""The varlink layer on its own: service rules, framing, streaming, peer credentials,
the socket file, and the patchd clients. Helpers here are shared with the interop and
abuse tests (``from test_varlink_protocol import ...``)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from patchd.varlink import (
    AddressInUse,
    AsyncVarlinkClient,
    Call,
    ConnectFailed,
    InvalidParameter,
    Last,
    PeerCred,
    VarlinkClient,
    VarlinkError,
    VarlinkServer,
    VarlinkService,
    parse_call,
)

TEST_INTERFACE = "org.example.test"
TEST_DESCRIPTION = """\
# A small interface for exercising the protocol layer.
interface org.example.test

method Echo(value: ?string) -> (value: ?string)
method Add(a: int, b: int) -> (sum: int)
method Fail(why: string) -> ()
method Count(upto: int) -> (n: int)
method Watch() -> (n: int)
method Flood() -> (blob: string)
method Crash() -> ()
method Peer() -> (pid: int, uid: int, gid: int)
method Unimplemented() -> ()

error Oops (why: string)
"""


class Probe:
    """What the test handlers observed, so tests can wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.watch_started = anyio.Event()
        self.watch_closed = anyio.Event()
        self.flood_sent = 0


def _int_param(call: Call, name: str) -> int:
    value = call.parameters.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(name)
    return value


def make_service(probe: Probe | None = None, **kwargs: Any) -> VarlinkService:
    """A service with the test interface; ``probe`` records what the handlers saw."""
    seen = probe or Probe()
    service = VarlinkService(
        vendor="patchd tests",
        product="varlink-test",
        version="1.2.3",
        url="https://example.org",
        **kwargs,
    )

    async def echo(call: Call) -> dict[str, Any]:
        return {"value": call.parameters.get("value")}

    async def add(call: Call) -> dict[str, Any]:
        return {"sum": _int_param(call, "a") + _int_param(call, "b")}

    async def fail(call: Call) -> dict[str, Any]:
        raise VarlinkError(f"{TEST_INTERFACE}.Oops", {"why": call.parameters.get("why")})

    async def count(call: Call) -> AsyncIterator[dict[str, Any] | Last]:
        upto = _int_param(call, "upto")
        for n in range(upto - 1):
            yield {"n": n}
        yield Last({"n": upto - 1})

    async def watch(call: Call) -> AsyncIterator[dict[str, Any] | Last]:
        try:
            yield {"n": 0}
            seen.watch_started.set()
            await anyio.sleep_forever()
            yield {"n": 1}  # pragma: no cover - never reached
        finally:
            seen.watch_closed.set()

    async def flood(call: Call) -> AsyncIterator[dict[str, Any] | Last]:
        blob = "x" * 65536
        while True:
            yield {"blob": blob}
            seen.flood_sent += 1

    async def crash(call: Call) -> dict[str, Any]:
        raise RuntimeError("handler bug")

    async def peer(call: Call) -> dict[str, Any]:
        return {"pid": call.peer.pid, "uid": call.peer.uid, "gid": call.peer.gid}

    service.add_interface(
        TEST_INTERFACE,
        TEST_DESCRIPTION,
        {
            "Echo": echo,
            "Add": add,
            "Fail": fail,
            "Count": count,
            "Watch": watch,
            "Flood": flood,
            "Crash": crash,
            "Peer": peer,
        },
        requires_more={"Watch"},
    )
    return service


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vl") as name:
        yield Path(name)


@asynccontextmanager
async def running(
    service: VarlinkService, path: Path, **kwargs: Any
) -> AsyncIterator[VarlinkServer]:
    """Run a server on ``path`` for the duration of the block (started = listening)."""
    server = VarlinkServer(service, path, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: server.serve(task_status=task_status))
        yield server
        tg.cancel_scope.cancel()


def raw_call(path: Path, *messages: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes, then read NUL-terminated replies until the server closes."""
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        for message in messages:
            sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(part) for part in data.split(b"\0") if part]


# --- service rules --------------------------------------------------------------------


def test_add_interface_rejects_undeclared_methods() -> None:
    """A handler for a method the description does not declare is a programming error."""
    service = make_service()
    with pytest.raises(ValueError, match="does not declare"):
        service.add_interface("org.example.other", "interface org.example.other\n", {"X": _h})


def test_add_interface_rejects_wrong_interface_name() -> None:
    """The description must be for the interface it is registered under."""
    with pytest.raises(ValueError, match=r"interface org\.example\.x"):
        make_service().add_interface("org.example.x", TEST_DESCRIPTION, {})


def test_add_interface_rejects_sync_handler() -> None:
    """Handlers must be async so they cannot block the event loop by accident."""
    with pytest.raises(TypeError, match="must be async"):
        make_service().add_interface(
            "org.example.y",
            "interface org.example.y\nmethod X() -> ()\n",
            {"X": lambda c: {}},  # type: ignore[dict-item,return-value]  # the point of the test
        )


async def _h(call: Call) -> dict[str, Any]:
    return {}


def test_parse_call_envelope_errors() -> None:
    """A call with a non-object ``parameters`` or non-bool ``more`` names that field."""
    peer = PeerCred(1, 0, 0)
    with pytest.raises(InvalidParameter) as bad:
        parse_call({"method": "a.B", "parameters": [1]}, peer)
    assert bad.value.parameters == {"parameter": "parameters"}
    with pytest.raises(InvalidParameter) as bad:
        parse_call({"method": "a.B", "more": "yes"}, peer)
    assert bad.value.parameters == {"parameter": "more"}
    with pytest.raises(InvalidParameter) as bad:
        parse_call({"parameters": {}}, peer)
    assert bad.value.parameters == {"parameter": "method"}
    call = parse_call({"method": "a.B", "more": True}, peer)
    assert (call.method, call.parameters, call.more, call.oneway) == ("a.B", {}, True, False)


# --- calls through the server ---------------------------------------------------------


@pytest.mark.anyio
async def test_call_error_and_internal_error(sockdir: Path) -> None:
    """A normal call returns its reply; a VarlinkError and a handler bug become error replies."""
    async with (
        running(make_service(), sockdir / "s"),
        await AsyncVarlinkClient.connect(sockdir / "s") as client,
    ):
        assert await client.call(f"{TEST_INTERFACE}.Add", {"a": 2, "b": 40}) == {"sum": 42}
        with pytest.raises(VarlinkError) as err:
            await client.call(f"{TEST_INTERFACE}.Fail", {"why": "because"})
        assert (err.value.name, err.value.parameters) == (
            f"{TEST_INTERFACE}.Oops",
            {"why": "because"},
        )
        with pytest.raises(VarlinkError) as err:
            await client.call(f"{TEST_INTERFACE}.Crash")
        assert err.value.name == "org.varlink.service.InternalError"
        # the connection survives all of the above
        assert await client.call(f"{TEST_INTERFACE}.Echo", {"value": "ok"}) == {"value": "ok"}


@pytest.mark.anyio
async def test_streaming_sets_continues_except_on_last(sockdir: Path) -> None:
    """With ``more`` every reply but the last carries ``continues: true``."""
    path = sockdir / "s"
    call = b'{"method":"org.example.test.Count","parameters":{"upto":3},"more":true}\0'
    async with running(make_service(), path):
        replies = await anyio.to_thread.run_sync(raw_call, path, call)
    assert replies == [
        {"parameters": {"n": 0}, "continues": True},
        {"parameters": {"n": 1}, "continues": True},
        {"parameters": {"n": 2}},
    ]


@pytest.mark.anyio
async def test_streaming_without_more_returns_first_reply(sockdir: Path) -> None:
    """A streaming method called without ``more`` answers once, without ``continues``."""
    path = sockdir / "s"
    async with running(make_service(), path), await AsyncVarlinkClient.connect(path) as client:
        assert await client.call(f"{TEST_INTERFACE}.Count", {"upto": 5}) == {"n": 0}
        assert [r async for r in client.stream(f"{TEST_INTERFACE}.Count", {"upto": 2})] == [
            {"n": 0},
            {"n": 1},
        ]


@pytest.mark.anyio
async def test_expected_more(sockdir: Path) -> None:
    """A method registered as requiring ``more`` answers ExpectedMore without it."""
    path = sockdir / "s"
    async with running(make_service(), path), await AsyncVarlinkClient.connect(path) as client:
        with pytest.raises(VarlinkError) as err:
            await client.call(f"{TEST_INTERFACE}.Watch")
        assert (err.value.name, err.value.parameters) == ("org.varlink.service.ExpectedMore", {})


@pytest.mark.anyio
async def test_oneway_gets_no_reply_and_pipelining_keeps_order(sockdir: Path) -> None:
    """A oneway call is not answered; pipelined calls are answered in order."""
    path = sockdir / "s"
    messages = [
        b'{"method":"org.example.test.Echo","parameters":{"value":"1"}}\0',
        b'{"method":"org.example.test.Echo","parameters":{"value":"2"},"oneway":true}\0',
        b'{"method":"org.example.test.Fail","parameters":{"why":"3"},"oneway":true}\0',
        b'{"method":"org.example.test.Echo","parameters":{"value":"4"}}\0',
    ]
    async with running(make_service(), path):
        replies = await anyio.to_thread.run_sync(raw_call, path, b"".join(messages))
    assert replies == [{"parameters": {"value": "1"}}, {"parameters": {"value": "4"}}]


@pytest.mark.anyio
async def test_authorize_hook_refuses_and_can_raise(sockdir: Path) -> None:
    """False from the hook gives PermissionDenied; the hook may raise its own error;
    introspection is never subject to it."""
    asked: list[tuple[str, PeerCred]] = []

    def authorize(method: str, peer: PeerCred) -> bool:
        asked.append((method, peer))
        if method.endswith(".Add"):
            raise VarlinkError(f"{TEST_INTERFACE}.NotAuthorized", {"method": method})
        return not method.endswith(".Echo")

    path = sockdir / "s"
    async with (
        running(make_service(authorize=authorize), path),
        await AsyncVarlinkClient.connect(path) as client,
    ):
        with pytest.raises(VarlinkError) as err:
            await client.call(f"{TEST_INTERFACE}.Echo")
        assert err.value.name == "org.varlink.service.PermissionDenied"
        with pytest.raises(VarlinkError) as err:
            await client.call(f"{TEST_INTERFACE}.Add", {"a": 1, "b": 1})
        assert err.value.parameters == {"method": f"{TEST_INTERFACE}.Add"}
        info = await client.call("org.varlink.service.GetInfo")
    assert info["interfaces"] == ["org.varlink.service", TEST_INTERFACE]
    assert [m for m, _ in asked] == [f"{TEST_INTERFACE}.Echo", f"{TEST_INTERFACE}.Add"]
    assert asked[0][1] == PeerCred(os.getpid(), os.getuid(), os.getgid())


@pytest.mark.anyio
async def test_hangup_during_stream_closes_the_generator(sockdir: Path) -> None:
    """A client that disconnects mid-stream frees its connection and closes the handler."""
    probe = Probe()
    path = sockdir / "s"
    async with running(make_service(probe), path) as server:
        client = await AsyncVarlinkClient.connect(path)
        replies = client.stream(f"{TEST_INTERFACE}.Watch")
        assert await anext(replies) == {"n": 0}
        with anyio.fail_after(5):
            await probe.watch_started.wait()
        await client.aclose()
        with anyio.fail_after(5):
            await probe.watch_closed.wait()
        with anyio.fail_after(5):
            await server.wait_connections(lambda n: n == 0)


# --- peer credentials -----------------------------------------------------------------


@pytest.mark.anyio
async def test_peer_credentials_of_this_process(sockdir: Path) -> None:
    """SO_PEERCRED reports the connecting process's pid, uid and gid."""
    path = sockdir / "s"
    async with running(make_service(), path):
        with VarlinkClient(path) as client:
            reply = await anyio.to_thread.run_sync(client.call, f"{TEST_INTERFACE}.Peer")
    assert reply == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


def _call_peer_as_nobody(path: str, nobody_uid: int, nobody_gid: int) -> None:
    """Child process body: drop to nobody, call Peer, report through the exit code."""
    import json

    os.setgroups([])
    os.setgid(nobody_gid)
    os.setuid(nobody_uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b'{"method":"org.example.test.Peer"}\0')
        data = b""
        while not data.endswith(b"\0"):
            data += sock.recv(4096)
    reply = json.loads(data[:-1])["parameters"]
    ok = reply == {"pid": os.getpid(), "uid": nobody_uid, "gid": nobody_gid}
    os._exit(0 if ok else 3)


@pytest.mark.anyio
async def test_peer_credentials_of_another_user(sockdir: Path) -> None:
    """A child that setuid()s to nobody is seen by the server with nobody's uid and its pid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid() a child to nobody")
    nobody = pwd.getpwnam("nobody")
    path = sockdir / "s"
    os.chmod(sockdir, 0o755)
    async with running(make_service(), path, mode=0o666):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _call_peer_as_nobody(str(path), nobody.pw_uid, nobody.pw_gid)
            finally:
                os._exit(4)
        _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- the socket file ------------------------------------------------------------------


@pytest.mark.anyio
async def test_socket_mode_group_and_cleanup(sockdir: Path) -> None:
    """The socket file gets mode 0660 and the named group, and is removed on exit."""
    group = grp.getgrgid(os.getgid()).gr_name
    path = sockdir / "s"
    async with running(make_service(), path, group=group):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
    assert not path.exists()


@pytest.mark.anyio
async def test_missing_group_is_a_clear_error(sockdir: Path) -> None:
    """A socket group that does not exist fails before binding, naming the group."""
    server = VarlinkServer(make_service(), sockdir / "s", group="no-such-group-xyz")
    with pytest.raises(LookupError, match="no-such-group-xyz"):
        await server.serve()
    assert not (sockdir / "s").exists()


@pytest.mark.anyio
async def test_stale_socket_is_replaced(sockdir: Path) -> None:
    """A socket file nobody listens on (a crashed daemon's) is replaced and served."""
    path = sockdir / "s"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with running(make_service(), path), await AsyncVarlinkClient.connect(path) as c:
        assert await c.call(f"{TEST_INTERFACE}.Echo", {"value": "x"}) == {"value": "x"}


@pytest.mark.anyio
async def test_live_socket_is_refused(sockdir: Path) -> None:
    """A second server on a path where a live one answers fails with AddressInUse,
    marked live (the application adds its "already running?" hint)."""
    path = sockdir / "s"
    async with running(make_service(), path):
        with pytest.raises(AddressInUse, match="another process is listening") as info:
            await VarlinkServer(make_service(), path).serve()
        assert info.value.live and info.value.path == path
        # the first one still serves
        with VarlinkClient(path) as client:
            echo = await anyio.to_thread.run_sync(client.call, f"{TEST_INTERFACE}.Echo")
        assert echo == {"value": None}


@pytest.mark.anyio
async def test_non_socket_path_is_refused(sockdir: Path) -> None:
    """A regular file at the socket path is never deleted; the server refuses to start."""
    path = sockdir / "s"
    path.write_text("precious")
    with pytest.raises(AddressInUse, match="not a socket") as info:
        await VarlinkServer(make_service(), path).serve()
    assert not info.value.live
    assert path.read_text() == "precious"


# --- client errors --------------------------------------------------------------------


def test_client_daemon_not_running(sockdir: Path) -> None:
    """No socket file, or a stale one, fails with the errno that says nobody serves it."""
    with pytest.raises(ConnectFailed, match="cannot connect to") as info:
        VarlinkClient(sockdir / "missing")
    assert (info.value.errno, info.value.path) == (errno.ENOENT, sockdir / "missing")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale"))
    stale.close()
    with pytest.raises(ConnectFailed) as info:
        VarlinkClient(sockdir / "stale")
    assert info.value.errno == errno.ECONNREFUSED


def _connect_as_nobody(path: str, nobody_uid: int, nobody_gid: int) -> None:
    os.setgroups([])
    os.setgid(nobody_gid)
    os.setuid(nobody_uid)
    try:
        VarlinkClient(path)
    except ConnectFailed as exc:
        if exc.errno == errno.EACCES:
            os._exit(0)
    os._exit(3)


@pytest.mark.anyio
async def test_client_permission_denied(sockdir: Path) -> None:
    """A user outside the socket's mode and group gets ConnectFailed with EACCES."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid() a child to nobody")
    nobody = pwd.getpwnam("nobody")
    os.chmod(sockdir, 0o755)
    path = sockdir / "s"
    async with running(make_service(), path):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _connect_as_nobody(str(path), nobody.pw_uid, nobody.pw_gid)
            finally:
                os._exit(4)
        _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.anyio
async def test_sync_client_stream_and_errors(sockdir: Path) -> None:
    """The CLI client streams with ``more`` and raises VarlinkError for error replies."""
    path = sockdir / "s"

    def use_client() -> tuple[list[dict[str, Any]], str]:
        with VarlinkClient(path) as client:
            replies = list(client.stream(f"{TEST_INTERFACE}.Count", {"upto": 3}))
            try:
                client.call(f"{TEST_INTERFACE}.Add", {"a": "1", "b": 2})
            except VarlinkError as exc:
                return replies, f"{exc.name} {exc.parameters}"
        return replies, "no error"

    async with running(make_service(), path):
        replies, error = await anyio.to_thread.run_sync(use_client)
    assert replies == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert error == "org.varlink.service.InvalidParameter {'parameter': 'a'}"
