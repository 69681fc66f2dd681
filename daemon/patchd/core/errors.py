"""Every error patchd raises on purpose, arranged by what the daemon does about it.

The class of an error decides the policy, so the policy lives here and nowhere else::

    PatchdError
    ├── TransientError            retry with backoff, keep partial data
    │   ├── NetworkError            connection refused/reset, DNS, protocol garbage
    │   │   ├── DownloadStalled     fewer bytes than the stall threshold for too long
    │   │   ├── DownloadTruncated   the body ended before the signed size
    │   │   └── BundleHashMismatch  the downloaded bytes are not the signed size and sha256
    │   │       └── DownloadOversize  more bytes than the signed size
    │   ├── ServerError             5xx or 429 (carries Retry-After when given)
    │   │   └── BundleNotFound      404/410 on a bundle (the mirror may lag the manifest)
    │   └── DiskFull                ENOSPC/EDQUOT, or not enough free space to start
    ├── BadInputError             mark the build bad (``bad_reason``), never retry it
    │   ├── BundleInvalid           structure, path, member, size, mix-and-match
    │   │   └── UnsafePath            a path that is not a normalised relative path
    │   ├── PayloadHashMismatch     inside bytes that match the signed sha256, a payload
    │   │                             or a delta base hashes to the wrong value
    │   ├── SignatureInvalid        bundle header signature missing/untrusted/below threshold
    │   └── InstallLoop             installs started too often without finishing
    ├── ConfigError               logged; the daemon keeps running and serving the socket
    │   ├── ConfigFileError         the config file is unreadable or invalid (names the key)
    │   │   └── ConfigErrors          every problem of one file, a line each
    │   ├── RepositoryError         manifest 404, TLS failure, unsupported URL
    │   └── ManifestRejected        the manifest is refused; nothing changes on the host
    │       ├── ManifestInvalid       not JSON, wrong types, too large
    │       ├── ManifestSignatureInvalid
    │       ├── ManifestExpired       freeze attack
    │       ├── ManifestSerialRollback  lower serial, or same serial with other bytes
    │       └── ManifestMismatch      app or channel differ from the config
    ├── LifecycleError            a transition the build's state does not allow
    │   ├── IllegalTransition       names the build, its state and the transition
    │   ├── NotBootTarget           the host reported another build than the boot target
    │   ├── NoBootInProgress        boot success/failure without a boot start
    │   └── RollbackRefused         next boot is the release itself
    ├── Refused                   a socket request the daemon will not carry out now
    │   ├── Busy                    another job changes state; names what it is doing
    │   └── NotAuthorized           the caller's user may not call the method
    ├── ClientError               the CLI could not talk to the daemon
    │   ├── DaemonNotRunning        no socket, or nobody listens on it
    │   ├── SocketAccessDenied      the socket's mode or group keeps this user out
    │   ├── DaemonConnectionBroken  the connection broke or carried garbage
    │   └── CommandFailed           the daemon answered with an error (see SOCKET_ERRORS)
    ├── SocketInUse               another process listens on the socket path
    ├── PackError                 the publisher cannot pack these trees
    ├── DemoFailed                a step of ``patchd demo`` did not turn out as told
    ├── StateLocked               another process owns the state directory
    └── UsageError                the CLI was called wrongly (exit 2)

``InstallCancelled`` is no PatchdError: it is the stop request (SIGTERM) reaching an
install between two ops, and is never reported as a failure.

How an error leaves patchd, on the socket and as the CLI's last line, is decided by
one table at the end of this module (:data:`SOCKET_ERRORS`, :func:`to_socket_error`,
:func:`describe_socket_error`): the daemon's API and the CLI both read it, so a new
error class is routed by adding one row.

Messages say what was wrong with the values involved, so one log line is enough.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


class PatchdError(Exception):
    """Root of every error patchd raises on purpose."""

    #: Exit code of the CLI when this error ends a command.
    exit_code: ClassVar[int] = 1


# --- transient -------------------------------------------------------------------------


class TransientError(PatchdError):
    """A failure that may go away by itself; retry later and keep what we have."""


class NetworkError(TransientError):
    """The repository could not be reached or the connection broke."""


class DownloadStalled(NetworkError):
    """The server sent too little for too long."""


class DownloadTruncated(NetworkError):
    """The response ended before ``size`` bytes arrived; the partial file is kept."""


class BundleHashMismatch(NetworkError):
    """The downloaded bytes do not match the signed manifest's ``size`` and ``sha256``.

    A transport fault, not bad input: a flaky proxy, a lagging mirror or one flipped
    bit must not ban a good patch forever. The download is discarded and retried with
    backoff; only bytes that match the signed sha256 and are still bad are tombstoned.
    """


class DownloadOversize(BundleHashMismatch):
    """The server announced or sent more bytes than the signed manifest's ``size``."""


class ServerError(TransientError):
    """The server answered 5xx or 429."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BundleNotFound(ServerError):
    """404/410 on a bundle: transient, the manifest may be ahead of the mirror."""


class DiskFull(TransientError):
    """No space left for a download or an install; data already written is kept."""


# --- bad input -------------------------------------------------------------------------


class BadInputError(PatchdError):
    """The bytes we were given are wrong; the build is marked bad and never retried."""

    bad_reason: ClassVar[str] = "invalid_bundle"


class BundleInvalid(BadInputError):
    """The bundle breaks the format: members, paths, sizes, modes or its header fields."""

    bad_reason = "invalid_bundle"


class UnsafePath(BundleInvalid):
    """A path in a bundle is not a normalised relative path inside the tree."""


class PayloadHashMismatch(BadInputError):
    """A payload, or a delta's base file, does not hash to the value the signed header
    names: the bundle's bytes are the signed ones, so the bundle itself is bad."""

    bad_reason = "hash_mismatch"


class InstallLoop(BadInputError):
    """The build's install was started too often without completing; it is now bad."""

    bad_reason = "install_loop"


class SignatureInvalid(BadInputError):
    """A bundle header is not signed by enough trusted keys."""

    bad_reason = "signature_invalid"


# --- configuration and trust -----------------------------------------------------------


class ConfigError(PatchdError):
    """Something the operator or publisher must fix; the daemon logs it and keeps serving."""

    exit_code = 2


class ConfigFileError(ConfigError):
    """The config file cannot be used; names the file and the key."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class ConfigErrors(ConfigFileError):
    """All problems found in one config file, one line each."""

    def __init__(self, path: str, problems: list[tuple[str | None, str]]) -> None:
        lines = [f"{path}: {key}: {what}" if key else f"{path}: {what}" for key, what in problems]
        Exception.__init__(self, "\n".join(lines))
        self.path = path
        self.key = problems[0][0] if problems else None
        self.problem = problems[0][1] if problems else ""
        self.problems = problems


class RepositoryError(ConfigError):
    """The repository answered in a way a retry will not fix (404, TLS, bad URL)."""

    exit_code = 1


class ManifestRejected(ConfigError):
    """The manifest was refused; the host keeps what it has."""

    exit_code = 1


class ManifestInvalid(ManifestRejected):
    """The manifest is not a valid patchd-manifest/1 document."""


class ManifestSignatureInvalid(ManifestRejected):
    """The manifest is not signed by enough trusted keys."""


class ManifestExpired(ManifestRejected):
    """The manifest's ``expires`` lies in the past (freeze attack or stale mirror)."""


class ManifestSerialRollback(ManifestRejected):
    """The manifest's serial is lower than one already accepted (rollback attack)."""


class ManifestMismatch(ManifestRejected):
    """The manifest is for another app or channel."""


# --- lifecycle ---------------------------------------------------------------------------


class LifecycleError(PatchdError):
    """A transition was asked for that the current state does not allow."""


class IllegalTransition(LifecycleError):
    """Names the build, its state and the transition that cannot apply to it."""

    def __init__(self, build: object, state: object, event: str, why: str = "") -> None:
        name = getattr(state, "name", None) or "none"
        msg = f"cannot {event} build {build}: it is {name}"
        super().__init__(f"{msg} ({why})" if why else msg)
        self.build = build
        self.state = state
        self.event = event


class NotBootTarget(LifecycleError):
    """The host reported a build other than the one it was told to boot."""

    def __init__(self, expected: Any, got: Any) -> None:
        super().__init__(f"build {got} is not the boot target; expected {expected}")
        self.expected = expected
        self.got = got


class NoBootInProgress(LifecycleError):
    """A boot success/failure was reported but no ``BootStart`` is recorded."""


class RollbackRefused(LifecycleError):
    """A manual rollback was asked for while next_boot is already the release itself."""


class InstallCancelled(Exception):
    """Raised by a ``check_cancelled`` hook to stop an install between two ops."""


# --- socket requests the daemon refuses ---------------------------------------------------


class Refused(PatchdError):
    """The daemon will not carry out this request now; nothing changed."""


class Busy(Refused):
    """Another state-changing job runs; ``activity`` is what the daemon is doing."""

    def __init__(self, activity: Mapping[str, Any], summary: str) -> None:
        super().__init__(f"busy: {summary}")
        self.activity = dict(activity)


class NotAuthorized(Refused):
    """The calling user may not call this method (``boot.reporters``, ``api.admins``)."""

    def __init__(self, method: str) -> None:
        super().__init__(f"not authorised to call {method}")
        self.method = method


# --- the CLI talking to the daemon ---------------------------------------------------------


class ClientError(PatchdError):
    """The CLI could not get an answer from the daemon."""


class DaemonNotRunning(ClientError):
    """No socket file, or nobody listens on it: the daemon is not running."""


class SocketAccessDenied(ClientError):
    """The socket exists but this user may not connect to it."""


class DaemonConnectionBroken(ClientError):
    """The connection broke mid-call or the daemon sent something that is not varlink."""


class CommandFailed(ClientError):
    """The daemon answered with an error; the message is the table's line for it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


# --- local ---------------------------------------------------------------------------------


class SocketInUse(PatchdError):
    """The socket path is taken by another process, or is not a socket."""

    exit_code = 2


class PackError(PatchdError):
    """The trees cannot be packed (special files, unsafe links, files changing under us)."""


class DemoFailed(PatchdError):
    """A step of the demo did not turn out as the narrative says it should."""


class StateLocked(PatchdError):
    """Another patchd process holds the lock on this state directory."""

    exit_code = 2


class UsageError(PatchdError):
    """The command line is wrong."""

    exit_code = 2


# --- how errors leave patchd: the socket and the CLI --------------------------------------

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
            return f"{INTERFACE}.{row.name}", row.parameters(exc)
    raise AssertionError(f"no socket error for {type(exc).__name__}")  # PatchdError row


def describe_socket_error(name: str, parameters: Mapping[str, Any]) -> CommandFailed:
    """The CLI's error for an error reply: the table's line, or the raw name and values."""
    short = name.removeprefix(f"{INTERFACE}.")
    for row in SOCKET_ERRORS:
        if row.name == short:
            return CommandFailed(row.message(parameters), row.exit_code)
    if parameters:
        import json

        return CommandFailed(f"{name}: {json.dumps(dict(parameters), sort_keys=True)}")
    return CommandFailed(name)
