"""The bundle header (``bundle.json``): its ops, and the pure checks that make it safe.

Nothing here reads a file: :func:`parse_header` turns verified bytes into a
:class:`BundleHeader` and refuses anything the installer must never see (unsafe paths,
links leading out of the tree, ops passing through a link, sizes that do not add up).
The reader (``bundle_reader.py``) calls it only after the signature checked out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from patchd.core.documents import load_document
from patchd.core.errors import BundleInvalid, UnsafePath
from patchd.core.fsio import MAX_PATH_BYTES, check_rel_path, check_text
from patchd.core.model import is_sha256_hex, is_valid_arch, is_valid_release

FORMAT = "patchd-bundle/1"
#: Largest ``bundle.json`` a host reads (the reader stops at it; the parser refuses it).
MAX_HEADER_BYTES = 16 * 1024 * 1024


# --- model -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileOp:
    """Create or replace a regular file with the payload's bytes."""

    path: str
    size: int
    sha256: str
    mode: int
    payload: str


@dataclass(frozen=True, slots=True)
class DeltaOp:
    """Replace the base file at ``path`` by decoding a zstd frame against it."""

    path: str
    size: int
    sha256: str
    base_sha256: str
    mode: int
    payload: str


@dataclass(frozen=True, slots=True)
class DirOp:
    """Ensure a directory with this mode."""

    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class SymlinkOp:
    """Create or replace a relative symlink that resolves inside the tree."""

    path: str
    target: str


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Remove a file, link or whole directory; absent is fine."""

    path: str


Op = FileOp | DeltaOp | DirOp | SymlinkOp | DeleteOp
PayloadOp = FileOp | DeltaOp


@dataclass(frozen=True)
class Expected:
    """What the caller is installing; a bundle for anything else is refused."""

    app: str
    kind: str
    release: str
    patch: int
    arch: str


@dataclass(frozen=True)
class BundleHeader:
    """The signed ``bundle.json``."""

    app: str
    kind: str
    release: str
    patch: int
    arch: str
    unpacked_size: int
    ops: tuple[Op, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "app": self.app, "kind": self.kind, "release": self.release,
            "patch": self.patch, "arch": self.arch, "unpacked_size": self.unpacked_size,
            "ops": [op_to_json(op) for op in self.ops],
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes: compact, key order fixed, so packing is deterministic."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()


def op_to_json(op: Op) -> dict[str, Any]:
    if isinstance(op, FileOp):
        return {"op": "file", "path": op.path, "size": op.size, "sha256": op.sha256,
                "mode": op.mode, "payload": op.payload}
    if isinstance(op, DeltaOp):
        return {"op": "delta", "path": op.path, "size": op.size, "sha256": op.sha256,
                "base_sha256": op.base_sha256, "mode": op.mode, "payload": op.payload}
    if isinstance(op, DirOp):
        return {"op": "dir", "path": op.path, "mode": op.mode}
    if isinstance(op, SymlinkOp):
        return {"op": "symlink", "path": op.path, "target": op.target}
    return {"op": "delete", "path": op.path}


# --- header validation (pure) ----------------------------------------------------------


def check_link_target(path: str, target: object) -> None:
    """Refuse a symlink target that is absolute, unnormalised or leaves the tree.

    ``..`` parts may only lead the target: then each link resolves lexically inside the
    tree through real directories, and by induction so does any chain of such links.
    """
    if not isinstance(target, str) or not target:
        raise UnsafePath(f"symlink {path!r}: target must be a non-empty string")
    check_text(f"symlink {path!r}: target", target)
    if target.startswith("/"):
        raise UnsafePath(f"symlink {path!r}: absolute target {target!r}")
    if "\x00" in target or "\\" in target or len(target.encode()) > MAX_PATH_BYTES:
        raise UnsafePath(f"symlink {path!r}: target has NUL, backslash or is too long")
    ups, named = 0, False
    for part in target.split("/"):
        if part in ("", "."):
            raise UnsafePath(f"symlink {path!r}: target {target!r} is not normalised")
        if part == "..":
            if named:
                raise UnsafePath(f"symlink {path!r}: '..' after a name in {target!r}")
            ups += 1
        else:
            named = True
    if ups > path.count("/"):
        raise UnsafePath(f"symlink {path!r}: target {target!r} resolves outside the tree")


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value: Any = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleInvalid(f"{where}: {key!r} must be {kind.__name__}, got {value!r:.60}")
    if isinstance(value, int) and value < 0:
        raise BundleInvalid(f"{where}: {key!r} must not be negative, got {value}")
    return value


def _mode(obj: dict[str, Any], where: str) -> int:
    mode: int = _field(obj, "mode", int, where)
    if mode & ~0o777:
        raise BundleInvalid(
            f"{where}: mode {mode:#o} has setuid/setgid/sticky or non-permission bits"
        )
    return mode


def _sha(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not is_sha256_hex(value):
        raise BundleInvalid(f"{where}: {key!r} must be 64 lowercase hex digits")
    return str(value)


def _parse_op(obj: object, index: int, payloads: int) -> Op:
    where = f"op {index}"
    if not isinstance(obj, dict):
        raise BundleInvalid(f"{where}: must be an object")
    path = obj.get("path")
    check_rel_path(path)
    assert isinstance(path, str)
    where = f"op {index} ({path!r})"
    kind = obj.get("op")
    if kind in ("file", "delta"):
        payload = obj.get("payload")
        if payload != f"payload/{payloads}":
            raise BundleInvalid(f"{where}: payload must be 'payload/{payloads}', got {payload!r}")
        size = _field(obj, "size", int, where)
        sha, mode = _sha(obj, "sha256", where), _mode(obj, where)
        if kind == "file":
            return FileOp(path, size, sha, mode, payload)
        return DeltaOp(path, size, sha, _sha(obj, "base_sha256", where), mode, payload)
    if kind == "dir":
        return DirOp(path, _mode(obj, where))
    if kind == "symlink":
        target = obj.get("target")
        check_link_target(path, target)
        assert isinstance(target, str)
        return SymlinkOp(path, target)
    if kind == "delete":
        return DeleteOp(path)
    raise BundleInvalid(f"{where}: unknown op {kind!r:.40}")


def _check_through_links(ops: tuple[Op, ...]) -> None:
    """Refuse an op whose path passes through a symlink an earlier op created."""
    links: set[str] = set()
    for op in ops:
        parts = op.path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links:
                raise UnsafePath(f"{op.path!r} passes through the symlink {prefix!r}")
        if isinstance(op, DeleteOp):
            links = {p for p in links if p != op.path and not p.startswith(op.path + "/")}
        elif isinstance(op, SymlinkOp):
            links.add(op.path)
        else:
            links.discard(op.path)


def parse_header(data: bytes) -> BundleHeader:
    """Validate ``bundle.json`` (already signature-checked) into a header."""
    doc = load_document(data, limit=MAX_HEADER_BYTES, what="bundle.json", error=BundleInvalid)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleInvalid(f"bundle.json: format is not {FORMAT!r}")
    w = "bundle.json"
    app, kind = _field(doc, "app", str, w), doc.get("kind")
    release, patch = doc.get("release"), _field(doc, "patch", int, w)
    arch, unpacked = _field(doc, "arch", str, w), _field(doc, "unpacked_size", int, w)
    if not app or not is_valid_release(release) or not is_valid_arch(arch):
        raise BundleInvalid(f"{w}: invalid app, release or arch ({app!r}, {release!r}, {arch!r})")
    assert isinstance(release, str)
    if kind not in ("patch", "full") or (kind == "full") != (patch == 0):
        raise BundleInvalid(f"{w}: kind {kind!r} with patch {patch} (full ⇔ patch 0)")
    raw_ops = doc.get("ops")
    if not isinstance(raw_ops, list):
        raise BundleInvalid(f"{w}: 'ops' must be a list")
    ops: list[Op] = []
    payloads = 0
    for i, raw in enumerate(raw_ops):
        op = _parse_op(raw, i, payloads)
        payloads += isinstance(op, FileOp | DeltaOp)
        if kind == "full" and isinstance(op, DeltaOp):
            raise BundleInvalid(f"{w}: op {i} is a delta in a full bundle (no base tree)")
        ops.append(op)
    total = sum(op.size for op in ops if isinstance(op, FileOp | DeltaOp))
    if total > unpacked:
        raise BundleInvalid(f"{w}: ops write {total} bytes, more than unpacked_size {unpacked}")
    header = BundleHeader(app, str(kind), release, patch, arch, unpacked, tuple(ops))
    _check_through_links(header.ops)
    return header


def check_expected(header: BundleHeader, expected: Expected) -> None:
    """Refuse a validly signed bundle for another app, kind, build or machine."""
    got = (header.app, header.kind, header.release, header.patch)
    want = (expected.app, expected.kind, expected.release, expected.patch)
    names = ("app", "kind", "release", "patch")
    for name, g, e in zip(names, got, want, strict=True):
        if g != e:
            raise BundleInvalid(f"bundle is for {name} {g!r}, expected {e!r}")
    if header.arch not in (expected.arch, "any"):
        raise BundleInvalid(f"bundle is for arch {header.arch!r}, expected {expected.arch!r}")


