"""The root of trust (docs/formats.md#the-root-of-trust): which keys sign what, and how
that changes without touching a host.

A root document names two roles: ``root`` (the keys that sign the next root) and
``updates`` (the keys that sign manifests and bundle headers), each with a threshold,
plus a version and an expiry. Version N+1 is accepted only when a threshold of version
N's root keys AND a threshold of its own root keys signed its exact bytes (TUF's rule,
python-tuf ``TrustedMetadataSet.update_root``): the old keys vouch for the new ones,
and the new keys prove they are held, so neither a thief of old keys nor one of new
keys alone can move a host. A host walks the versions one by one from the one it
trusts; an intermediate root may have expired (a host offline for months catches up),
the newest may not.

Hosts configured with ``[trust] keys`` have an implicit version 1 whose root and
updates roles are both those keys; until a repository publishes ``root/2.json``
nothing changes for them. Pure functions over bytes: the fetching is the caller's,
the keeping is :mod:`patchd.trust.root_store`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from patchd.core.documents import load_document
from patchd.core.errors import (
    RootExpired,
    RootInvalid,
    RootSignatureInvalid,
    RootVersionInvalid,
    SignatureInvalid,
)
from patchd.core.model import parse_rfc3339
from patchd.trust.signing import (
    TrustedKeys,
    format_public_key,
    key_id,
    parse_public_key,
    verify_document,
)

FORMAT = "patchd-root/1"
#: A root document (and its signature file) larger than this is refused: a root lists
#: a handful of keys, so 1 MiB is generous and bounds what a hostile mirror can feed us.
MAX_ROOT_BYTES = 1024 * 1024
#: At most this many versions are walked in one check; more is refused, not looped on.
MAX_ROOT_STEPS = 1024
ROLES = ("root", "updates")


@dataclass(frozen=True)
class Role:
    """Keys (raw, distinct, in document order) and how many of them must sign."""

    keys: tuple[bytes, ...]
    threshold: int

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(key_id(k) for k in self.keys)

    def trusted(self, revoked: frozenset[str] = frozenset()) -> TrustedKeys:
        return TrustedKeys.from_raw(self.keys, self.threshold, revoked)


@dataclass(frozen=True)
class Root:
    """One version of the root of trust; ``expires`` is None only for the implicit
    version 1 built from the config's keys (it expires with the config)."""

    version: int
    expires: datetime | None
    root: Role
    updates: Role

    def check_current(self, now: datetime) -> None:
        """RootExpired when this root's expiry has passed."""
        if self.expires is not None and self.expires <= now:
            raise RootExpired(
                f"root version {self.version} expired at {_time_text(self.expires)} "
                f"(now {_time_text(now)}); the publisher must sign a new root"
            )


def implicit_root(raw_keys: tuple[bytes, ...], threshold: int) -> Root:
    """Version 1 of a host configured with ``[trust] keys`` and ``threshold``."""
    distinct = tuple(dict.fromkeys(raw_keys))
    role = Role(distinct, threshold)
    return Root(1, None, role, role)


def revoked_by(old: Root, new: Root) -> frozenset[str]:
    """Ids of the updates keys ``old`` trusted and ``new`` no longer lists."""
    return old.updates.key_ids - new.updates.key_ids


# --- parsing ------------------------------------------------------------------------


def _bad(where: str, problem: str) -> RootInvalid:
    return RootInvalid(f"root {where}: {problem}")


def _role(doc: dict[str, Any], name: str) -> Role:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise _bad(name, f"must be an object with keys and threshold, got {value!r:.40}")
    keys = value.get("keys")
    if not isinstance(keys, list) or not keys:
        raise _bad(f"{name}.keys", "must be a non-empty list of public keys")
    raws: list[bytes] = []
    for i, text in enumerate(keys):
        try:
            raw = parse_public_key(text)
        except ValueError as exc:
            raise _bad(f"{name}.keys[{i}]", str(exc)) from None
        if raw in raws:
            raise _bad(f"{name}.keys[{i}]", f"duplicate key {key_id(raw)}")
        raws.append(raw)
    threshold = value.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise _bad(f"{name}.threshold", f"must be an integer, got {threshold!r:.40}")
    if not 1 <= threshold <= len(raws):
        raise _bad(f"{name}.threshold",
                   f"must be 1..{len(raws)} (the number of keys), got {threshold}")
    return Role(tuple(raws), threshold)


def parse_root(data: bytes) -> Root:
    """Parse and validate a root document; RootInvalid says what is wrong where."""
    doc = load_document(data, limit=MAX_ROOT_BYTES, what="root document", error=RootInvalid)
    if not isinstance(doc, dict):
        raise _bad("document", f"must be an object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise _bad("format", f"expected {FORMAT!r}, got {doc.get('format')!r:.40}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _bad("version", f"must be an integer >= 1, got {version!r:.40}")
    expires = doc.get("expires")
    when = parse_rfc3339(expires)
    if when is None:
        raise _bad("expires", f"must be an RFC 3339 time with a zone, got {expires!r:.40}")
    return Root(version, when, _role(doc, "root"), _role(doc, "updates"))


def root_to_json(root: Root) -> dict[str, Any]:
    """The document of docs/formats.md for ``root`` (the publisher writes it)."""
    assert root.expires is not None, "the implicit root is never published"
    return {
        "format": FORMAT,
        "version": root.version,
        "expires": _time_text(root.expires),
        **{name: {"keys": [format_public_key(k) for k in role.keys],
                  "threshold": role.threshold}
           for name, role in (("root", root.root), ("updates", root.updates))},
    }


def root_bytes(root: Root) -> bytes:
    """The exact bytes ``patchd root create`` writes (indented, final newline)."""
    return (json.dumps(root_to_json(root), indent=2) + "\n").encode()


def root_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the chain rule -----------------------------------------------------------------


def verify_self_signed(data: bytes, sig: bytes) -> Root:
    """A pinned root (``trust.root_file``): parsed, and signed by its own root keys."""
    root = parse_root(data)
    _verify(data, sig, root.root.trusted(), f"root version {root.version}", "its own root keys")
    return root


def verify_next(trusted: Root, data: bytes, sig: bytes) -> Root:
    """Root version ``trusted.version + 1`` from its bytes and signature file.

    In order: sizes; a threshold of the trusted root's root keys (nothing unsigned is
    interpreted); the document; its version is exactly the next; a threshold of its
    own root keys. Expiry is not checked here: only the newest root of a walk must be
    current (:meth:`Root.check_current`).
    """
    want = trusted.version + 1
    if len(data) > MAX_ROOT_BYTES or len(sig) > MAX_ROOT_BYTES:
        raise RootInvalid(f"root version {want} or its signature is over {MAX_ROOT_BYTES} bytes")
    _verify(data, sig, trusted.root.trusted(), f"root version {want}",
            f"version {trusted.version}'s root keys")
    new = parse_root(data)
    if new.version != want:
        what = "a rollback" if new.version <= trusted.version else "a gap in the chain"
        raise RootVersionInvalid(
            f"the file for root version {want} holds version {new.version} ({what}); "
            f"the host keeps version {trusted.version}"
        )
    _verify(data, sig, new.root.trusted(), f"root version {want}", "its own root keys")
    return new


def _verify(data: bytes, sig: bytes, trust: TrustedKeys, what: str, whose: str) -> None:
    try:
        verify_document(data, sig, trust)
    except SignatureInvalid as exc:
        raise RootSignatureInvalid(f"{what} is not signed by a threshold of {whose}: {exc}"
                                   ) from exc


def _time_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
