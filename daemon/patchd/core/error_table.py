"""How an error leaves patchd: the interface error on the socket, and the CLI's line.

One table, :data:`SOCKET_ERRORS`: each row names an ``io.patchd.Updater`` error, the
error classes that become it (most specific row first), its parameters, and the line
the CLI prints for it with its exit code. The API (:func:`to_socket_error`) and the
CLI (:func:`describe_socket_error`) both read it, so routing lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from patchd.core.errors import (
    BadInputError,
    Busy,
    CommandFailed,
    DowngradeRefused,
    LifecycleError,
    NoBootInProgress,
    NotAuthorized,
    NotBootTarget,
    NotMarkedBad,
    PatchdError,
    RollbackRefused,
    TransientError,
)
from patchd.core.text import printable

__all__ = ["INTERFACE", "INTERNAL_ERROR", "SOCKET_ERRORS", "SocketError", "activity_line",
           "describe_socket_error", "size_text", "to_socket_error"]

#: The interface whose errors the table names.
INTERFACE = "io.patchd.Updater"


def _build_text(obj: object) -> str:
    if not isinstance(obj, dict):
        return "none"
    return f"{obj.get('release')}+{obj.get('patch')}"


def _build_json(build: Any) -> dict[str, Any] | None:
    to_json = getattr(build, "to_json", None)
    return to_json() if callable(to_json) else None


def activity_line(a: Mapping[str, Any]) -> str:
    """One line for an ``Activity`` object, e.g. ``downloading 1.4.0+3: 37% (…)``."""
    phase = a.get("phase", "idle")
    if phase == "idle" or not a.get("build"):
        return str(phase)
    done, total = a.get("done", 0), a.get("total", 0)
    line = f"{phase} {_build_text(a.get('build'))}"
    if total:
        line += f": {100 * done // total}% ({size_text(done)} of {size_text(total)})"
    return line


def size_text(n: int) -> str:
    """``512 B``, ``37.5 KB``, ``1.2 GB``: sizes as the CLI prints them (decimal units)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


@dataclass(frozen=True)
class SocketError:
    """One ``io.patchd.Updater`` error: which classes become it, with what parameters,
    and the line the CLI prints for it (with the CLI's exit code)."""

    name: str
    classes: tuple[type[PatchdError], ...]
    parameters: Callable[[Any], dict[str, Any]]
    message: Callable[[Mapping[str, Any]], str]
    exit_code: int = 1


def _update_failed_message(p: Mapping[str, Any]) -> str:
    kind = "transient, will be retried" if p.get("transient") else "not retried"
    return f"update failed ({kind}): {p.get('reason')}"


def _not_marked_bad_message(p: Mapping[str, Any]) -> str:
    state = p.get("state")
    what = f"it is {state}" if state else "this host has no state for it"
    return (f"{_build_text(p.get('build'))} is not marked bad ({what}); "
            "there is no tombstone to lift")


#: Most specific first: an error takes the first row one of whose classes it is.
SOCKET_ERRORS: tuple[SocketError, ...] = (
    SocketError(
        "NotAuthorized", (NotAuthorized,),
        lambda e: {"method": e.method},
        lambda p: f"not authorised to call {p.get('method')} "
                  "(ask for boot.reporters or api.admins)"),
    SocketError(
        "Busy", (Busy,),
        lambda e: {"activity": e.activity},
        lambda p: f"busy: {activity_line(p.get('activity') or {})}"),
    SocketError(
        "NotBootTarget", (NotBootTarget,),
        lambda e: {"expected": _build_json(e.expected), "got": _build_json(e.got)},
        lambda p: f"not the boot target: expected {_build_text(p.get('expected'))}, "
                  f"got {_build_text(p.get('got'))}"),
    SocketError(
        "NotMarkedBad", (NotMarkedBad,),
        lambda e: {"build": _build_json(e.build), "state": e.state},
        _not_marked_bad_message),
    SocketError(
        "DowngradeRefused", (DowngradeRefused,),
        lambda e: {"build": _build_json(e.build), "newer": _build_json(e.newer)},
        lambda p: f"refused: {_build_text(p.get('build'))} is older than "
                  f"{_build_text(p.get('newer'))}, which this host would go back to at its "
                  f"next check; install with --hold to keep it on {_build_text(p.get('build'))}"),
    SocketError(
        "NoBootInProgress", (NoBootInProgress,),
        lambda e: {"reason": str(e)},
        lambda p: f"no boot in progress: {p.get('reason')}"),
    SocketError(
        "RollbackRefused", (RollbackRefused,),
        lambda e: {"reason": str(e)},
        lambda p: f"cannot roll back: {p.get('reason')}"),
    SocketError(
        "StateConflict", (LifecycleError,),
        lambda e: {"reason": str(e)},
        lambda p: f"not possible in this state: {p.get('reason')}"),
    SocketError(
        "InvalidBundle", (BadInputError,),
        lambda e: {"reason": str(e)},
        lambda p: f"invalid bundle: {p.get('reason')}"),
    SocketError(
        "UpdateFailed", (PatchdError,),
        lambda e: {"reason": str(e), "transient": isinstance(e, TransientError)},
        _update_failed_message),
)

#: What the daemon answers for an exception it did not expect (the log has the details).
INTERNAL_ERROR = ("UpdateFailed",
                  {"reason": "internal error in patchd; see the daemon's log", "transient": False})


def to_socket_error(exc: PatchdError) -> tuple[str, dict[str, Any]]:
    """The interface error (full name) and parameters that ``exc`` becomes on the socket."""
    for row in SOCKET_ERRORS:
        if isinstance(exc, row.classes):
            # Reasons carry outside text (a URL, a server's words): one escaped line.
            parameters = {k: printable(v) if isinstance(v, str) else v
                          for k, v in row.parameters(exc).items()}
            return f"{INTERFACE}.{row.name}", parameters
    raise AssertionError(f"no socket error for {type(exc).__name__}")  # PatchdError row


def describe_socket_error(name: str, parameters: Mapping[str, Any]) -> CommandFailed:
    """The CLI's error for an error reply: the table's line, or the raw name and values."""
    short = name.removeprefix(f"{INTERFACE}.")
    for row in SOCKET_ERRORS:
        if row.name == short:
            return CommandFailed(printable(row.message(parameters), 2048), row.exit_code)
    if parameters:
        return CommandFailed(printable(
            f"{name}: {json.dumps(dict(parameters), sort_keys=True)}", 2048))
    return CommandFailed(printable(name))
