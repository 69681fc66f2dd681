"""Bad clients: each gets the right varlink error or is dropped, and a well-behaved client
is served while the bad one misbehaves."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from patchd.varlink import AsyncVarlinkClient, Limits, VarlinkServer
from test_varlink_protocol import TEST_INTERFACE, Probe, make_service, running

SERVICE_ERRORS = "org.varlink.service"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vl") as name:
        yield Path(name)


async def assert_served(path: Path, value: str = "fine") -> None:
    """A well-behaved client gets its answer promptly."""
    with anyio.fail_after(5):
        async with await AsyncVarlinkClient.connect(path) as client:
            reply = await client.call(f"{TEST_INTERFACE}.Echo", {"value": value})
    assert reply == {"value": value}


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def read_until_closed(sock: socket.socket) -> list[dict[str, Any]]:
    """Every reply the server sent before it closed the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    # a reply cut off by the drop (after the last NUL) is not a reply
    return [json.loads(part) for part in data.split(b"\0")[:-1]]


def read_replies(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    """Exactly ``count`` replies from a connection that stays open."""
    data = b""
    while data.count(b"\0") < count:
        chunk = sock.recv(1 << 16)
        assert chunk, f"server closed after {data!r}"
        data += chunk
    return [json.loads(part) for part in data.split(b"\0") if part]


def invalid_parameter(name: str) -> dict[str, Any]:
    return {"error": f"{SERVICE_ERRORS}.InvalidParameter", "parameters": {"parameter": name}}


async def drain(server: VarlinkServer) -> None:
    """Wait until the server has closed every connection."""
    with anyio.fail_after(5):
        await server.wait_connections(lambda n: n == 0)


@pytest.mark.anyio
async def test_no_terminator_then_close(sockdir: Path) -> None:
    """A message cut off by EOF gets no reply and its connection is dropped."""
    path = sockdir / "s"

    def abuse() -> list[dict[str, Any]]:
        with connect(path) as sock:
            sock.sendall(b'{"method":"org.example.test.Echo","parameters":{')
            sock.shutdown(socket.SHUT_WR)
            return read_until_closed(sock)

    async with running(make_service(), path) as server:
        assert await anyio.to_thread.run_sync(abuse) == []
        await assert_served(path)
        await drain(server)


@pytest.mark.anyio
async def test_no_terminator_held_open_hits_idle_timeout(sockdir: Path) -> None:
    """A half-sent message held open is dropped after the idle timeout; others are served."""
    path = sockdir / "s"
    async with running(make_service(), path, limits=Limits(idle_timeout=0.5)) as server:
        with connect(path) as sock:
            sock.sendall(b'{"method":"org.example.test.Echo"')
            await assert_served(path)
            replies = await anyio.to_thread.run_sync(read_until_closed, sock)
        assert replies == []
        await drain(server)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "garbage",
    [
        b"{nope}",
        b"\xff\xfe{}",
        b"[" * 200_000 + b"]" * 200_000,
        b'{"method":"org.example.test.Echo","parameters":{"value":NaN}}',
        b"[1, 2]",
        b'{"parameters":{}}',
        b"",
    ],
    ids=["not-json", "not-utf8", "deep-nesting", "nan", "not-an-object", "no-method", "empty"],
)
async def test_malformed_message_gets_error_then_drop(sockdir: Path, garbage: bytes) -> None:
    """Anything that is not a JSON call object is answered InvalidParameter and dropped."""
    path = sockdir / "s"

    def abuse() -> list[dict[str, Any]]:
        with connect(path) as sock:
            sock.sendall(garbage + b"\0" + b'{"method":"org.example.test.Echo"}\0')
            return read_until_closed(sock)

    async with running(make_service(), path) as server:
        assert await anyio.to_thread.run_sync(abuse) == [invalid_parameter("method")]
        await assert_served(path)
        await drain(server)


@pytest.mark.anyio
@pytest.mark.parametrize("terminated", [True, False], ids=["terminated", "unterminated"])
async def test_five_mib_message(sockdir: Path, terminated: bool) -> None:
    """A 5 MiB message is answered InvalidParameter(parameters) and the connection dropped,
    while another client is served."""
    path = sockdir / "s"
    blob = "x" * (5 << 20)
    message = json.dumps({"method": f"{TEST_INTERFACE}.Echo", "parameters": {"value": blob}})

    def abuse() -> list[dict[str, Any]]:
        with connect(path) as sock:
            # the server stops reading after 1 MiB, as it should
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(message.encode() + (b"\0" if terminated else b""))
            return read_until_closed(sock)

    async with running(make_service(), path) as server, anyio.create_task_group() as tg:
        result: list[list[dict[str, Any]]] = []

        async def run_abuse() -> None:
            result.append(await anyio.to_thread.run_sync(abuse))

        tg.start_soon(run_abuse)
        await assert_served(path)
    assert result == [[invalid_parameter("parameters")]]
    await drain(server)


@pytest.mark.anyio
async def test_unknown_names_and_bad_parameters_keep_the_connection(sockdir: Path) -> None:
    """Unknown interface/method and wrong or missing parameters get the standard errors,
    in order, on a connection that goes on serving."""
    path = sockdir / "s"
    calls = [
        {"method": "org.example.nothing.Echo"},
        {"method": f"{TEST_INTERFACE}.Nothing"},
        {"method": "NoDots"},
        {"method": f"{TEST_INTERFACE}.Unimplemented"},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": {"a": "1", "b": 2}},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": {"a": 1}},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": {"a": True, "b": 2}},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": [1, 2]},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": {"a": 1, "b": 2}, "more": "yes"},
        {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {}},
        {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": 1}},
        {"method": f"{TEST_INTERFACE}.Add", "parameters": {"a": 1, "b": 2}},
    ]
    expected = [
        {"error": f"{SERVICE_ERRORS}.InterfaceNotFound",
         "parameters": {"interface": "org.example.nothing"}},
        {"error": f"{SERVICE_ERRORS}.MethodNotFound",
         "parameters": {"method": f"{TEST_INTERFACE}.Nothing"}},
        {"error": f"{SERVICE_ERRORS}.InterfaceNotFound", "parameters": {"interface": ""}},
        {"error": f"{SERVICE_ERRORS}.MethodNotImplemented",
         "parameters": {"method": f"{TEST_INTERFACE}.Unimplemented"}},
        invalid_parameter("a"),
        invalid_parameter("b"),
        invalid_parameter("a"),
        invalid_parameter("parameters"),
        invalid_parameter("more"),
        invalid_parameter("interface"),
        invalid_parameter("interface"),
        {"parameters": {"sum": 3}},
    ]  # fmt: skip

    def abuse() -> list[dict[str, Any]]:
        with connect(path) as sock:
            sock.sendall(b"".join(json.dumps(c).encode() + b"\0" for c in calls))
            return read_replies(sock, len(calls))

    async with running(make_service(), path):
        assert await anyio.to_thread.run_sync(abuse) == expected


@pytest.mark.anyio
async def test_five_hundred_connections_held_open(sockdir: Path) -> None:
    """500 idle connections at once are all accepted and a 501st client is still served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(hard, 1200), hard), hard))
    path = sockdir / "s"
    sockets: list[socket.socket] = []
    try:
        async with running(make_service(), path) as server:
            for _ in range(500):
                sockets.append(connect(path))
            with anyio.fail_after(10):
                await server.wait_connections(lambda n: n == 500)
            await assert_served(path)
            for sock in sockets:
                sock.close()
            await drain(server)
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.anyio
async def test_connection_cap_closes_excess_and_keeps_listening(sockdir: Path) -> None:
    """Connections beyond the cap are closed at once; the listener keeps accepting."""
    path = sockdir / "s"
    async with running(make_service(), path, limits=Limits(max_connections=3)) as server:
        held = [connect(path) for _ in range(3)]
        with anyio.fail_after(5):
            await server.wait_connections(lambda n: n == 3)
        with connect(path) as excess:
            assert await anyio.to_thread.run_sync(read_until_closed, excess) == []
        assert server.refused == 1
        held.pop().close()
        with anyio.fail_after(5):
            await server.wait_connections(lambda n: n == 2)
        await assert_served(path)
        for sock in held:
            sock.close()
        await drain(server)


@pytest.mark.anyio
async def test_client_that_never_reads_a_stream_is_dropped(sockdir: Path) -> None:
    """A streaming client that never reads is dropped after the write timeout, its
    stream is closed, and another client is served meanwhile."""
    probe = Probe()
    path = sockdir / "s"
    limits = Limits(write_timeout=0.5)
    async with running(make_service(probe), path, limits=limits) as server:
        with connect(path) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b'{"method":"org.example.test.Flood","more":true}\0')
            await assert_served(path, "while flooding")
            with anyio.fail_after(10):
                await server.wait_connections(lambda n: n == 0)
            sent = probe.flood_sent
            replies = await anyio.to_thread.run_sync(read_until_closed, sock)
        assert replies and all(r.get("continues") is True for r in replies)
        assert probe.flood_sent == sent  # the generator was closed with the connection
