"""The vocabulary of patchd: builds, release ordering and the four lifecycle states.

Everything here is pure data with exact JSON forms (docs/lifecycle.md), so the lifecycle,
the socket and the tests share one definition of what a state file may contain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

_RELEASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_ARCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def is_valid_release(text: object) -> bool:
    """A release is used as a directory name, so it must be a short, safe token."""
    return isinstance(text, str) and bool(_RELEASE_RE.match(text)) and text not in (".", "..")


def version_line(data: bytes) -> str:
    """The release a ``VERSION`` file's bytes name: its first line, stripped ("" when
    there is none). The host (``state.recovery.read_release``) and the publisher
    (``publisher.checks.tree_version``) both read it so: a tree the publisher accepts
    names the release a host will read from it."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def is_valid_arch(text: object) -> bool:
    """An architecture names a bundle in the manifest and in its header: a short token."""
    return isinstance(text, str) and bool(_ARCH_RE.match(text))


def is_valid_name(text: object) -> bool:
    """An app or channel name (``[app] name``, ``[server] channel``): a short lowercase token.

    The config, the publisher and the socket path (``/run/patchd/APP.sock``) share it.
    """
    return isinstance(text, str) and bool(_NAME_RE.match(text))


def is_sha256_hex(text: object) -> bool:
    return isinstance(text, str) and bool(_HEX64_RE.match(text))


def release_key(release: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing dotted numeric parts as numbers, other parts as strings.

    Numbers sort before strings in the same position so ``1.4.0`` < ``1.4.rc1`` never
    raises a TypeError; a longer release with equal prefix is newer (``1.4`` < ``1.4.1``).
    """
    parts: list[tuple[int, int | str]] = []
    for part in release.split("."):
        parts.append((0, int(part)) if part.isdigit() else (1, part))
    return tuple(parts)


def release_newer(a: str, b: str) -> bool:
    """True when release ``a`` is strictly newer than ``b``."""
    return release_key(a) > release_key(b)


@dataclass(frozen=True, slots=True)
class Build:
    """What can boot: a release and a patch number (0 is the release itself)."""

    release: str
    patch: int

    def __post_init__(self) -> None:
        if not is_valid_release(self.release):
            raise ValueError(f"invalid release name {self.release!r}")
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 0:
            raise ValueError(f"invalid patch number {self.patch!r}")

    def __str__(self) -> str:
        return f"{self.release}+{self.patch}"

    def to_json(self) -> dict[str, Any]:
        return {"release": self.release, "patch": self.patch}

    @classmethod
    def from_json(cls, obj: object) -> Build:
        """Parse ``{"release", "patch"}``; raises ValueError naming what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"a build must be an object, got {type(obj).__name__}")
        return cls(obj.get("release"), obj.get("patch"))  # type: ignore[arg-type]

    @classmethod
    def from_json_opt(cls, obj: object) -> Build | None:
        return None if obj is None else cls.from_json(obj)

    def sort_key(self) -> tuple[tuple[tuple[int, int | str], ...], int]:
        return (release_key(self.release), self.patch)


class BadReason(StrEnum):
    """Why a build was tombstoned; the values (docs/lifecycle.md) appear in logs and events."""

    INVALID_BUNDLE = "invalid_bundle"
    HASH_MISMATCH = "hash_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    BOOT_CRASH = "boot_crash"
    BOOT_FAILURE = "boot_failure"
    BOOT_TIMEOUT = "boot_timeout"
    VALIDATION_FAILED = "validation_failed"
    INSTALL_LOOP = "install_loop"
    MANUAL = "manual"


#: The longest reason an operator may give a hold (characters, one printable line).
MAX_HOLD_REASON = 200


def parse_rfc3339(value: object) -> datetime | None:
    """An RFC 3339 time with a zone (``2026-01-31T00:00:00Z``) in UTC; None otherwise.

    Documents from outside name their expiry this way; a time without a zone is
    refused (None), never guessed to be local or UTC.
    """
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.astimezone(UTC) if when.tzinfo is not None else None


def utc_now_text() -> str:
    """RFC 3339 UTC timestamp with second precision, as used in every state file."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Downloading:
    """Bytes are arriving in the cache; the partial file's size on disk is the truth."""

    url: str
    sha256: str
    size: int
    attempts: int = 0
    name: str = field(default="downloading", init=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.name, "url": self.url, "sha256": self.sha256,
                "size": self.size, "attempts": self.attempts}


@dataclass(frozen=True, slots=True)
class Downloaded:
    """The complete, hash-verified bundle is in the cache and may be installed."""

    url: str
    sha256: str
    size: int
    attempts: int = 0
    name: str = field(default="downloaded", init=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.name, "url": self.url, "sha256": self.sha256,
                "size": self.size, "attempts": self.attempts}


@dataclass(frozen=True, slots=True)
class Installed:
    """The tree exists under builds/R/N/tree; ``files`` maps each written path to its SHA-256."""

    size: int
    files: dict[str, str]
    name: str = field(default="installed", init=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.name, "size": self.size, "files": dict(self.files)}


@dataclass(frozen=True, slots=True)
class Bad:
    """A tombstone: this build is never downloaded, installed or booted again.

    ``sha256``: set when a downloaded bundle whose bytes matched the signed sha256 was
    bad; the tombstone then bans those bytes only, and a manifest naming another sha256
    for the build gives it a fresh try. None (boots, rollbacks, loops): the whole build.
    """

    reason: BadReason
    detail: str
    at: str
    sha256: str | None = None
    name: str = field(default="bad", init=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc = {"state": self.name, "reason": self.reason.value, "detail": self.detail,
               "at": self.at}
        if self.sha256 is not None:
            doc["sha256"] = self.sha256
        return doc

    def bans(self, sha256: str) -> bool:
        """True when this tombstone refuses a bundle with ``sha256`` for its build."""
        return self.sha256 is None or self.sha256 == sha256


State = Downloading | Downloaded | Installed | Bad


def state_from_json(obj: object) -> State:
    """Parse a ``state.json`` document; raises ValueError on anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError("state must be an object")
    kind = obj.get("state")
    try:
        if kind in ("downloading", "downloaded"):
            url, sha, size = obj["url"], obj["sha256"], obj["size"]
            attempts = obj.get("attempts", 0)
            if not isinstance(url, str) or not is_sha256_hex(sha):
                raise ValueError("bad url or sha256")
            if not _is_count(size) or not _is_count(attempts):
                raise ValueError("bad size or attempts")
            cls = Downloading if kind == "downloading" else Downloaded
            return cls(url=url, sha256=sha, size=size, attempts=attempts)
        if kind == "installed":
            size, files = obj["size"], obj["files"]
            if not _is_count(size) or not isinstance(files, dict):
                raise ValueError("bad size or files")
            if not all(isinstance(k, str) and is_sha256_hex(v) for k, v in files.items()):
                raise ValueError("bad files map")
            return Installed(size=size, files=dict(files))
        if kind == "bad":
            detail, at, sha = obj.get("detail", ""), obj.get("at", ""), obj.get("sha256")
            if not isinstance(detail, str) or not isinstance(at, str):
                raise ValueError("bad detail or at")
            if sha is not None and not is_sha256_hex(sha):
                raise ValueError("bad sha256")
            return Bad(reason=BadReason(obj["reason"]), detail=detail, at=at, sha256=sha)
    except KeyError as exc:
        raise ValueError(f"missing field {exc.args[0]!r}") from None
    raise ValueError(f"unknown state {kind!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
