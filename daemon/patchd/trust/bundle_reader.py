"""The bundle reader: streaming, verifying, and never trusting the archive.

A bundle arrives from the network and is hostile until proven otherwise, so the reader
follows one order: read ``bundle.json`` and ``bundle.sig`` (both size-capped), verify
the signature, and only then interpret the header, compare it with what the caller
expects and validate every op. Payloads are handed out one at a time as streams that
count and hash what passes through; the archive is never extracted by tarfile and no
name from it is ever used as a filesystem path here.

Layout of the decompression stack (bottom to top)::

    file ─▶ zstd | gzip | plain (magic bytes) ─▶ _Counted ─▶ tarfile "r|" ─▶ Payload
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

import zstandard

from patchd.core.errors import BundleInvalid, PayloadHashMismatch
from patchd.trust.bundle_header import (
    MAX_HEADER_BYTES,
    BundleHeader,
    DeltaOp,
    Expected,
    FileOp,
    Op,
    PayloadOp,
    check_expected,
    parse_header,
)
from patchd.trust.signing import TrustedKeys, verify_document

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
#: Caps on the two documents read before the signature is checked.
MAX_SIG_BYTES = 4 * 1024 * 1024
#: A pax/GNU meta header larger than this is refused before tarfile buffers it.
MAX_META_HEADER_BYTES = 1024 * 1024
#: Largest zstd window accepted (outer stream and delta frames): zstd's default limit.
MAX_WINDOW_BYTES = 1 << 27
#: Zero padding accepted after the end-of-archive marker (tar records are 10 KiB).
MAX_TRAILER_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024



# --- archive plumbing ------------------------------------------------------------------


def check_zstd_frames(fd: int, size: int) -> None:
    """Walk the frame and block headers so a truncated zstd file is refused.

    zstandard's stream reader reports a cut-off frame as a clean end of data; the block
    headers say exactly where each frame ends, so this costs one pread per 128 KiB block.
    """
    pos = 0
    while pos < size:
        head = os.pread(fd, 14, pos)
        magic = int.from_bytes(head[:4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F and len(head) >= 8:
            pos += 8 + int.from_bytes(head[4:8], "little")
        elif head[:4] == ZSTD_MAGIC and len(head) >= 6:
            desc = head[4]
            fcs, single, checksum, did = desc >> 6, (desc >> 5) & 1, (desc >> 2) & 1, desc & 3
            fcs_size = (1 if single else 0, 2, 4, 8)[fcs]
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[did] + fcs_size
            last = False
            while not last:
                block = os.pread(fd, 3, pos)
                if len(block) < 3:
                    break
                value = int.from_bytes(block, "little")
                last, btype, bsize = bool(value & 1), (value >> 1) & 3, value >> 3
                if btype == 3:
                    raise BundleInvalid(f"zstd stream corrupt: reserved block type at {pos}")
                pos += 3 + (1 if btype == 1 else bsize)
            if not last:
                pos = size + 1
            pos += 4 * checksum
        else:
            raise BundleInvalid(f"data at offset {pos} is not a zstd frame")
        if pos > size:
            raise BundleInvalid(f"archive is truncated: zstd stream ends early ({size} bytes)")


class _Counted(io.RawIOBase):
    """Decompressed byte stream with a bound on any single read and a position."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(_CHUNK if size < 0 else min(size, _CHUNK))
        self.pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses oversized pax/GNU meta headers, which tarfile would read whole into memory,
    and GNU sparse members of any version before tarfile reads their maps (a bundle
    holds regular files only, and tarfile raises a bare ValueError on a bad map)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        meta = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
        if self.type in meta and self.size > MAX_META_HEADER_BYTES:
            raise BundleInvalid(f"tar meta header of {self.size} bytes is too large")
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        except ValueError as exc:  # a number or a name tarfile cannot parse
            raise BundleInvalid(f"corrupt tar header: {exc}") from None

    def _sparse(self, *args: object) -> Any:
        member = args[0] if args and isinstance(args[0], tarfile.TarInfo) else self
        raise BundleInvalid(f"member {member.name!r:.200} is a GNU sparse file; "
                            "only regular files are allowed")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse


@contextlib.contextmanager
def _archive_errors(context: str) -> Iterator[None]:
    """Translate what the decompressors and tarfile raise on bad bytes to BundleInvalid."""
    try:
        yield
    except (tarfile.TarError, zstandard.ZstdError, EOFError, gzip.BadGzipFile,
            zlib.error) as exc:
        raise BundleInvalid(f"corrupt or truncated archive {context}: {exc}") from exc


def _decompressed(fh: BinaryIO) -> IO[bytes]:
    magic = os.pread(fh.fileno(), 4, 0)
    if magic == ZSTD_MAGIC:
        check_zstd_frames(fh.fileno(), os.fstat(fh.fileno()).st_size)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
        reader: IO[bytes] = dctx.stream_reader(fh, read_size=_CHUNK, read_across_frames=True,
                                               closefd=False)
        return reader
    if magic[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh


def _is_plain_regular(member: tarfile.TarInfo) -> bool:
    return member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()


def _describe_type(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "a link"
    if member.isdev():
        return "a device or fifo"
    return "a directory" if member.isdir() else f"of tar type {member.type!r}"


# --- payloads --------------------------------------------------------------------------


class Payload:
    """One op's final content as a stream, verified against its size and SHA-256.

    Reading past ``op.size`` raises BundleInvalid at once; at EOF a hash mismatch
    raises PayloadHashMismatch. The consumer must read to EOF (``b""``).
    """

    def __init__(self, op: PayloadOp, source: IO[bytes], cleanup: Callable[[], None]) -> None:
        self.op = op
        self._source = source
        self._cleanup = cleanup
        self._hash = hashlib.sha256()
        self._count = 0
        self.done = False

    def __repr__(self) -> str:
        return f"<Payload {self.op.path!r} {self._count}/{self.op.size} done={self.done}>"

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        if self.done or n == 0:
            return b""
        with _archive_errors(f"in {self.op.payload} ({self.op.path!r})"):
            data = self._source.read(min(n, self.op.size - self._count + 1))
        self._count += len(data)
        if self._count > self.op.size:
            raise BundleInvalid(
                f"{self.op.payload} ({self.op.path!r}) is longer than the {self.op.size} bytes "
                "its op says"
            )
        if data:
            self._hash.update(data)
            return data
        self._finish()
        return b""

    def _finish(self) -> None:
        self.done = True
        self._cleanup()
        if self._count != self.op.size:
            raise BundleInvalid(
                f"{self.op.payload} ({self.op.path!r}) has {self._count} bytes, "
                f"its op says {self.op.size}"
            )
        digest = self._hash.hexdigest()
        if digest != self.op.sha256:
            raise PayloadHashMismatch(
                f"{self.op.path!r} hashes to {digest}, the bundle says {self.op.sha256}"
            )


# --- the reader ------------------------------------------------------------------------


class BundleReader:
    """An open, signature-verified bundle whose ops are read once, in order."""

    def __init__(self, path: Path, trust: TrustedKeys | None, expected: Expected | None
                 ) -> None:
        self.path = Path(path)
        self._fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - owned until close()
        try:
            with _archive_errors("at the start"):
                self._stream = _Counted(_decompressed(self._fh))
                self._tar = tarfile.open(  # noqa: SIM115 - owned until close()
                    fileobj=io.BufferedReader(self._stream, _CHUNK), mode="r|",
                    tarinfo=_SafeTarInfo)
            header_bytes = self._document("bundle.json", MAX_HEADER_BYTES)
            sig_bytes = self._document("bundle.sig", MAX_SIG_BYTES)
            if trust is not None:
                verify_document(header_bytes, sig_bytes, trust)
            self.header = parse_header(header_bytes)
            if expected is not None:
                check_expected(self.header, expected)
        except BaseException:
            self.close()
            raise
        self._started = False

    def __repr__(self) -> str:
        return f"<BundleReader {str(self.path)!r} started={self._started}>"

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._fh.close()

    def _next_member(self, wanted: str) -> tarfile.TarInfo:
        with _archive_errors(f"before {wanted}"):
            member = self._tar.next()
        if member is None:
            raise BundleInvalid(f"archive ends before member {wanted!r} (truncated?)")
        if not _is_plain_regular(member):
            raise BundleInvalid(f"member {member.name!r} is {_describe_type(member)}; "
                                "only regular files are allowed")
        if member.name != wanted:
            raise BundleInvalid(f"unexpected member {member.name!r} where {wanted!r} belongs")
        self._last_end = member.offset_data + -(-member.size // 512) * 512
        return member

    def _document(self, name: str, limit: int) -> bytes:
        member = self._next_member(name)
        if member.size > limit:
            raise BundleInvalid(f"{name} is {member.size} bytes, over the {limit} limit")
        with _archive_errors(f"in {name}"):
            source = self._tar.extractfile(member)
            assert source is not None
            data = source.read()
        if len(data) != member.size:
            raise BundleInvalid(f"archive is truncated inside {name}")
        return data

    def ops(self, read_base: Callable[[str], bytes]) -> Iterator[tuple[Op, Payload | None]]:
        """Each op in order, with its verified payload stream for file and delta ops.

        ``read_base(path)`` returns the base tree's bytes at ``path`` for delta ops.
        After the last op the archive must end: no extra member, no trailing data.
        """
        if self._started:
            raise RuntimeError("BundleReader.ops() can be iterated only once")
        self._started = True
        for op in self.header.ops:
            if not isinstance(op, FileOp | DeltaOp):
                yield op, None
                continue
            payload = self._payload(op, read_base)
            yield op, payload
            if not payload.done:
                raise RuntimeError(f"payload of {op.path!r} was not read to the end")
        self._check_end()

    def _payload(self, op: PayloadOp, read_base: Callable[[str], bytes]) -> Payload:
        member = self._next_member(op.payload)
        with _archive_errors(f"in {op.payload}"):
            source = self._tar.extractfile(member)
        assert source is not None
        if isinstance(op, FileOp):
            if member.size != op.size:
                raise BundleInvalid(f"{op.payload} ({op.path!r}) is {member.size} bytes, "
                                    f"its op says {op.size}")
            return Payload(op, source, lambda: None)
        if member.size > op.size + op.size // 64 + 4096:
            raise BundleInvalid(f"{op.payload} ({op.path!r}): delta frame of {member.size} "
                                f"bytes is too large for a {op.size}-byte result")
        base = read_base(op.path)
        base_sha = hashlib.sha256(base).hexdigest()
        if base_sha != op.base_sha256:
            raise PayloadHashMismatch(f"base file {op.path!r} hashes to {base_sha}, "
                                     f"the delta was made against {op.base_sha256}")
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW_BYTES)
        decoder = dctx.stream_reader(source, read_across_frames=False, closefd=False)
        return Payload(op, decoder, decoder.close)

    def _check_end(self) -> None:
        with _archive_errors("after the last payload"):
            extra = self._tar.next()
            if extra is not None:
                raise BundleInvalid(f"unexpected member {extra.name!r} after the last op")
            stream: Any = self._tar.fileobj
            trailer = 0
            while chunk := stream.read(64 * 1024):
                trailer += len(chunk)
                if chunk.strip(b"\x00") or trailer > MAX_TRAILER_BYTES:
                    raise BundleInvalid("data after the end of the tar archive")
            end = stream.tell()
        if end < self._last_end + 1024:
            raise BundleInvalid("archive is truncated: the tar end-of-archive marker is missing")


def open_bundle(path: Path, trust: TrustedKeys, expected: Expected) -> BundleReader:
    """Open a bundle, verify its signature, then its header against ``expected``."""
    return BundleReader(path, trust, expected)


def read_header_unverified(path: Path) -> BundleHeader:
    """The header of a bundle WITHOUT checking its signature: for publisher tools only."""
    with BundleReader(path, None, None) as reader:
        return reader.header

