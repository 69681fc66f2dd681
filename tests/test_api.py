"""io.patchd.Updater on the REAL daemon, called with the third-party ``varlink`` package
(docs/socket.md): introspection, every method, streaming, the interface's errors, and
authorisation by the peer's uid (child processes that setuid to other users)."""

from __future__ import annotations

import grp
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import varlink

from patchd.core.errors import SocketInUse
from patchd.service.api import serve_api
from support.daemon import DaemonProcess, Publisher, state_of
from support.env import (  # noqa: F401 (env_fixture, http_env_fixture: fixtures)
    UPDATER,
    Env,
    R,
    as_user,
    b,
    credentials,
    denied,
    env_fixture,
    http_env_fixture,
    needs_root,
    shared_socket,
)
from support.nginx import nginx_repo  # noqa: F401 (fixture)

#: docs/socket.md, copied here on purpose: the daemon must return exactly this text, and a
#: copy independent of patchd.service.interface catches an accidental edit there.
SPECIFIED_INTERFACE = """\
interface io.patchd.Updater

type Build (release: string, patch: int)

type BuildInfo (build: Build, state: string, reason: ?string, size: ?int)

type Activity (phase: string, build: ?Build, done: int, total: int)

type HoldInfo (reason: string, since: string)
type Activation (build: Build, policy: string, opens: ?string, closes: ?string)

method GetStatus() -> (app: string, channel: string, release: string,
  next_boot: Build, last_booted: ?Build, currently_booting: ?Build,
  builds: []BuildInfo, activity: Activity,
  last_check: ?string, next_check: ?string, last_error: ?string,
  hold: ?HoldInfo, activation: ?Activation)
method GetMetrics() -> (text: string)
method GetBootTarget() -> (build: Build, path: string)
method BootStart(build: ?Build, pid: ?int) -> (build: Build, path: string)
method BootSuccess(build: ?Build) -> ()
method BootFailure(build: ?Build, reason: ?string) -> ()
method CheckNow() -> (strategy: string, build: ?Build, held: ?bool)
method Install(path: ?string, fd: ?int, hold: ?bool) -> (build: Build)
method Rollback() -> (build: Build)
method Hold(reason: ?string) -> (hold: HoldInfo)
method Unhold() -> (lifted: ?HoldInfo)
method Unmark(build: Build) -> ()
method WatchActivity() -> (activity: Activity)

error NotAuthorized (method: string)
error NotBootTarget (expected: Build, got: Build)
error Busy (activity: Activity)
error UpdateFailed (reason: string, transient: bool)
error InvalidBundle (reason: string)
error NoBootInProgress (reason: string)
error RollbackRefused (reason: string)
error StateConflict (reason: string)
error NotMarkedBad (build: Build, state: ?string)
error DowngradeRefused (build: Build, newer: Build)
"""


def client(d: DaemonProcess) -> varlink.Client:
    return varlink.Client(address=f"unix:{d.socket}")


def failure(fn: Callable[[], object]) -> dict[str, Any]:
    """Call ``fn`` expecting a varlink error reply; the error as a dict."""
    with pytest.raises(varlink.VarlinkError) as err:
        fn()
    result: dict[str, Any] = err.value.as_dict()
    return result


# --- introspection ----------------------------------------------------------------------


def test_introspection_of_the_real_daemon(env: Env) -> None:
    """GetInfo lists io.patchd.Updater; GetInterfaceDescription returns docs/socket.md verbatim."""
    d = env.daemon()
    with client(d) as c:
        interfaces = c.get_interfaces()  # GetInfo; the package keeps the reply in .info
        info = c.info
        connection = c.open_connection()
        try:
            service = c.open("org.varlink.service", connection=connection)
            description = service.GetInterfaceDescription(UPDATER)["description"]
        finally:
            connection.close()
        members = list(c.get_interface(UPDATER).members)
    assert interfaces == info["interfaces"] == ["org.varlink.service", UPDATER]
    assert info["vendor"] == "patchd" and info["product"] == "patchd" and info["version"]
    assert description == SPECIFIED_INTERFACE
    assert members[-10:] == ["NotAuthorized", "NotBootTarget", "Busy", "UpdateFailed",
                             "InvalidBundle", "NoBootInProgress", "RollbackRefused",
                             "StateConflict", "NotMarkedBad", "DowngradeRefused"]


# --- every method ----------------------------------------------------------------------


def test_every_method_through_the_varlink_package(env: Env) -> None:
    """GetStatus, CheckNow, GetBootTarget, BootStart/Success/Failure, Install, Rollback and
    a one-shot WatchActivity all work from a generic varlink client."""
    d = env.daemon()
    with client(d) as c, c.open(UPDATER) as up:
        status = up.GetStatus()
        assert (status["app"], status["channel"], status["release"]) == ("kiosk", "stable", R)
        assert status["next_boot"] == b(0) and status["activity"]["phase"] == "idle"
        assert up.GetBootTarget() == {"build": b(0), "path": str(env.release_dir)}

        env.publisher.publish(env.patch(1))
        assert up.CheckNow() == {"strategy": "patch", "build": b(1)}
        d.wait_status(lambda s: s["activity"]["phase"] == "idle" and s["next_boot"] == b(1),
                      "patch 1 installed")
        target = up.GetBootTarget()
        assert target["build"] == b(1)
        assert (Path(target["path"]) / "lib/app.py").read_text() == "print('patch 1')\n"

        assert up.BootStart(pid=os.getpid()) == target
        assert up.GetStatus()["currently_booting"] == b(1)
        assert up.BootSuccess() == {}
        status = up.GetStatus()
        # The varlink package leaves out members whose value is null.
        assert status["last_booted"] == b(1) and "currently_booting" not in status
        assert d.status()["currently_booting"] is None

        assert up.Install(path=str(env.patch(2))) == {"build": b(2)}
        assert up.GetStatus()["next_boot"] == b(2)
        assert up.Rollback() == {"build": b(1)}
        status = up.GetStatus()
        assert status["next_boot"] == b(1)
        assert {"build": b(2), "state": "bad", "reason": "manual"} in status["builds"]

        assert up.Install(path=str(env.patch(3))) == {"build": b(3)}
        assert up.BootStart(build=b(3))["build"] == b(3)
        assert up.BootFailure(reason="self-test failed") == {}
        status = up.GetStatus()
        assert state_of(status, R, 3) == "bad" and status["next_boot"] == b(1)

        assert up.WatchActivity() == {"activity": {"phase": "idle", "done": 0, "total": 0}}


def test_watch_activity_streams_a_slow_download(http_env: Env) -> None:
    """WatchActivity with more=true streams several replies during a rate-limited download,
    ending at idle; Install meanwhile answers Busy with the activity."""
    env = http_env
    noise = random.Random(8).randbytes(1_200_000)  # incompressible: ~1.2 s at 1 MB/s
    env.publisher.publish(env.patch(1, {"data/blob": noise}))
    d = env.daemon('[install]\nmax_download_rate = "1MB"\n')
    other = env.patch(5)
    with client(d) as c, c.open(UPDATER) as watcher, c.open(UPDATER) as up:
        stream = watcher.WatchActivity(_more=True)
        assert next(stream)["activity"]["phase"] == "idle"
        assert up.CheckNow() == {"strategy": "patch", "build": b(1)}
        replies = []
        for reply in stream:
            replies.append(reply["activity"])
            if len(replies) == 1:
                busy = failure(lambda: up.Install(path=str(other)))
            if reply["activity"]["phase"] == "idle":
                break
    downloading = [a for a in replies if a["phase"] == "downloading"]
    assert len(downloading) >= 3, replies
    assert all(a["build"] == b(1) and a["total"] > 1_000_000 for a in downloading)
    dones = [a["done"] for a in downloading]
    assert dones == sorted(dones) and dones[-1] > dones[0]
    assert replies[-1] == {"phase": "idle", "done": 0, "total": 0}  # build: null left out
    assert busy["error"] == f"{UPDATER}.Busy"
    assert busy["parameters"]["activity"]["phase"] in ("downloading", "installing")
    assert busy["parameters"]["activity"]["build"] == b(1)
    assert d.status()["next_boot"] == b(1)


# --- the interface's errors ---------------------------------------------------------------


def tampered(bundle: Path) -> Path:
    """A copy of ``bundle`` with one byte flipped in its second half (payload data)."""
    data = bytearray(bundle.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    out = bundle.with_name("tampered-" + bundle.name)
    out.write_bytes(bytes(data))
    return out


def test_interface_errors(env: Env) -> None:
    """NotBootTarget names expected/got; UpdateFailed for a missing manifest;
    RollbackRefused for a refused rollback; InvalidBundle for a tampered, a
    foreign-signed and a missing file."""
    d = env.daemon()
    d.expected_errors |= {"check.failed", "signature_invalid"}  # provoked below
    (env.tmp / "foreign").mkdir()
    foreign = Publisher(env.tmp / "foreign", env.tmp / "foreign-repo")  # an untrusted key
    foreign_bundle = foreign.bundle(R, 4, env.release_dir, env.tree({"x": "y"}))
    with client(d) as c, c.open(UPDATER) as up:
        up.Install(path=str(env.patch(1)))
        wrong = failure(lambda: up.BootStart(build=b(7)))
        assert wrong == {"error": f"{UPDATER}.NotBootTarget",
                         "parameters": {"expected": b(1), "got": b(7)}}
        up.BootStart(pid=os.getpid())
        wrong = failure(lambda: up.BootSuccess(build=b(0)))
        assert wrong["parameters"] == {"expected": b(1), "got": b(0)}
        up.BootSuccess()

        missing = failure(up.CheckNow)  # nothing published: no manifest.json
        assert missing["error"] == f"{UPDATER}.UpdateFailed"
        assert missing["parameters"]["transient"] is False
        assert "manifest.json" in missing["parameters"]["reason"]

        up.Rollback()  # 1 → bad; next_boot is the release itself now
        refused = failure(up.Rollback)
        assert refused["error"] == f"{UPDATER}.RollbackRefused"
        assert "nothing older" in refused["parameters"]["reason"]

        for bad_file in (tampered(env.patch(2)), foreign_bundle,
                         env.tmp / "no-such.patchd"):
            invalid = failure(lambda p=bad_file: up.Install(path=str(p)))  # type: ignore[misc]
            assert invalid["error"] == f"{UPDATER}.InvalidBundle", invalid
            assert invalid["parameters"]["reason"]
        assert up.GetStatus()["next_boot"] == b(0)
        assert "Traceback" not in d.log()


# --- authorisation by uid -------------------------------------------------------------------


@needs_root
def test_authorisation_by_peer_uid(env: Env) -> None:
    """Reads for anyone on the socket; Boot* for boot.reporters; CheckNow/Install/Rollback
    for api.admins; everything else is NotAuthorized naming the method."""
    env.publisher.publish(env.patch(1))
    d = env.daemon('[api]\nsocket_group = "nogroup"\nadmins = ["bin"]\n'
                   '[boot]\nreporters = ["daemon"]\n', prepare=shared_socket)
    st = os.stat(d.socket)
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, 65534)
    bundle = env.patch(2)
    os.chmod(bundle.parent, 0o755)
    os.chmod(bundle, 0o644)

    # nobody: in the socket's group, neither reporter nor admin.
    nobody = as_user("nobody", d, [
        ("GetStatus", {}), ("GetBootTarget", {}), ("WatchActivity", {}),
        ("BootStart", {}), ("BootSuccess", {}), ("BootFailure", {}),
        ("CheckNow", {}), ("Install", {"path": str(bundle)}), ("Rollback", {})])
    assert nobody[0]["ok"]["next_boot"] == b(0)
    assert nobody[1]["ok"]["build"] == b(0)
    assert nobody[2]["ok"]["activity"]["phase"] == "idle"
    assert nobody[3:] == [denied(m) for m in ("BootStart", "BootSuccess", "BootFailure",
                                               "CheckNow", "Install", "Rollback")]

    # daemon: a boot reporter (in the socket's group through a supplementary group).
    reporter = as_user("daemon", d, [("BootStart", {}), ("BootSuccess", {}),
                                     ("CheckNow", {}), ("Rollback", {})], groups=("nogroup",))
    assert reporter[0]["ok"] == {"build": b(0), "path": str(env.release_dir)}
    assert reporter[1] == {"ok": {}}
    assert reporter[2:] == [denied("CheckNow"), denied("Rollback")]

    # bin: an admin, not a reporter.
    admin = as_user("bin", d, [("CheckNow", {}), ("BootStart", {})], groups=("nogroup",))
    assert admin == [{"ok": {"strategy": "patch", "build": b(1)}}, denied("BootStart")]
    d.wait_status(lambda s: s["next_boot"] == b(1) and s["activity"]["phase"] == "idle",
                  "the admin's check installed patch 1")
    admin = as_user("bin", d, [("Install", {"path": str(bundle)}), ("Rollback", {})],
                    groups=("nogroup",))
    # patch 2 replaced the never-booted patch 1, so rolling it back falls to the release
    assert admin == [{"ok": {"build": b(2)}}, {"ok": {"build": b(0)}}]


_BIND_AS_NOBODY = """\
import json, os, sys
from pathlib import Path
from patchd.varlink import bind_unix_socket
uid, gid, groups = json.loads(sys.argv[2])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
try:
    bind_unix_socket(Path(sys.argv[1]), 0o660, 0)
except PermissionError as exc:
    print(exc)
"""


@needs_root
def test_socket_group_not_allowed_is_a_clear_error(tmp_path: Path) -> None:
    """A process that may not give the socket to its group (chown EPERM) gets an error
    naming the socket (not the temporary file chown saw) and leaves no file behind.
    (The daemon never gets there: ``socket_group_usable`` makes it keep its own group.)"""
    sockdir = Path(tempfile.mkdtemp(prefix="pdg", dir="/tmp"))
    try:
        os.chmod(sockdir, 0o777)
        proc = subprocess.run([sys.executable, "-c", _BIND_AS_NOBODY, str(sockdir / "s.sock"),
                               json.dumps(credentials("nobody"))],
                              capture_output=True, text=True, timeout=30, cwd="/")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"cannot give the socket {sockdir / 's.sock'} to group 0: ")
        assert list(sockdir.iterdir()) == []  # the temporary socket file was removed
    finally:
        shutil.rmtree(sockdir)


def _socket_only_daemon(socket_path: Path) -> Any:
    """Just what ``serve_api`` reads of a daemon before it listens."""
    group = grp.getgrgid(os.getegid()).gr_name
    return SimpleNamespace(config=SimpleNamespace(api=SimpleNamespace(socket_group=group),
                                                  paths=SimpleNamespace(socket=socket_path)))


@pytest.mark.anyio
async def test_socket_in_use_is_patchds_error() -> None:
    """The varlink layer's AddressInUse leaves ``serve_api`` as SocketInUse (exit 2), with
    the "already running?" hint only when a process answers on the path."""
    sockdir = Path(tempfile.mkdtemp(prefix="pdu", dir="/tmp"))
    try:
        live = sockdir / "live.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(live))
            listener.listen()
            with pytest.raises(SocketInUse) as info:
                await serve_api(_socket_only_daemon(live))
        assert str(info.value) == (f"another process is listening on {live}; "
                                   "is patchd already running?")
        assert info.value.exit_code == 2
        regular = sockdir / "file"
        regular.write_text("precious")
        with pytest.raises(SocketInUse) as info:
            await serve_api(_socket_only_daemon(regular))
        assert str(info.value) == (f"{regular} exists and is not a socket; remove it or use "
                                   "another path")
        assert regular.read_text() == "precious"
    finally:
        shutil.rmtree(sockdir)
