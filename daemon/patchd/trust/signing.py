"""Ed25519 keys and detached signature files (docs/formats.md).

One format signs both documents patchd trusts — ``manifest.json`` and a bundle's
``bundle.json`` — so the rules (distinct trusted key ids, threshold, unknown ids ignored)
live here once. Verification never raises for a single bad entry: an attacker adding a
garbage signature must not be able to veto a document that enough trusted keys signed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from patchd.core.documents import load_document
from patchd.core.errors import ConfigError, KeyRevoked, SignatureInvalid
from patchd.core.text import shown_keyids

log = structlog.get_logger("patchd.trust.signing")

PUBLIC_PREFIX = "ed25519:"
#: A signature file larger than this is refused without parsing (docs/formats.md).
MAX_SIG_FILE_BYTES = 4 * 1024 * 1024
#: A signature file with more entries than this is refused before any is verified.
MAX_SIGNATURES = 16


def parse_public_key(text: str) -> bytes:
    """Raw 32 key bytes of ``ed25519:<base64>``; ValueError naming the problem otherwise."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise ValueError(f"public key must look like 'ed25519:<base64>', got {text!r:.80}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public key is not valid base64: {text!r:.80}") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
    return raw


def format_public_key(raw: bytes) -> str:
    """The ``ed25519:<base64>`` text form of 32 raw public-key bytes."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return PUBLIC_PREFIX + base64.b64encode(raw).decode("ascii")


def key_id(raw: bytes) -> str:
    """First 16 hex digits of SHA-256 over the raw public key (docs/formats.md)."""
    return hashlib.sha256(raw).hexdigest()[:16]


def public_raw(key: Ed25519PrivateKey) -> bytes:
    """Raw 32 bytes of the public half of ``key``."""
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def generate_key(path: Path) -> str:
    """Write a new PKCS#8 PEM private key with mode 0600; return its public key text.

    Refuses to overwrite an existing file: losing a signing key is not undoable.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return format_public_key(public_raw(key))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM Ed25519 private key; ConfigError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
        mode = os.stat(path).st_mode & 0o777
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read private key: {exc.strerror}") from exc
    if mode & 0o077:
        log.warning("signing.key_mode_open", path=str(path), mode=f"{mode:04o}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


class Signer(Protocol):
    """Anything that signs with one Ed25519 key: a loaded private key, or a signing
    command standing for an HSM, a KMS or an offline machine (``--sign-cmd``)."""

    def sign(self, data: bytes) -> bytes: ...

    def public_key(self) -> Ed25519PublicKey: ...


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a document may be signed by, and how many must agree.

    ``revoked`` holds ids of keys an accepted root removed: they never count, and a
    refusal says so, so an operator reading the log knows it is a stolen-key case.
    """

    keys: Mapping[str, bytes]
    threshold: int
    revoked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {self.threshold}")
        if self.threshold > len(self.keys):
            raise ValueError(
                f"threshold {self.threshold} exceeds the {len(self.keys)} distinct trusted keys"
            )

    @classmethod
    def from_raw(cls, raws: Sequence[bytes], threshold: int,
                 revoked: frozenset[str] = frozenset()) -> TrustedKeys:
        """Build from raw keys; a key listed twice is one key (one id)."""
        keys = {key_id(raw): raw for raw in raws}
        return cls(keys, threshold, frozenset(revoked) - set(keys))


def signer_raw(signer: Signer) -> bytes:
    """Raw 32 bytes of a signer's public key."""
    return signer.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def sign_document(data: bytes, signers: Sequence[Signer], existing: bytes | None = None
                  ) -> bytes:
    """The signature file (docs/formats.md) over the exact bytes ``data``, one entry per key.

    ``existing`` is a signature file to add to (a root signed by several offline
    holders in turn): its entries stay, a key that signed again replaces its own.
    Each new signature is verified before it is written, so a signing command that
    answers with garbage fails here, at the publisher, not on every host.
    """
    if not signers:
        raise ValueError("at least one private key is needed to sign")
    entries: dict[str, str] = {
        kid: base64.b64encode(sig).decode("ascii") for kid, sig in _parse_sig_file(existing)
    } if existing else {}
    done: set[str] = set()
    for signer in signers:
        raw = signer_raw(signer)
        kid = key_id(raw)
        if kid in done:
            continue
        sig = signer.sign(data)
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, data)
        except InvalidSignature:
            raise SignatureInvalid(f"the signature made by key {kid} does not verify") from None
        entries[kid] = base64.b64encode(sig).decode("ascii")
        done.add(kid)
    if len(entries) > MAX_SIGNATURES:
        raise ValueError(f"a signature file holds at most {MAX_SIGNATURES} signatures; "
                         f"this one would hold {len(entries)}")
    doc = {"signatures": [{"keyid": k, "sig": s} for k, s in entries.items()]}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _parse_sig_file(sig_file: bytes) -> list[tuple[str, bytes]]:
    doc = load_document(sig_file, limit=MAX_SIG_FILE_BYTES, what="signature file",
                        error=SignatureInvalid)
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(sigs, list):
        raise SignatureInvalid("malformed signature file: no 'signatures' list")
    if len(sigs) > MAX_SIGNATURES:
        # Refused before any verification: each entry naming a trusted key would cost
        # a verification (and, failing, a log line).
        raise SignatureInvalid(
            f"signature file has {len(sigs)} entries, more than the {MAX_SIGNATURES} "
            "a host accepts")
    out: list[tuple[str, bytes]] = []
    for entry in sigs:
        if not isinstance(entry, dict):
            continue
        kid, sig = entry.get("keyid"), entry.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str):
            continue
        with contextlib.suppress(binascii.Error, ValueError):
            out.append((kid, base64.b64decode(sig, validate=True)))
    return out


def verify_document(data: bytes, sig_file: bytes, trust: TrustedKeys) -> list[str]:
    """Key ids of the trusted keys whose signature over ``data`` verifies.

    Raises SignatureInvalid when fewer than ``trust.threshold`` distinct trusted keys
    verify, saying whether no trusted key signed at all or how many fell short.
    """
    entries = _parse_sig_file(sig_file)
    trusted_seen: set[str] = set()
    good: list[str] = []
    for kid, sig in entries:
        raw = trust.keys.get(kid)
        if raw is None or kid in good:
            continue
        trusted_seen.add(kid)
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, data)
        except InvalidSignature:
            log.warning("signing.bad_signature", keyid=kid)
            continue
        good.append(kid)
    if len(good) >= trust.threshold:
        return good
    revoked = sorted({kid for kid, _ in entries} & trust.revoked)
    if revoked:
        raise KeyRevoked(
            f"signed by revoked key(s) {', '.join(revoked)}; {len(good)} signature(s) by "
            f"trusted keys verify, below the threshold of {trust.threshold}"
        )
    if not trusted_seen:
        raise SignatureInvalid(
            f"no signature by a trusted key (key ids present: "
            f"{shown_keyids([kid for kid, _ in entries])}; "
            f"trusted: {', '.join(sorted(trust.keys))})"
        )
    raise SignatureInvalid(
        f"{len(good)} of {len(trusted_seen)} signatures by trusted keys verify, "
        f"below the threshold of {trust.threshold}"
    )
