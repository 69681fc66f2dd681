"""The CLI's client side (docs/cli.md) through the real ``python -m patchd`` command against the
real daemon: every command, and one clear line plus exit 1 (operation) or 2 (usage)
when something is wrong."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from patchd.cli.client import _client_error, call, watch_stream
from patchd.core.errors import (
    ClientError,
    DaemonConnectionBroken,
    DaemonNotRunning,
    SocketAccessDenied,
)
from patchd.varlink import ClientError as VarlinkClientError
from patchd.varlink import ConnectFailed, ProtocolError
from support.cli import run_patchd
from support.daemon import state_of
from support.env import (  # noqa: F401 (env_fixture, http_env_fixture: fixtures)
    Env,
    R,
    b,
    credentials,
    env_fixture,
    http_env_fixture,
    needs_root,
    ok,
    one_line_error,
    patchd,
)
from support.nginx import nginx_repo  # noqa: F401 (fixture)


def test_status_readable_and_json(env: Env) -> None:
    """``status`` prints a readable summary; ``status --json`` prints GetStatus itself."""
    d = env.daemon()
    d.call("Install", {"path": str(env.patch(1))})
    d.call("Rollback")
    d.call("Install", {"path": str(env.patch(2))})
    text = ok(patchd(d, "status"))
    assert text.splitlines()[0] == f"kiosk (stable), release {R}"
    assert "  next boot:    1.4.0+2\n" in text
    assert "  last booted:  none\n" in text
    assert "  activity:     idle\n" in text
    assert "    1.4.0+1          bad (manual)\n" in text
    assert "    1.4.0+2          installed\n" in text
    reply = json.loads(ok(patchd(d, "status", "--json")))
    assert reply == d.status()


def test_install_rollback_boot_target_and_boot_commands(env: Env) -> None:
    """install, boot-target, boot start/success/failure and rollback do what they say
    and print what a launcher or operator needs."""
    d = env.daemon()
    tree1 = str(d.state_dir / "builds" / R / "1" / "tree")
    assert ok(patchd(d, "install", str(env.patch(1)))) == \
        "installed 1.4.0+1; it boots at the next start\n"
    assert ok(patchd(d, "boot-target")) == f"{tree1}\n"
    assert ok(patchd(d, "boot", "start", "--pid", str(os.getpid()))) == f"{tree1}\n"
    assert d.status()["currently_booting"] == b(1)
    assert ok(patchd(d, "boot", "success")) == ""
    assert d.status()["last_booted"] == b(1)

    ok(patchd(d, "install", str(env.patch(2))))
    line = one_line_error(patchd(d, "boot", "start", "--build", "1.4.0+5"), 1)
    assert line == "patchd: not the boot target: expected 1.4.0+2, got 1.4.0+5"
    tree2 = str(d.state_dir / "builds" / R / "2" / "tree")
    assert ok(patchd(d, "boot", "start", "--build", "1.4.0+2")) == f"{tree2}\n"
    assert ok(patchd(d, "boot", "failure", "--reason", "no network")) == ""
    status = d.status()
    assert state_of(status, R, 2) == "bad" and status["next_boot"] == b(1)

    ok(patchd(d, "install", str(env.patch(3))))
    assert ok(patchd(d, "rollback")) == "rolled back; next boot is 1.4.0+1\n"
    assert state_of(d.status(), R, 3) == "bad"
    # Each socket error has its own line: boot and rollback errors are not "update failed".
    line = one_line_error(patchd(d, "boot", "success"), 1)
    assert line == ("patchd: no boot in progress: no boot is in progress "
                    "(call boot start first)")
    ok(patchd(d, "rollback"))  # 1 → bad: next boot is the release itself
    line = one_line_error(patchd(d, "rollback"), 1)
    assert line.startswith("patchd: cannot roll back: next_boot is 1.4.0+0"), line


def test_check_wait_and_watch(http_env: Env) -> None:
    """``check --wait`` shows progress and returns once installed; ``check`` says when
    there is nothing new; ``watch`` follows a download and ends when idle."""
    env = http_env
    rng = random.Random(5)
    env.publisher.publish(env.patch(1, {"data/blob": rng.randbytes(400_000)}))
    d = env.daemon('[install]\nmax_download_rate = "1MB"\n')
    lines = ok(patchd(d, "check", "--wait")).splitlines()
    assert lines[0] == "patch update to 1.4.0+1"
    assert any(line.startswith("[") and "downloading 1.4.0+1" in line for line in lines), lines
    assert lines[-1] == "installed 1.4.0+1; it boots at the next start"
    assert ok(patchd(d, "check")) == "up to date: no update\n"

    env.publisher.publish(env.patch(2, {"data/blob": rng.randbytes(1_500_000)}))
    assert d.call("CheckNow") == {"strategy": "patch", "build": b(2)}
    lines = ok(patchd(d, "watch")).splitlines()
    assert any("downloading 1.4.0+2" in line for line in lines), lines
    assert lines[-1] == "idle"
    assert d.status()["next_boot"] == b(2)


def test_daemon_not_running() -> None:
    """No socket file, or a stale one nobody listens on: one line, exit 1."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pdc") as tmp:
        missing = Path(tmp) / "kiosk.sock"
        line = one_line_error(run_patchd("status", "--socket", str(missing)), 1)
        assert line.startswith(f"patchd: patchd is not running (cannot connect to {missing}")
        stale = Path(tmp) / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))  # the file stays; nobody will ever listen on it
        line = one_line_error(run_patchd("boot-target", "--socket", str(stale)), 1)
        assert line.startswith(f"patchd: patchd is not running (cannot connect to {stale}")


@pytest.mark.parametrize("args", [
    ["boot"],                                              # no event
    ["boot", "start", "--pid", "abc"],                     # not a number
    ["boot", "success", "--build", "latest", "--socket", "/tmp/x.sock"],
    ["install", "/nonexistent/bundle.patchd", "--socket", "/tmp/x.sock"],
    ["status", "--bogus"],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    """A wrong command line is one line on stderr and exit 2, before any connection."""
    one_line_error(run_patchd(*args), 2)


# The CLI as another user: the interpreter lives under /root (unreadable to others), so
# the child starts as root, imports the CLI's modules, drops to the user and then runs
# patchd's real main() — the same code path as the installed ``patchd`` command.
_CLI_AS_USER = """\
import json, os, sys
import shutil  # argparse imports it lazily to format help and errors
import patchd.cli.main, patchd.cli.client, patchd.varlink
patchd.cli.main.build_parser()
uid, gid, groups = json.loads(sys.argv[1])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
sys.exit(patchd.cli.main.main(sys.argv[2:]))
"""


def cli_as(user: str, *args: str,
           groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    return subprocess.run([sys.executable, "-c", _CLI_AS_USER,
                           json.dumps(credentials(user, groups)), *args],
                          capture_output=True, text=True, timeout=30, cwd="/", env=environ)


@needs_root
def test_access_denied_and_not_authorised(env: Env) -> None:
    """A user outside the socket's group gets "permission denied"; one inside it but not
    an admin gets "not authorised" for check; both exit 1 with one line; reads work."""
    d = env.daemon('[api]\nsocket_group = "nogroup"\n',
                   prepare=lambda p: os.chmod(p.socket.parent, 0o755))
    sock = str(d.socket)
    line = one_line_error(cli_as("bin", "status", "--socket", sock), 1)
    assert line == (f"patchd: permission denied on {sock}: run as root or as a member of "
                    "the socket's group")
    line = one_line_error(cli_as("nobody", "check", "--socket", sock), 1)
    assert line == ("patchd: not authorised to call io.patchd.Updater.CheckNow "
                    "(ask for boot.reporters or api.admins)")
    line = one_line_error(cli_as("nobody", "boot", "start", "--socket", sock), 1)
    assert "not authorised to call io.patchd.Updater.BootStart" in line
    out = cli_as("nobody", "boot-target", "--socket", sock)
    assert (out.returncode, out.stdout) == (0, f"{env.release_dir}\n"), out.stderr


# --- the varlink client's failures, as the CLI words them -----------------------------------

_SOCK = Path("/run/patchd/kiosk.sock")


@pytest.mark.parametrize(("failure", "kind", "message"), [
    (ConnectFailed(_SOCK, FileNotFoundError(errno.ENOENT, "No such file or directory")),
     DaemonNotRunning,
     f"patchd is not running (cannot connect to {_SOCK}: No such file or directory)"),
    (ConnectFailed(_SOCK, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
     DaemonNotRunning, f"patchd is not running (cannot connect to {_SOCK}: Connection refused)"),
    (ConnectFailed(_SOCK, NotADirectoryError(errno.ENOTDIR, "Not a directory")),
     DaemonNotRunning, f"patchd is not running (cannot connect to {_SOCK}: Not a directory)"),
    (ConnectFailed(_SOCK, PermissionError(errno.EACCES, "Permission denied")),
     SocketAccessDenied,
     f"permission denied on {_SOCK}: run as root or as a member of the socket's group"),
    (ConnectFailed(_SOCK, PermissionError(errno.EPERM, "Operation not permitted")),
     SocketAccessDenied,
     f"permission denied on {_SOCK}: run as root or as a member of the socket's group"),
    (ConnectFailed(_SOCK, BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")),
     DaemonConnectionBroken,
     f"cannot connect to {_SOCK}: [Errno 11] Resource temporarily unavailable"),
    (ConnectFailed(_SOCK, TimeoutError("timed out")),
     DaemonConnectionBroken, f"cannot connect to {_SOCK}: timed out"),
    (ProtocolError("the daemon closed the connection before replying"),
     DaemonConnectionBroken, "the daemon closed the connection before replying"),
])
def test_client_failures_become_patchd_errors(
        failure: VarlinkClientError, kind: type[ClientError], message: str) -> None:
    """The varlink client says what failed (errno, path); the CLI says what it means for
    patchd, in one line with exit code 1."""
    error = _client_error(failure)
    assert (type(error), str(error), error.exit_code) == (kind, message, 1)


def test_call_and_watch_translate_client_failures() -> None:
    """``call`` and ``watch_stream`` raise patchd's errors, never the varlink package's."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pdc") as tmp:
        path = Path(tmp) / "s.sock"
        with pytest.raises(DaemonNotRunning, match="patchd is not running"):
            call(path, "GetStatus")
        with pytest.raises(DaemonNotRunning, match="patchd is not running"):
            next(watch_stream(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen()  # connects succeed; nobody ever answers
            with pytest.raises(DaemonConnectionBroken, match=r"no reply from \S+ within 0\.2 s"):
                call(path, "GetStatus", timeout=0.2)

            def hang_up() -> None:
                listener.accept()[0].close()  # the connection call() left behind
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)

            thread = threading.Thread(target=hang_up, daemon=True)
            thread.start()
            with pytest.raises(DaemonConnectionBroken, match="closed the connection"):
                next(watch_stream(path))
            thread.join()
