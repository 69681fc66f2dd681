"""Ed25519 keys, key ids and threshold verification of detached signature files."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from patchd.core.errors import ConfigError, SignatureInvalid
from patchd.trust.signing import (
    TrustedKeys,
    format_public_key,
    generate_key,
    key_id,
    load_private_key,
    parse_public_key,
    public_raw,
    sign_document,
    verify_document,
)
from support.trees import new_key, trust_of

A, B, C = new_key(), new_key(), new_key()


def test_public_key_text_roundtrip() -> None:
    """`ed25519:<base64>` parses to the raw 32 bytes and formats back identically."""
    raw = public_raw(A)
    text = format_public_key(raw)
    assert text.startswith("ed25519:") and parse_public_key(text) == raw


@pytest.mark.parametrize("text", ["rsa:AAAA", "ed25519:!!!", "ed25519:" + "A" * 20,
                                  "ed25519:", base64.b64encode(b"x" * 32).decode()])
def test_bad_public_keys(text: str) -> None:
    """Wrong prefix, bad base64 or a length other than 32 raise ValueError."""
    with pytest.raises(ValueError):
        parse_public_key(text)


def test_key_id_is_sha256_prefix() -> None:
    """A key id is the first 16 hex digits of SHA-256 of the raw public key."""
    raw = public_raw(A)
    assert key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]


def test_generate_key_writes_0600_pem_and_refuses_overwrite(tmp_path: Path) -> None:
    """keygen writes a PKCS#8 PEM with mode 0600 whose public half it returns."""
    path = tmp_path / "k.pem"
    public = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    assert format_public_key(public_raw(load_private_key(path))) == public
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key(path)


def test_load_private_key_rejects_garbage(tmp_path: Path) -> None:
    """A file that is not a PEM private key is a ConfigError naming the file."""
    (tmp_path / "bad").write_text("hello")
    with pytest.raises(ConfigError, match="bad"):
        load_private_key(tmp_path / "bad")


def test_sign_and_verify() -> None:
    """A document signed by a trusted key verifies and reports that key id."""
    sig = sign_document(b"doc", [A])
    assert verify_document(b"doc", sig, trust_of(A)) == [key_id(public_raw(A))]


def test_other_bytes_do_not_verify() -> None:
    """A signature over other bytes fails, saying how many verified against the threshold."""
    sig = sign_document(b"doc", [A])
    with pytest.raises(SignatureInvalid, match=r"0 of 1 .* threshold of 1"):
        verify_document(b"doc!", sig, trust_of(A))


def test_threshold_counts_distinct_key_ids() -> None:
    """The same key's signature listed twice counts once toward the threshold."""
    doc = json.loads(sign_document(b"doc", [A]))
    doc["signatures"] *= 2
    with pytest.raises(SignatureInvalid, match=r"1 of 1 .* threshold of 2"):
        verify_document(b"doc", json.dumps(doc).encode(), trust_of(A, B, threshold=2))
    assert len(verify_document(b"doc", sign_document(b"doc", [A, B]),
                               trust_of(A, B, threshold=2))) == 2


def test_unknown_keyids_ignored_and_garbage_cannot_veto() -> None:
    """Signatures by unknown keys and malformed entries are ignored, not fatal."""
    doc = json.loads(sign_document(b"doc", [C, A]))
    doc["signatures"].insert(0, {"keyid": key_id(public_raw(A)), "sig": "bm90IGEgc2ln"})
    doc["signatures"].append("junk")
    assert verify_document(b"doc", json.dumps(doc).encode(), trust_of(A)) == [
        key_id(public_raw(A))]


def test_untrusted_only() -> None:
    """A document signed only by unknown keys names the key ids present and trusted."""
    with pytest.raises(SignatureInvalid, match="no signature by a trusted key"):
        verify_document(b"doc", sign_document(b"doc", [C]), trust_of(A))


@pytest.mark.parametrize("sig", [b"", b"[]", b'{"signatures": 3}', b"\xff"])
def test_malformed_signature_files(sig: bytes) -> None:
    """Signature files that are not the specified JSON object are refused as malformed."""
    with pytest.raises(SignatureInvalid,
                       match=r"malformed signature file|signature file is not JSON"):
        verify_document(b"doc", sig, trust_of(A))


def test_oversized_signature_file() -> None:
    """A signature file over 4 MiB is refused without parsing."""
    with pytest.raises(SignatureInvalid, match="over"):
        verify_document(b"doc", b" " * (4 * 1024 * 1024 + 1), trust_of(A))


def test_trusted_keys_validation() -> None:
    """A threshold below 1 or above the number of distinct keys is a ValueError."""
    raw = public_raw(A)
    with pytest.raises(ValueError):
        TrustedKeys.from_raw([raw], 0)
    with pytest.raises(ValueError):
        TrustedKeys.from_raw([raw, raw], 2)
