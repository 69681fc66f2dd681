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
    │   │   └── KeyRevoked            signed by a key the accepted root no longer lists
    │   └── InstallLoop             installs started too often without finishing
    ├── ConfigError               logged; the daemon keeps running and serving the socket
    │   ├── ConfigFileError         the config file is unreadable or invalid (names the key)
    │   │   └── ConfigErrors          every problem of one file, a line each
    │   ├── RepositoryError         manifest 404, TLS failure, unsupported URL
    │   │   └── RedirectRefused       a redirect from https:// to http://
    │   ├── TransportConfigError    CA, client certificate or headers file unusable
    │   ├── ManifestRejected        the manifest is refused; nothing changes on the host
    │   │   ├── ManifestInvalid       not JSON, wrong types, too large
    │   │   ├── ManifestSignatureInvalid
    │   │   │   └── ManifestKeyRevoked  signed by a key revoked in the accepted root
    │   │   ├── ManifestExpired       freeze attack
    │   │   ├── ManifestSerialRollback  lower serial, or same serial with other bytes
    │   │   ├── ManifestMismatch      app or channel differ from the config
    │   │   └── ManifestRootRollback  names a root version older than the accepted one
    │   └── RootRejected            a root of trust is refused; the accepted root stays
    │       ├── RootInvalid           not JSON, wrong types, threshold 0, duplicate keys
    │       ├── RootSignatureInvalid  below threshold of the old root's or its own keys
    │       ├── RootVersionInvalid    rollback, or a gap in the chain of versions
    │       └── RootExpired           the newest root's ``expires`` has passed
    ├── LifecycleError            a transition the build's state does not allow
    │   ├── IllegalTransition       names the build, its state and the transition
    │   ├── NotBootTarget           the host reported another build than the boot target
    │   ├── NoBootInProgress        boot success/failure without a boot start
    │   ├── RollbackRefused         next boot is the release itself
    │   └── NotMarkedBad            unmark of a build that has no tombstone
    ├── Refused                   a socket request the daemon will not carry out now
    │   ├── Busy                    another job changes state; names what it is doing
    │   ├── NotAuthorized           the caller's user may not call the method
    │   └── DowngradeRefused        an install the next check would undo (no --hold)
    ├── ClientError               the CLI could not talk to the daemon
    │   ├── DaemonNotRunning        no socket, or nobody listens on it
    │   ├── SocketAccessDenied      the socket's mode or group keeps this user out
    │   ├── DaemonConnectionBroken  the connection broke or carried garbage
    │   └── CommandFailed           the daemon answered with an error (see SOCKET_ERRORS)
    ├── SocketInUse               another process listens on the socket path
    ├── PackError                 the publisher cannot pack these trees
    ├── SignCommandFailed         a ``--sign-cmd`` failed or returned a bad signature
    ├── DemoFailed                a step of ``patchd demo`` did not turn out as told
    ├── LaunchFailed              ``patchd launch`` gave up: no build it started was healthy
    ├── StateLocked               another process owns the state directory
    ├── UsageError                the CLI was called wrongly (exit 2)
    └── UnexpectedError           an exception patchd did not foresee (a bug), logged once

``InstallCancelled`` is no PatchdError: it is the stop request (SIGTERM) reaching an
install between two ops, and is never reported as a failure.

How an error leaves patchd, on the socket and as the CLI's last line, is decided by
one table beside this module (:mod:`patchd.core.error_table`): the daemon's API and the
CLI both read it, so a new error class is routed by adding one row.

Messages say what was wrong with the values involved, so one log line is enough.
"""

from __future__ import annotations

from collections.abc import Mapping
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


class KeyRevoked(SignatureInvalid):
    """Signed (only) by keys a newer root removed: a stolen key must stop counting."""


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


class RedirectRefused(RepositoryError):
    """An https:// request was redirected to http://: the rest would be unauthenticated."""


class TransportConfigError(ConfigError):
    """The CA file, client certificate or headers file cannot be used as configured."""


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


class ManifestKeyRevoked(ManifestSignatureInvalid):
    """The manifest is signed by keys the accepted root revoked (and not enough others)."""


class ManifestRootRollback(ManifestRejected):
    """The manifest names an older root version than the host accepted (freeze/replay)."""


class RootRejected(ConfigError):
    """A root of trust from the repository (or a pinned file) was refused; the host
    keeps the root it accepted before."""

    exit_code = 1


class RootInvalid(RootRejected):
    """The root document breaks the format: types, a threshold of 0, duplicate keys."""


class RootSignatureInvalid(RootRejected):
    """A new root lacks a threshold of the previous root's keys, or of its own."""


class RootVersionInvalid(RootRejected):
    """A root's version is not the next one, or a version in the chain is missing."""


class RootExpired(RootRejected):
    """The newest root's ``expires`` has passed: the host refuses to go on trusting it."""


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


class NotMarkedBad(LifecycleError):
    """``Unmark`` named a build that is not marked bad: there is no tombstone to lift."""

    def __init__(self, build: Any, state: Any) -> None:
        name = getattr(state, "name", None)
        what = f"it is {name}" if name else "this host has no state for it"
        super().__init__(f"{build} is not marked bad ({what}); there is no tombstone to lift")
        self.build = build
        self.state: str | None = name


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


class DowngradeRefused(Refused):
    """An operator's install of a build older than the one this host would move to by
    itself: the next check would undo it, so it needs a hold (``install --hold``)."""

    def __init__(self, build: Any, newer: Any) -> None:
        super().__init__(f"{build} is older than {newer}, which this host would go back "
                         f"to at its next check; install with --hold to keep it on {build}")
        self.build = build
        self.newer = newer


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


class SignCommandFailed(PatchdError):
    """A ``--sign-cmd`` exited non-zero, timed out, or printed no valid signature."""


class DemoFailed(PatchdError):
    """A step of the demo did not turn out as the narrative says it should."""


class LaunchFailed(PatchdError):
    """``patchd launch`` started every build it could fall back to, or ``[health]
    attempts`` in a row, and none passed its boot; or it could not start the app."""


class StateLocked(PatchdError):
    """Another patchd process holds the lock on this state directory."""

    exit_code = 2


class UsageError(PatchdError):
    """The command line is wrong."""

    exit_code = 2


class UnexpectedError(PatchdError):
    """An exception of a class patchd did not foresee, in work that must not stop.

    It is logged once, with its traceback, where it happened (a check, say); what the
    caller sees is this, naming the original class, so the socket answer and
    ``last_error`` say more than "internal error" and nothing logs it twice.
    """

    @classmethod
    def wrapping(cls, exc: BaseException) -> UnexpectedError:
        error = cls(f"internal error ({type(exc).__name__}: {exc}); see the daemon's log")
        error.__cause__ = exc
        return error
