"""The CLI's client side: status, watch, check, install, rollback, hold, unhold, unmark,
boot.

Each command is one or two varlink calls through the blocking client; every failure is
one line on stderr (the CLI's main prints ``PatchdError`` messages); an error reply
becomes the error table's line for it (``patchd.core.errors.SOCKET_ERRORS``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from patchd.core.error_table import activity_line, describe_socket_error
from patchd.core.errors import (
    ClientError,
    CommandFailed,
    DaemonConnectionBroken,
    DaemonNotRunning,
    SocketAccessDenied,
    UsageError,
)
from patchd.core.model import MAX_HOLD_REASON
from patchd.core.text import printable
from patchd.service.interface import INTERFACE_NAME
from patchd.varlink import ClientError as VarlinkClientError
from patchd.varlink import ConnectFailed, VarlinkClient, VarlinkError

RUN_DIR = Path("/run/patchd")



def socket_path(app: str | None, explicit: Path | None) -> Path:
    """``--socket``, else ``/run/patchd/APP.sock``; APP from the argument, ``PATCHD_APP``,
    or the only socket in /run/patchd."""
    if explicit is not None:
        return explicit
    app = app or os.environ.get("PATCHD_APP")
    if app:
        return RUN_DIR / f"{app}.sock"
    sockets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise UsageError("name the app (no patchd socket found in /run/patchd)")
    names = ", ".join(s.stem for s in sockets)
    raise UsageError(f"name the app: several are managed here ({names})")


def _client_error(exc: VarlinkClientError) -> ClientError:
    """The one line the CLI prints when it got no reply: the cause the user can act on."""
    if isinstance(exc, ConnectFailed):
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            return DaemonNotRunning(
                f"patchd is not running (cannot connect to {exc.path}: {exc.strerror})")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return SocketAccessDenied(f"permission denied on {exc.path}: run as root or as a "
                                      "member of the socket's group")
    return DaemonConnectionBroken(str(exc))


def call(path: Path, method: str, params: dict[str, Any] | None = None,
         timeout: float | None = 600, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    try:
        with VarlinkClient(path, timeout=timeout) as client:
            return client.call(f"{INTERFACE_NAME}.{method}", params or {}, fds=fds)
    except VarlinkError as exc:
        raise describe_socket_error(exc.name, exc.parameters) from None
    except VarlinkClientError as exc:
        raise _client_error(exc) from exc


def watch_stream(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with VarlinkClient(path, timeout=30) as client:
            for reply in client.stream(f"{INTERFACE_NAME}.WatchActivity", {}, timeout=None):
                yield reply["activity"]
    except VarlinkError as exc:
        raise describe_socket_error(exc.name, exc.parameters) from None
    except VarlinkClientError as exc:
        raise _client_error(exc) from exc


def _build(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "none"
    return f"{obj.get('release')}+{obj.get('patch')}"


def parse_build(text: str | None, what: str = "--build") -> dict[str, Any] | None:
    if text is None:
        return None
    release, sep, patch = text.rpartition("+")
    if not sep or not patch.isdigit() or not release:
        raise UsageError(f"{what} must look like RELEASE+PATCH (e.g. 1.4.0+3), got {text!r}")
    return {"release": release, "patch": int(patch)}


def activation_text(a: dict[str, Any]) -> str:
    """When the pending build replaces the running one, by ``[activate] policy``."""
    when = {"next-start": "at the app's next start",
            "immediate": "now (patchd launch restarts the app)",
            "idle": "when the app reports idle to patchd launch"}.get(str(a.get("policy")))
    if when is None:
        when = f"in the window {a.get('opens')} to {a.get('closes')} (patchd launch)"
    return printable(f"{_build(a.get('build'))} {when}")


def _bar(a: dict[str, Any], width: int = 30) -> str:
    total = a.get("total") or 0
    if not total or a.get("phase") == "idle":
        return activity_line(a)
    filled = width * a.get("done", 0) // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {activity_line(a)}"


# --- commands ------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    reply = call(socket_path(args.app, args.socket), "GetStatus")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    print(f"{reply['app']} ({reply['channel']}), release {reply['release']}")
    print(f"  next boot:    {_build(reply['next_boot'])}")
    print(f"  last booted:  {_build(reply.get('last_booted'))}")
    if reply.get("currently_booting"):
        print(f"  booting now:  {_build(reply['currently_booting'])}")
    if reply.get("activation"):
        print(f"  activates:    {activation_text(reply['activation'])}")
    print(f"  activity:     {activity_line(reply['activity'])}")
    print(f"  last check:   {reply.get('last_check') or 'never'}"
          f"; next check: {reply.get('next_check') or 'unscheduled'}")
    if reply.get("last_error"):
        print(f"  last error:   {printable(reply['last_error'])}")
    if reply.get("hold"):
        print(f"  hold:         {_hold_text(reply['hold'])} (patchd unhold lifts it)")
    if reply["builds"]:
        print("  builds:")
        for info in reply["builds"]:
            extra = f" ({info['reason']})" if info.get("reason") else ""
            print(f"    {_build(info['build']):<16} {info['state']}{extra}")
    return 0


def metrics(args: argparse.Namespace) -> int:
    """The daemon's Prometheus text, as GetMetrics answers it (label values arrive
    escaped and free of control characters; docs/operations.md#metrics)."""
    reply = call(socket_path(args.app, args.socket), "GetMetrics")
    text = reply.get("text")
    if not isinstance(text, str):
        raise DaemonConnectionBroken("GetMetrics answered without text")
    sys.stdout.write(text)
    return 0


def watch(args: argparse.Namespace, *, show_idle: bool = True) -> int:
    """Follow the activity until idle; ``check --wait`` leaves out the final ``idle``."""
    path = socket_path(args.app, args.socket)
    tty = sys.stdout.isatty()
    last = ""
    for activity in watch_stream(path):
        if not show_idle and activity.get("phase") == "idle":
            break
        line = _bar(activity)
        if line != last:
            print(("\r\033[K" if tty else "") + line, end="" if tty else "\n", flush=True)
            last = line
        if activity.get("phase") == "idle":
            break
    if tty and last:
        print()
    return 0


def check(args: argparse.Namespace) -> int:
    path = socket_path(args.app, args.socket)
    reply = call(path, "CheckNow")
    strategy, build = reply["strategy"], reply.get("build")
    if strategy == "none":
        print("up to date: no update")
        return 0
    if reply.get("held"):
        print(f"held: {strategy} update to {_build(build)} not installed "
              "(patchd unhold lifts the hold)")
        return 0
    print(f"{strategy} update to {_build(build)}")
    if not args.wait:
        return 0
    watch(argparse.Namespace(app=args.app, socket=path), show_idle=False)
    final = call(path, "GetStatus")
    if final["next_boot"] == build:
        print(f"installed {_build(build)}; it boots at the next start")
        return 0
    raise CommandFailed(f"update to {_build(build)} did not install: "
                        f"{final.get('last_error') or 'see patchd status'}")


def install(args: argparse.Namespace) -> int:
    if len(args.args) > 2:
        raise UsageError("install takes [APP] BUNDLE")
    app, bundle = (None, args.args[0]) if len(args.args) == 1 else args.args
    # Opened here, as the caller, and passed as a descriptor: the daemon's private /tmp
    # and its user's permissions do not matter, only what the caller may read.
    try:
        fd = os.open(bundle, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot open bundle file {bundle}: {exc.strerror}") from None
    params: dict[str, Any] = {"fd": 0}
    if args.hold:
        params["hold"] = True
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{bundle} is not a regular file")
        reply = call(socket_path(app, args.socket), "Install", params, fds=(fd,))
    finally:
        os.close(fd)
    held = "; the host is held on it (patchd unhold lifts it)" if args.hold else ""
    print(f"installed {_build(reply['build'])}; it boots at the next start{held}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    reply = call(socket_path(args.app, args.socket), "Rollback")
    print(f"rolled back; next boot is {_build(reply['build'])}")
    return 0


def _hold_text(hold: dict[str, Any]) -> str:
    reason = hold.get("reason") or ""
    return f"held since {hold.get('since') or 'unknown'}" + (f": {reason}" if reason else "")


def hold(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.reason is not None:
        if len(args.reason) > MAX_HOLD_REASON or not args.reason.isprintable():
            raise UsageError(f"--reason must be one printable line of at most "
                             f"{MAX_HOLD_REASON} characters")
        params["reason"] = args.reason
    reply = call(socket_path(args.app, args.socket), "Hold", params)
    print(f"{_hold_text(reply['hold'])}; checks go on, nothing is installed until "
          "patchd unhold")
    return 0


def unhold(args: argparse.Namespace) -> int:
    reply = call(socket_path(args.app, args.socket), "Unhold")
    lifted = reply.get("lifted")
    print(f"hold lifted (was {_hold_text(lifted)})" if lifted else "not held")
    return 0


def unmark(args: argparse.Namespace) -> int:
    if len(args.args) > 2:
        raise UsageError("unmark takes [APP] BUILD")
    app, text = (None, args.args[0]) if len(args.args) == 1 else args.args
    build = parse_build(text, "BUILD")
    call(socket_path(app, args.socket), "Unmark", {"build": build})
    print(f"tombstone of {_build(build)} lifted; the next check may install it")
    return 0


def boot_target(args: argparse.Namespace) -> int:
    reply = call(socket_path(args.app, args.socket), "GetBootTarget")
    print(reply["path"])
    return 0


def boot_start(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if (build := parse_build(args.build)) is not None:
        params["build"] = build
    if args.pid is not None:
        params["pid"] = args.pid
    reply = call(socket_path(args.app, args.socket), "BootStart", params)
    print(reply["path"])
    return 0


def boot_success(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if (build := parse_build(args.build)) is not None:
        params["build"] = build
    call(socket_path(args.app, args.socket), "BootSuccess", params)
    return 0


def boot_failure(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if (build := parse_build(args.build)) is not None:
        params["build"] = build
    if args.reason:
        params["reason"] = args.reason
    call(socket_path(args.app, args.socket), "BootFailure", params)
    return 0
