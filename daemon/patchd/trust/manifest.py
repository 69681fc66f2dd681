"""The channel manifest (docs/formats.md): parse, validate and verify; serialise for the publisher.

Parsing is strict about what patchd uses (types, ranges, safe release names) and
silent about anything else, so a newer publisher can add fields without breaking
older daemons. Verification checks, in this order, size, signature, structure,
app/channel, serial and expiry: nothing unsigned is ever interpreted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from patchd.core.documents import load_document
from patchd.core.errors import (
    KeyRevoked,
    ManifestExpired,
    ManifestInvalid,
    ManifestKeyRevoked,
    ManifestMismatch,
    ManifestSerialRollback,
    ManifestSignatureInvalid,
    SignatureInvalid,
)
from patchd.core.model import (
    is_sha256_hex,
    is_valid_arch,
    is_valid_release,
    parse_rfc3339,
    release_key,
)
from patchd.trust.signing import TrustedKeys, verify_document

FORMAT = "patchd-manifest/1"
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class BundleRef:
    """Where one bundle for one architecture lives, and what it must hash to."""

    arch: str
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PatchEntry:
    """One published patch of a release: its rollout percentage and bundles per arch."""

    patch: int
    rollout: int
    bundles: tuple[BundleRef, ...]

    def bundle_for(self, arch: str) -> BundleRef | None:
        """The bundle for this host's ``arch``, preferring an exact match over ``any``."""
        return _bundle_for(self.bundles, arch)


@dataclass(frozen=True)
class ReleaseEntry:
    """A release's patches (sorted by number) and the patch numbers rolled back."""

    release: str
    patches: tuple[PatchEntry, ...]
    rolled_back: frozenset[int] = field(default_factory=frozenset)

    def patch(self, number: int) -> PatchEntry | None:
        return next((p for p in self.patches if p.patch == number), None)


@dataclass(frozen=True)
class FullEntry:
    """A full bundle of a (newer) release, installable without a base tree."""

    release: str
    bundles: tuple[BundleRef, ...]

    def bundle_for(self, arch: str) -> BundleRef | None:
        return _bundle_for(self.bundles, arch)


@dataclass(frozen=True)
class Manifest:
    """One channel's signed index."""

    app: str
    channel: str
    serial: int
    expires: datetime
    releases: dict[str, ReleaseEntry]
    full: FullEntry | None = None
    #: The root version whose ``updates`` keys signed this manifest (docs/formats.md).
    root_version: int = 1


def _bundle_for(bundles: tuple[BundleRef, ...], arch: str) -> BundleRef | None:
    exact = next((b for b in bundles if b.arch == arch), None)
    return exact or next((b for b in bundles if b.arch == "any"), None)


# --- parsing ---------------------------------------------------------------------------


def _bad(where: str, problem: str) -> ManifestInvalid:
    return ManifestInvalid(f"manifest {where}: {problem}")


def _int(obj: dict[str, Any], key: str, where: str, lo: int, hi: int | None = None,
         default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where}.{key}", f"must be an integer, got {value!r:.40}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _bad(f"{where}.{key}", f"must be {rng}, got {value}")
    return value


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}.{key}", f"must be a non-empty string, got {value!r:.40}")
    return value


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, f"must be an object, got {type(value).__name__}")
    return value


def _list(obj: dict[str, Any], key: str, where: str, default: list[Any] | None = None
          ) -> list[Any]:
    value = obj.get(key, default)
    if not isinstance(value, list):
        raise _bad(f"{where}.{key}", f"must be a list, got {type(value).__name__}")
    return value


def _release(obj: dict[str, Any], where: str) -> str:
    value = obj.get("release")
    if not is_valid_release(value):
        raise _bad(f"{where}.release", f"not a valid release name: {value!r:.40}")
    assert isinstance(value, str)
    return value


def _bundles(obj: dict[str, Any], where: str) -> tuple[BundleRef, ...]:
    out: list[BundleRef] = []
    for i, item in enumerate(_list(obj, "bundles", where)):
        w = f"{where}.bundles[{i}]"
        b = _obj(item, w)
        arch = _str(b, "arch", w)
        if not is_valid_arch(arch):
            raise _bad(f"{w}.arch", f"not a valid machine name: {arch!r:.40}")
        if any(o.arch == arch for o in out):
            raise _bad(f"{w}.arch", f"duplicate bundle for arch {arch!r}")
        sha = b.get("sha256")
        if not is_sha256_hex(sha):
            raise _bad(f"{w}.sha256", "must be 64 lowercase hex digits")
        out.append(BundleRef(arch, _str(b, "url", w), _int(b, "size", w, 0), str(sha)))
    return tuple(out)


def _parse_release(item: object, where: str) -> ReleaseEntry:
    r = _obj(item, where)
    release = _release(r, where)
    patches: dict[int, PatchEntry] = {}
    for j, p_item in enumerate(_list(r, "patches", where, [])):
        w = f"{where}.patches[{j}]"
        p = _obj(p_item, w)
        number = _int(p, "patch", w, 1)
        if number in patches:
            raise _bad(f"{w}.patch", f"duplicate patch {number}")
        patches[number] = PatchEntry(
            number, _int(p, "rollout", w, 0, 100, default=100), _bundles(p, w)
        )
    rolled: set[int] = set()
    for k, n in enumerate(_list(r, "rolled_back", where, [])):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(f"{where}.rolled_back[{k}]", f"must be a patch number, got {n!r:.40}")
        rolled.add(n)
    ordered = tuple(patches[n] for n in sorted(patches))
    return ReleaseEntry(release, ordered, frozenset(rolled))


def _parse_expires(value: object) -> datetime:
    when = parse_rfc3339(value)
    if when is None:
        raise _bad("expires", f"must be an RFC 3339 time with a time zone (e.g. "
                              f"'2026-01-31T00:00:00Z'), got {value!r:.40}")
    return when


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate a manifest document; ManifestInvalid says what is wrong where."""
    doc = load_document(data, limit=MAX_DOCUMENT_BYTES, what="manifest",
                        error=ManifestInvalid)
    top = _obj(doc, "document")
    if top.get("format") != FORMAT:
        raise _bad("format", f"expected {FORMAT!r}, got {top.get('format')!r:.40}")
    releases: dict[str, ReleaseEntry] = {}
    for i, item in enumerate(_list(top, "releases", "document", [])):
        entry = _parse_release(item, f"releases[{i}]")
        if entry.release in releases:
            raise _bad(f"releases[{i}].release", f"duplicate release {entry.release!r}")
        releases[entry.release] = entry
    full = None
    if top.get("full") is not None:
        f = _obj(top["full"], "full")
        full = FullEntry(_release(f, "full"), _bundles(f, "full"))
    return Manifest(
        app=_str(top, "app", "document"),
        channel=_str(top, "channel", "document"),
        serial=_int(top, "serial", "document", 0),
        expires=_parse_expires(top.get("expires")),
        releases=releases,
        full=full,
        root_version=_int(top, "root_version", "document", 1, default=1),
    )


def peek_root_version(data: bytes) -> int:
    """The root version an (unverified) manifest claims to be signed under; 1 if absent.

    Read before the signature is checked, only to know whether the root must be
    fetched first. A lie costs the liar nothing but a refused check: the chain of
    roots verifies on its own, and the manifest must then verify under the root it
    named (the same bytes, so the claim is signed once the signature verifies).
    """
    try:
        doc = load_document(data, limit=MAX_DOCUMENT_BYTES, what="manifest",
                            error=ManifestInvalid)
    except ManifestInvalid:
        return 1
    value = doc.get("root_version", 1) if isinstance(doc, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 1
    return value


def verify_manifest(
    data: bytes,
    sig: bytes,
    trust: TrustedKeys,
    *,
    app: str,
    channel: str,
    min_serial: int | None,
    same_serial_sha256: str | None,
    now: datetime,
) -> Manifest:
    """Accept a fetched manifest only if it is signed, current, ours and not older.

    ``min_serial`` is the highest serial accepted before; ``same_serial_sha256`` the
    SHA-256 of those accepted bytes, so an equal serial with other bytes is refused.
    """
    if len(data) > MAX_DOCUMENT_BYTES or len(sig) > MAX_DOCUMENT_BYTES:
        raise ManifestInvalid(f"manifest or its signature is over {MAX_DOCUMENT_BYTES} bytes")
    try:
        verify_document(data, sig, trust)
    except KeyRevoked as exc:
        raise ManifestKeyRevoked(f"manifest signature: {exc}") from exc
    except SignatureInvalid as exc:
        raise ManifestSignatureInvalid(f"manifest signature: {exc}") from exc
    manifest = parse_manifest(data)
    if manifest.app != app or manifest.channel != channel:
        raise ManifestMismatch(
            f"manifest is for app {manifest.app!r} channel {manifest.channel!r}, "
            f"configured app {app!r} channel {channel!r}"
        )
    if min_serial is not None:
        if manifest.serial < min_serial:
            raise ManifestSerialRollback(
                f"manifest serial {manifest.serial} is lower than the accepted {min_serial}"
            )
        if (manifest.serial == min_serial and same_serial_sha256 is not None
                and hashlib.sha256(data).hexdigest() != same_serial_sha256):
            raise ManifestSerialRollback(
                f"manifest serial {manifest.serial} was already accepted with other bytes"
            )
    if manifest.expires <= now:
        raise ManifestExpired(
            f"manifest expired at {manifest.expires.isoformat()} (now {now.isoformat()})"
        )
    return manifest


# --- serialising (publisher) -----------------------------------------------------------


def _bundles_json(bundles: tuple[BundleRef, ...]) -> list[dict[str, Any]]:
    return [{"arch": b.arch, "url": b.url, "size": b.size, "sha256": b.sha256}
            for b in sorted(bundles, key=lambda b: b.arch)]


def manifest_to_json(m: Manifest) -> dict[str, Any]:
    """The document of docs/formats.md for ``m``; releases and patches in ascending order."""
    releases = []
    for name in sorted(m.releases, key=release_key):
        r = m.releases[name]
        releases.append({
            "release": r.release,
            "patches": [{"patch": p.patch, "rollout": p.rollout,
                         "bundles": _bundles_json(p.bundles)} for p in r.patches],
            "rolled_back": sorted(r.rolled_back),
        })
    doc: dict[str, Any] = {
        "format": FORMAT,
        "app": m.app,
        "channel": m.channel,
        "serial": m.serial,
        "expires": m.expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "releases": releases,
    }
    if m.full is not None:
        doc["full"] = {"release": m.full.release, "bundles": _bundles_json(m.full.bundles)}
    if m.root_version != 1:
        doc["root_version"] = m.root_version
    return doc
