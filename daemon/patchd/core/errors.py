"""Every error patchd raises on purpose, arranged by what the daemon does about it.

The class of an error decides the policy, so the policy lives here and nowhere else::

    PatchdError
    ├── TransientError            retry with backoff, keep partial data
    │   ├── NetworkError            connection refused/reset, DNS, protocol garbage
    │   │   └── DownloadStalled     fewer bytes than the stall threshold for too long
    │   ├── ServerError             5xx or 429 (carries Retry-After when given)
    │   └── DiskFull                ENOSPC/EDQUOT, or not enough free space to start
    ├── BadInputError             mark the build bad (``bad_reason``), never retry it
    │   ├── BundleInvalid           structure, path, member, size, mix-and-match
    │   ├── BundleHashMismatch      a download or payload hashes to the wrong value
    │   └── SignatureInvalid        bundle header signature missing/untrusted/below threshold
    ├── ConfigError               logged; the daemon keeps running and serving the socket
    │   ├── ConfigFileError         the config file is unreadable or invalid (names the key)
    │   ├── RepositoryError         manifest 404, TLS failure, unsupported URL
    │   └── ManifestRejected        the manifest is refused; nothing changes on the host
    │       ├── ManifestInvalid       not JSON, wrong types, too large
    │       ├── ManifestSignatureInvalid
    │       ├── ManifestExpired       freeze attack
    │       ├── ManifestSerialRollback  lower serial, or same serial with other bytes
    │       └── ManifestMismatch      app or channel differ from the config
    ├── StateLocked               another process owns the state directory
    └── UsageError                the CLI was called wrongly (exit 2)

Messages say what was wrong with the values involved, so one log line is enough.
"""

from __future__ import annotations

from typing import ClassVar


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


class ServerError(TransientError):
    """The server answered 5xx or 429."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


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


class BundleHashMismatch(BadInputError):
    """A download or a payload does not hash to the signed value."""

    bad_reason = "hash_mismatch"


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


# --- local -----------------------------------------------------------------------------


class StateLocked(PatchdError):
    """Another patchd process holds the lock on this state directory."""

    exit_code = 2


class UsageError(PatchdError):
    """The command line is wrong."""

    exit_code = 2
