"""Builders for the attack campaign: hostile manifests, bundles and repository writes.

Everything here produces bytes an attacker (or a broken mirror) could serve; none of
it goes through patchd's own publisher, so each document says exactly what the test
wants, however wrong. Bundles are crafted from raw tar members (``support.trees``),
manifests are plain dicts signed with :func:`patchd.trust.signing.sign_document` (or not).

:class:`RepoWriter` writes into a directory nginx serves and gives every file a fresh,
strictly increasing mtime: nginx's ETag is ``mtime-seconds "-" size`` and the daemon
sends ``If-None-Match``, so two manifests of equal size written in the same second
would otherwise be answered ``304`` and the second attack never reach the daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tarfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patchd.trust.signing import key_id, public_raw, sign_document
from support.trees import craft_bundle, file_op, header_doc, signed_members, tar_member

__all__ = [
    "RepoWriter",
    "bundle_bytes",
    "bundle_ref",
    "craft_bundle",
    "dup_sig_file",
    "file_op",
    "foreign_arch",
    "header_doc",
    "manifest_doc",
    "rfc3339",
    "sign",
    "signed_members",
    "tar_member",
]


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def foreign_arch() -> str:
    """A machine name that is not this host's (for the arch mix-and-match case)."""
    return "s390x" if platform.machine() != "s390x" else "aarch64"


def bundle_ref(url: str, data: bytes, arch: str = "any", *, size: int | None = None,
               sha256: str | None = None) -> dict[str, Any]:
    """A manifest bundle entry for ``data`` served at ``url`` (size/hash overridable)."""
    return {"arch": arch, "url": url,
            "size": len(data) if size is None else size,
            "sha256": sha256 or hashlib.sha256(data).hexdigest()}


def manifest_doc(*, serial: int, release: str, patches: Sequence[tuple[int, list[dict[str, Any]]]],
                 app: str = "kiosk", channel: str = "stable",
                 expires: datetime | None = None, full: dict[str, Any] | None = None,
                 rolled_back: Sequence[int] = ()) -> dict[str, Any]:
    """A docs/formats.md manifest document; ``patches`` is ``[(number, [bundle refs])]``."""
    doc: dict[str, Any] = {
        "format": "patchd-manifest/1", "app": app, "channel": channel, "serial": serial,
        "expires": rfc3339(expires or datetime.now(UTC) + timedelta(days=7)),
        "releases": [{"release": release,
                      "patches": [{"patch": n, "rollout": 100, "bundles": refs}
                                  for n, refs in patches],
                      "rolled_back": list(rolled_back)}],
    }
    if full is not None:
        doc["full"] = full
    return doc


def sign(doc: dict[str, Any], keys: Sequence[Ed25519PrivateKey], pad: int = 0
         ) -> tuple[bytes, bytes]:
    """(manifest bytes, signature file) — ``pad`` trailing spaces make it that much larger."""
    data = (json.dumps(doc, indent=2) + "\n" + " " * pad).encode()
    return data, sign_document(data, keys)


def dup_sig_file(data: bytes, key: Ed25519PrivateKey, copies: int = 2) -> bytes:
    """A signature file listing the SAME key's valid signature ``copies`` times."""
    entry = sign_document(data, [key])
    sig = json.loads(entry)["signatures"][0]
    assert sig["keyid"] == key_id(public_raw(key))
    return json.dumps({"signatures": [sig] * copies}).encode()


def bundle_bytes(tmp: Path, members: list[tuple[tarfile.TarInfo, bytes]],
                 compression: str = "zstd") -> bytes:
    """The bytes of a crafted bundle (written through ``tmp``, then removed)."""
    path = craft_bundle(tmp, members, compression)
    try:
        return path.read_bytes()
    finally:
        path.unlink()


class RepoWriter:
    """Writes repository files atomically with unique, increasing mtimes (see module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Start in the past so "now" never collides with a time we hand out later.
        self._mtime = int(datetime.now(UTC).timestamp()) - 1_000_000

    def __repr__(self) -> str:
        return f"RepoWriter({str(self.root)!r}, mtime={self._mtime})"

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(data)
        self._mtime += 1
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, path)
        return path

    def manifest(self, data: bytes, sig: bytes, name: str = "manifest.json") -> None:
        """Signature first, then the manifest (the publisher's order)."""
        self.write(name + ".sig", sig)
        self.write(name, data)
