"""Write a bundle (docs/formats.md) that turns a base tree into a target tree.

Two passes, because the signed header listing every op and hash must be the first
member: pass one walks both trees (sorted), hashes files and decides each op, spooling
delta frames to a temp file; pass two streams the header, the signature and every
payload into a zstd-compressed pax tar. Memory is bounded by the per-file delta limit,
never by the tree size; the output depends only on the inputs (sorted walk, fixed
mtime/owner, single-threaded zstd).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog
import zstandard

from patchd.core.errors import PackError, UnsafePath
from patchd.core.fsio import atomic_file, check_rel_path
from patchd.trust import (
    BundleHeader,
    DeleteOp,
    DeltaOp,
    DirOp,
    FileOp,
    Op,
    SymlinkOp,
    check_link_target,
    parse_header,
)
from patchd.trust.signing import Signer, sign_document

log = structlog.get_logger("patchd.publisher.pack")

#: Outer stream level: fast enough for GiB trees, decoded with a 2 MiB window.
OUTER_LEVEL = 3
#: Files up to this size are considered for deltas (both base and target in memory).
MAX_DELTA_FILE = 64 * 1024 * 1024
#: A delta must be at most this fraction of the plainly compressed file.
DELTA_WORTH = 0.70
#: From this size on, delta frames use long-distance matching and a lower level.
LARGE_FILE = 8 * 1024 * 1024
_CHUNK = 1024 * 1024



@dataclass(frozen=True, slots=True)
class _Entry:
    kind: str  # "file" | "dir" | "link"
    mode: int
    size: int = 0
    target: str = ""


def _parts(path: str) -> list[str]:
    return path.split("/")


def scan_tree(root: Path) -> dict[str, _Entry]:
    """Every entry under ``root`` by relative path, in sorted path order, links unfollowed."""
    out: dict[str, _Entry] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                raise PackError(f"{entry.path!r}: file name is not UTF-8") from None
            rel = prefix + entry.name
            try:  # what every host refuses at read time (depth, Unicode, length)
                check_rel_path(rel)
            except UnsafePath as exc:
                raise PackError(f"{entry.path}: {exc}; hosts refuse such a bundle") from None
            st = entry.stat(follow_symlinks=False)
            if st.st_mode & 0o7000 and not stat.S_ISLNK(st.st_mode):
                raise PackError(f"{entry.path}: setuid/setgid/sticky bits cannot be shipped")
            if stat.S_ISLNK(st.st_mode):
                out[rel] = _Entry("link", 0o777, target=os.readlink(entry.path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = _Entry("dir", st.st_mode & 0o777)
                walk(Path(entry.path), rel + "/")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = _Entry("file", st.st_mode & 0o777, size=st.st_size)
            else:
                raise PackError(f"{entry.path}: only files, directories and symlinks can be packed")

    walk(root, "")
    return out


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _delta_frame(base: bytes, target: bytes) -> bytes | None:
    """A zstd frame of ``target`` with ``base`` as prefix dictionary, if worth it."""
    plain = len(zstandard.ZstdCompressor(level=OUTER_LEVEL).compress(target))
    large = len(target) >= LARGE_FILE
    window_log = min(27, max(10, (len(base) + len(target)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        9 if large else 19, source_size=len(target), dict_size=len(base),
        window_log=window_log, enable_ldm=large,
    )
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame: bytes = zstandard.ZstdCompressor(
        dict_data=dictionary, compression_params=params
    ).compress(target)
    return frame if len(frame) <= plain * DELTA_WORTH else None


class _Planner:
    """Pass one: decide the ops, hashing files and spooling delta frames."""

    def __init__(self, base: Path | None, target: Path, delta: bool, spool: IO[bytes]) -> None:
        self.base, self.target, self.delta, self.spool = base, target, delta, spool
        self.ops: list[Op] = []
        self.spooled: dict[str, tuple[int, int]] = {}  # payload name -> (offset, length)
        self._payloads = 0

    def _payload_name(self) -> str:
        name = f"payload/{self._payloads}"
        self._payloads += 1
        return name

    def plan(self) -> list[Op]:
        base = scan_tree(self.base) if self.base is not None else {}
        target = scan_tree(self.target)
        kept = self._deletes(base, target)
        for path, entry in target.items():
            self._create(path, entry, kept.get(path))
        return self.ops

    def _deletes(self, base: dict[str, _Entry], target: dict[str, _Entry]) -> dict[str, _Entry]:
        """Emit deletes (topmost only) and return the base entries that survive."""
        kept: dict[str, _Entry] = {}
        deleted: list[str] = []
        for path, entry in base.items():
            if any(path.startswith(d + "/") for d in deleted[-1:]):
                continue
            new = target.get(path)
            if new is None or new.kind != entry.kind:
                self.ops.append(DeleteOp(path))
                deleted.append(path)
            else:
                kept[path] = entry
        return kept

    def _create(self, path: str, entry: _Entry, old: _Entry | None) -> None:
        if entry.kind == "dir":
            if old is None or old.mode != entry.mode:
                self.ops.append(DirOp(path, entry.mode))
        elif entry.kind == "link":
            try:
                check_link_target(path, entry.target)
            except UnsafePath as exc:
                raise PackError(f"cannot ship symlink: {exc}") from None
            if old is None or old.target != entry.target:
                self.ops.append(SymlinkOp(path, entry.target))
        else:
            self._file(path, entry, old)

    def _file(self, path: str, entry: _Entry, old: _Entry | None) -> None:
        tpath = self.target / path
        if old is None or self.base is None:
            self.ops.append(FileOp(path, entry.size, _hash_file(tpath), entry.mode,
                                   self._payload_name()))
            return
        bpath = self.base / path
        small = max(old.size, entry.size) <= MAX_DELTA_FILE
        sha = _hash_file(tpath)
        base_sha = _hash_file(bpath) if old.size == entry.size or (self.delta and small) else ""
        if sha == base_sha and old.mode == entry.mode:
            return
        if self.delta and small and sha != base_sha:
            target_bytes = tpath.read_bytes()
            frame = _delta_frame(bpath.read_bytes(), target_bytes)
            if frame is not None and hashlib.sha256(target_bytes).hexdigest() == sha:
                name = self._payload_name()
                self.spooled[name] = (self.spool.tell(), len(frame))
                self.spool.write(frame)
                self.ops.append(DeltaOp(path, len(target_bytes), sha, base_sha, entry.mode, name))
                return
        self.ops.append(FileOp(path, entry.size, sha, entry.mode, self._payload_name()))


class _Hashing(io.RawIOBase):
    """Reads at most ``size`` bytes of a file, hashing them."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f, self._left, self.hash = f, size, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        self.hash.update(data)
        return data


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_payload(tf: tarfile.TarFile, op: FileOp | DeltaOp, target: Path,
                   spool: IO[bytes], spooled: dict[str, tuple[int, int]]) -> None:
    if isinstance(op, DeltaOp):
        offset, length = spooled[op.payload]
        spool.seek(offset)
        tf.addfile(_member(op.payload, length), _Hashing(spool, length))
        return
    fd = os.open(target / op.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        reader = _Hashing(f, op.size)
        try:
            tf.addfile(_member(op.payload, op.size), reader)
        except OSError as exc:
            raise PackError(f"{op.path}: changed while packing ({exc})") from exc
    if reader.hash.hexdigest() != op.sha256:
        raise PackError(f"{op.path}: changed while packing (hash differs from pass one)")


def pack(
    *,
    app: str,
    release: str,
    patch: int,
    kind: str,
    arch: str,
    base: Path | None,
    target: Path,
    private_keys: Sequence[Signer],
    out: Path,
    delta: bool = True,
) -> BundleHeader:
    """Write a signed bundle turning ``base`` (None: empty tree) into ``target``."""
    if kind not in ("patch", "full") or (kind == "full") != (base is None):
        raise PackError("a full bundle has no base tree; a patch bundle needs one")
    out = Path(out)
    with tempfile.TemporaryFile(dir=out.parent) as spool:
        planner = _Planner(base, Path(target), delta, spool)
        ops = planner.plan()
        unpacked = sum(op.size for op in ops if isinstance(op, FileOp | DeltaOp))
        header = BundleHeader(app, kind, release, patch, arch, unpacked, tuple(ops))
        header_bytes = header.to_bytes()
        parse_header(header_bytes)  # validate what we sign, exactly as a reader will
        sig = sign_document(header_bytes, private_keys)
        with atomic_file(out) as raw:
            _write_archive(raw, header_bytes, sig, ops, Path(target), spool, planner.spooled)
    log.info("pack.complete", out=str(out), ops=len(ops), unpacked_size=unpacked,
             size=out.stat().st_size)
    return header


def _write_archive(raw: IO[bytes], header_bytes: bytes, sig: bytes, ops: list[Op],
                   target: Path, spool: IO[bytes], spooled: dict[str, tuple[int, int]]) -> None:
    """The zstd-compressed tar stream into ``raw`` (``atomic_file`` makes it durable)."""
    cctx = zstandard.ZstdCompressor(level=OUTER_LEVEL, write_checksum=True)
    with cctx.stream_writer(raw, closefd=False) as zw, tarfile.open(
        fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT
    ) as tf:
        tf.addfile(_member("bundle.json", len(header_bytes)), io.BytesIO(header_bytes))
        tf.addfile(_member("bundle.sig", len(sig)), io.BytesIO(sig))
        for op in ops:
            if isinstance(op, FileOp | DeltaOp):
                _write_payload(tf, op, target, spool, spooled)
