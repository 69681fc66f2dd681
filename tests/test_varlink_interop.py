"""The third-party ``varlink`` package as the client against patchd's server: proof that
generic varlink clients can introspect and call the daemon."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import varlink

from patchd.service.interface import INTERFACE_NAME, INTERFACE_TEXT
from patchd.varlink import SERVICE_DESCRIPTION, Call, VarlinkService
from test_varlink_protocol import TEST_DESCRIPTION, TEST_INTERFACE, make_service, running

T = TypeVar("T")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vl") as name:
        yield Path(name)


def updater_service() -> VarlinkService:
    """The test service plus io.patchd.Updater with one method implemented."""
    service = make_service()

    async def get_boot_target(call: Call) -> dict[str, Any]:
        return {"build": {"release": "1.4.0", "patch": 2}, "path": "/var/lib/app/builds/1.4.0/2"}

    service.add_interface(INTERFACE_NAME, INTERFACE_TEXT, {"GetBootTarget": get_boot_target})
    return service


async def in_thread(fn: Callable[[], T]) -> T:
    """The varlink package is blocking; run it off the event loop that serves it."""
    return await anyio.to_thread.run_sync(fn)


@pytest.mark.anyio
async def test_get_info(sockdir: Path) -> None:
    """GetInfo lists vendor, product, version, url and every served interface."""
    path = sockdir / "s"

    def query() -> Any:
        with varlink.Client(address=f"unix:{path}") as client:
            return client.get_interfaces(), client.info

    async with running(updater_service(), path):
        interfaces, info = await in_thread(query)
    assert interfaces == ["org.varlink.service", TEST_INTERFACE, INTERFACE_NAME]
    assert {k: info[k] for k in ("vendor", "product", "version", "url")} == {
        "vendor": "patchd tests",
        "product": "varlink-test",
        "version": "1.2.3",
        "url": "https://example.org",
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "text"),
    [
        (INTERFACE_NAME, INTERFACE_TEXT),
        (TEST_INTERFACE, TEST_DESCRIPTION),
        ("org.varlink.service", SERVICE_DESCRIPTION),
    ],
)
async def test_interface_description_round_trips(sockdir: Path, name: str, text: str) -> None:
    """GetInterfaceDescription returns the text verbatim and varlink's parser accepts it."""
    path = sockdir / "s"

    def query() -> tuple[str, Any]:
        with varlink.Client(address=f"unix:{path}") as client:
            connection = client.open_connection()
            try:
                service = client.open("org.varlink.service", connection=connection)
                description = service.GetInterfaceDescription(name)["description"]
            finally:
                connection.close()
            return description, varlink.Interface(description)

    async with running(updater_service(), path):
        description, parsed = await in_thread(query)
    assert description == text
    assert parsed.name == name


@pytest.mark.anyio
async def test_updater_interface_members(sockdir: Path) -> None:
    """The varlink package sees every io.patchd.Updater method and error of docs/socket.md"""
    path = sockdir / "s"

    def query() -> list[str]:
        with varlink.Client(address=f"unix:{path}") as client:
            return list(client.get_interface(INTERFACE_NAME).members)

    async with running(updater_service(), path):
        members = await in_thread(query)
    assert members == [
        "Build", "BuildInfo", "Activity", "HoldInfo", "Activation",
        "GetStatus", "GetMetrics", "GetBootTarget", "BootStart", "BootSuccess", "BootFailure",
        "CheckNow", "Install", "Rollback", "Hold", "Unhold", "Unmark", "WatchActivity",
        "NotAuthorized", "NotBootTarget", "Busy", "UpdateFailed", "InvalidBundle",
        "NoBootInProgress", "RollbackRefused", "StateConflict",
        "NotMarkedBad", "DowngradeRefused",
    ]  # fmt: skip


@pytest.mark.anyio
async def test_calls_errors_and_streaming(sockdir: Path) -> None:
    """A normal call, an error reply, an unimplemented method and a ``more`` stream."""
    path = sockdir / "s"

    def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with varlink.Client(address=f"unix:{path}") as client:
            with client.open(INTERFACE_NAME) as updater:
                out["boot_target"] = updater.GetBootTarget()
                with pytest.raises(varlink.VarlinkError) as unimplemented:
                    updater.GetStatus()
                out["unimplemented"] = unimplemented.value.as_dict()
            with client.open(TEST_INTERFACE) as test:
                out["sum"] = test.Add(a=20, b=22)
                with pytest.raises(varlink.VarlinkError) as oops:
                    test.Fail(why="testing")
                out["oops"] = oops.value.as_dict()
                out["stream"] = list(test.Count(upto=4, _more=True))
                out["after"] = test.Echo(value="still here")
        return out

    async with running(updater_service(), path):
        out = await in_thread(session)
    assert out["boot_target"] == {
        "build": {"release": "1.4.0", "patch": 2},
        "path": "/var/lib/app/builds/1.4.0/2",
    }
    assert out["unimplemented"] == {
        "error": "org.varlink.service.MethodNotImplemented",
        "parameters": {"method": "io.patchd.Updater.GetStatus"},
    }
    assert out["sum"] == {"sum": 42}
    assert out["oops"] == {"error": f"{TEST_INTERFACE}.Oops", "parameters": {"why": "testing"}}
    assert out["stream"] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
    assert out["after"] == {"value": "still here"}


@pytest.mark.anyio
async def test_standard_errors_reach_the_varlink_client(sockdir: Path) -> None:
    """Unknown interface, unknown method and a wrong parameter type arrive as the
    standard org.varlink.service errors the package knows."""
    path = sockdir / "s"

    def session() -> list[dict[str, Any]]:
        errors = []
        with varlink.Client(address=f"unix:{path}") as client:
            connection = client.open_connection()
            try:
                with pytest.raises(varlink.InterfaceNotFound) as missing:
                    client.open("org.example.missing", connection=connection)
                errors.append(missing.value.as_dict())
                # The package validates locally, so talk through a handler for an
                # interface description that declares more than the server has.
                fake = varlink.Interface(
                    "interface org.example.test\nmethod Nope() -> ()\n"
                    "method Add(a: string, b: int) -> (sum: int)\n"
                )
                handler = varlink.client.SimpleClientInterfaceHandler(fake, connection)
                for invoke in (handler.Nope, lambda: handler.Add(a="1", b=2)):
                    with pytest.raises(varlink.VarlinkError) as err:
                        invoke()
                    errors.append(err.value.as_dict())
            finally:
                connection.close()
        return errors

    async with running(updater_service(), path):
        errors = await in_thread(session)
    assert errors == [
        {
            "error": "org.varlink.service.InterfaceNotFound",
            "parameters": {"interface": "org.example.missing"},
        },
        {
            "error": "org.varlink.service.MethodNotFound",
            "parameters": {"method": "org.example.test.Nope"},
        },
        {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "a"}},
    ]
