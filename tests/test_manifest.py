"""Manifest parsing, validation and verification (docs/formats.md)."""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from patchd.core.errors import (
    ManifestExpired,
    ManifestInvalid,
    ManifestMismatch,
    ManifestSerialRollback,
    ManifestSignatureInvalid,
)
from patchd.trust.manifest import (
    MAX_DOCUMENT_BYTES,
    manifest_to_json,
    parse_manifest,
    verify_manifest,
)
from patchd.trust.signing import sign_document
from support.trees import new_key, trust_of

KEY, OTHER = new_key(), new_key()
NOW = datetime(2026, 6, 1, tzinfo=UTC)
SHA = "ab" * 32
EXAMPLE: dict[str, Any] = {
    "format": "patchd-manifest/1", "app": "kiosk", "channel": "stable", "serial": 17,
    "expires": "2026-12-22T10:00:00Z",
    "releases": [{"release": "1.4.0", "patches": [
        {"patch": 3, "rollout": 100, "bundles": [
            {"arch": "x86_64", "url": "1.4.0/3-x86_64.patchd", "size": 48213, "sha256": SHA}]},
        {"patch": 1, "bundles": [
            {"arch": "any", "url": "1.4.0/1-any.patchd", "size": 1, "sha256": SHA}]}],
        "rolled_back": [2]}],
    "full": {"release": "1.5.0", "bundles": [
        {"arch": "any", "url": "1.5.0/full-any.patchd", "size": 91234567, "sha256": SHA}]},
}


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def mutated(path: list[Any], value: Any) -> bytes:
    doc = copy.deepcopy(EXAMPLE)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return encode(doc)


def test_parse_spec_example() -> None:
    """The documented example parses; rollout defaults to 100; patches are sorted by number."""
    m = parse_manifest(encode(EXAMPLE))
    assert (m.app, m.channel, m.serial) == ("kiosk", "stable", 17)
    assert m.expires == datetime(2026, 12, 22, 10, tzinfo=UTC)
    entry = m.releases["1.4.0"]
    assert [p.patch for p in entry.patches] == [1, 3]
    assert entry.patch(1) is not None and entry.patch(1).rollout == 100  # type: ignore[union-attr]
    assert entry.rolled_back == frozenset({2})
    assert m.full is not None and m.full.release == "1.5.0"
    assert entry.patches[1].bundle_for("x86_64").url == "1.4.0/3-x86_64.patchd"  # type: ignore[union-attr]
    assert entry.patches[0].bundle_for("aarch64").arch == "any"  # type: ignore[union-attr]


def test_unknown_fields_ignored() -> None:
    """Unknown fields at any level are ignored (forward compatibility)."""
    doc = copy.deepcopy(EXAMPLE)
    doc["future"] = {"x": 1}
    doc["releases"][0]["notes"] = "hi"
    doc["releases"][0]["patches"][0]["bundles"][0]["mirrors"] = []
    assert parse_manifest(encode(doc)) == parse_manifest(encode(EXAMPLE))


def test_manifest_to_json_roundtrips() -> None:
    """manifest_to_json produces a document that parses back to the same Manifest."""
    m = parse_manifest(encode(EXAMPLE))
    assert parse_manifest(encode(manifest_to_json(m))) == m


@pytest.mark.parametrize(("path", "value", "message"), [
    (["format"], "patchd-manifest/2", "format"),
    (["serial"], "17", "serial"),
    (["serial"], -1, "serial"),
    (["serial"], True, "serial"),
    (["app"], KeyError, "app"),
    (["expires"], "tomorrow", "expires"),
    (["expires"], "2026-12-22T10:00:00", "time zone"),
    (["releases", 0, "release"], "../etc", "release"),
    (["releases", 0, "patches", 0, "rollout"], 101, "rollout"),
    (["releases", 0, "patches", 0, "rollout"], -1, "rollout"),
    (["releases", 0, "patches", 0, "patch"], 0, "patch"),
    (["releases", 0, "patches", 0, "bundles", 0, "sha256"], SHA.upper(), "sha256"),
    (["releases", 0, "patches", 0, "bundles", 0, "size"], -5, "size"),
    (["releases", 0, "patches", 0, "bundles", 0, "arch"], "x 86", "arch"),
    (["releases", 0, "rolled_back"], ["2"], "rolled_back"),
    (["releases"], {"1.4.0": {}}, "releases"),
    (["full", "bundles"], None, "full.bundles"),
])
def test_invalid_fields(path: list[Any], value: Any, message: str) -> None:
    """Wrong types, out-of-range values and unsafe names raise ManifestInvalid naming the field."""
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(mutated(path, value))


def test_not_json_and_duplicates() -> None:
    """Non-JSON and duplicate releases or patches are invalid."""
    with pytest.raises(ManifestInvalid, match="not JSON"):
        parse_manifest(b"{")
    doc = copy.deepcopy(EXAMPLE)
    doc["releases"].append(doc["releases"][0])
    with pytest.raises(ManifestInvalid, match="duplicate release"):
        parse_manifest(encode(doc))


def verify(data: bytes, sig: bytes | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {"app": "kiosk", "channel": "stable", "min_serial": None,
                            "same_serial_sha256": None, "now": NOW}
    args.update(kw)
    return verify_manifest(data, sig if sig is not None else sign_document(data, [KEY]),
                           trust_of(KEY), **args)


def test_verify_accepts_good_manifest() -> None:
    """A signed, current manifest for our app and channel is accepted."""
    assert verify(encode(EXAMPLE)).serial == 17


def test_verify_signature() -> None:
    """A manifest signed by another key, or changed after signing, is refused."""
    data = encode(EXAMPLE)
    with pytest.raises(ManifestSignatureInvalid, match="no signature by a trusted key"):
        verify(data, sign_document(data, [OTHER]))
    with pytest.raises(ManifestSignatureInvalid, match="below the threshold"):
        verify(data.replace(b"17", b"18"), sign_document(data, [KEY]))


def test_verify_expired() -> None:
    """An expired manifest is refused (freeze attack)."""
    with pytest.raises(ManifestExpired, match="expired"):
        verify(encode(EXAMPLE), now=datetime(2027, 1, 1, tzinfo=UTC))


def test_verify_serial_rollback() -> None:
    """A lower serial is refused; an equal serial must have the same bytes."""
    data = encode(EXAMPLE)
    with pytest.raises(ManifestSerialRollback, match="lower"):
        verify(data, min_serial=18)
    with pytest.raises(ManifestSerialRollback, match="other bytes"):
        verify(data, min_serial=17, same_serial_sha256="0" * 64)
    same = hashlib.sha256(data).hexdigest()
    assert verify(data, min_serial=17, same_serial_sha256=same).serial == 17
    assert verify(data, min_serial=16).serial == 17


def test_verify_mismatch() -> None:
    """A manifest for another app or channel is refused."""
    with pytest.raises(ManifestMismatch, match="channel 'stable'"):
        verify(encode(EXAMPLE), channel="beta")
    with pytest.raises(ManifestMismatch, match="app 'kiosk'"):
        verify(encode(EXAMPLE), app="other")


def test_verify_oversize() -> None:
    """A manifest or signature over 4 MiB is refused before any parsing."""
    big = b" " * (MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(ManifestInvalid, match="over"):
        verify(big, b"{}")
    with pytest.raises(ManifestInvalid, match="over"):
        verify(encode(EXAMPLE), big)


def test_expires_in_other_zone_is_normalised() -> None:
    """An offset time is converted to UTC."""
    m = parse_manifest(mutated(["expires"], "2026-12-22T12:00:00+02:00"))
    assert m.expires == datetime(2026, 12, 22, 10, tzinfo=UTC)
    assert m.expires - NOW > timedelta(days=1)
