"""Trees on disk for bundle tests: write, snapshot, hypothesis strategies, bundle crafting.

A tree spec is a dict name → node, where a node is ``("file", bytes, mode)``,
``("dir", mode, {children})`` or ``("link", ups, tail)``; a link's target is built when
written as ``"../" * min(ups, depth) + tail`` so it always resolves inside the tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from patchd.trust.signing import TrustedKeys, public_raw, sign_document

Node = tuple[Any, ...]
Spec = dict[str, Node]

NAMES = ["a", "b", "c", "d.txt"]
FILE_MODES = [0o644, 0o755, 0o600, 0o444, 0o400]
DIR_MODES = [0o755, 0o700, 0o750, 0o775]


def big_content(seed: int, edit: int) -> bytes:
    """16 KiB of seeded noise with a small edit: same seed, different edit → delta-worthy."""
    data = bytearray(random.Random(seed).randbytes(16 * 1024))
    if edit:
        data[edit * 97 : edit * 97 + 8] = b"EDITED!!"
    return bytes(data)


contents = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.builds(big_content, st.integers(0, 2), st.integers(0, 4)),
)
files = st.tuples(st.just("file"), contents, st.sampled_from(FILE_MODES))
links = st.tuples(st.just("link"), st.integers(0, 2),
                  st.sampled_from(["a", "b/c", "d.txt", "missing"]))


def _dirs(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.tuples(st.just("dir"), st.sampled_from(DIR_MODES),
                     st.dictionaries(st.sampled_from(NAMES), children, max_size=3))


nodes = st.recursive(st.one_of(files, links), _dirs, max_leaves=8)
tree_specs = st.dictionaries(st.sampled_from(NAMES), nodes, max_size=4)


def write_tree(root: Path, spec: Spec, depth: int = 0) -> None:
    """Create ``spec`` under ``root`` (which is created), modes and links included."""
    root.mkdir(parents=True, exist_ok=True)
    for name, node in spec.items():
        path = root / name
        if node[0] == "file":
            path.write_bytes(node[1])
            os.chmod(path, node[2])
        elif node[0] == "link":
            os.symlink("../" * min(node[1], depth) + node[2], path)
        else:
            write_tree(path, node[2], depth + 1)
            os.chmod(path, node[1])


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree: type, content hash, mode, link target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st_ = full.lstat()
            if full.is_symlink():
                out[rel] = ("link", os.readlink(full))
            elif full.is_dir():
                out[rel] = ("dir", st_.st_mode & 0o7777)
            else:
                out[rel] = ("file", hashlib.sha256(full.read_bytes()).hexdigest(),
                            st_.st_mode & 0o7777)
    return out


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def trust_of(*keys: Ed25519PrivateKey, threshold: int = 1) -> TrustedKeys:
    return TrustedKeys.from_raw([public_raw(k) for k in keys], threshold)


def header_doc(ops: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A bundle.json document with sane defaults (app kiosk, patch 1.0+1, arch any)."""
    doc: dict[str, Any] = {"format": "patchd-bundle/1", "app": "kiosk", "kind": "patch",
                           "release": "1.0", "patch": 1, "arch": "any"}
    doc.update(fields)
    doc["ops"] = ops
    doc.setdefault("unpacked_size", sum(o.get("size", 0) for o in ops))
    return doc


def file_op(path: str, data: bytes, index: int, mode: int = 0o644) -> dict[str, Any]:
    return {"op": "file", "path": path, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "mode": mode,
            "payload": f"payload/{index}"}


def tar_member(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE,
               linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = type_, len(data), linkname
    if type_ != tarfile.REGTYPE:
        info.size = 0
    return info, data


def craft_bundle(path: Path, members: list[tuple[tarfile.TarInfo, bytes]],
                 compression: str = "zstd") -> Path:
    """Write raw tar members (no validation at all) compressed as asked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.size else None)
    raw = buf.getvalue()
    if compression == "zstd":
        raw = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    elif compression == "gzip":
        import gzip

        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return path


def signed_members(doc: dict[str, Any], keys: list[Ed25519PrivateKey],
                   payloads: list[bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """bundle.json, bundle.sig signed by ``keys``, and payload/i members."""
    header = json.dumps(doc).encode()
    members = [tar_member("bundle.json", header),
               tar_member("bundle.sig", sign_document(header, keys))]
    members += [tar_member(f"payload/{i}", p) for i, p in enumerate(payloads)]
    return members
