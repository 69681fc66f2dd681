"""Downloads against a misbehaving server: each fault ends in its documented class, and
what is left on disk is a true prefix of the bundle, or nothing."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import os
import time
from pathlib import Path

import pytest

from patchd.core.errors import (
    BundleHashMismatch,
    BundleNotFound,
    DiskFull,
    DownloadOversize,
    DownloadStalled,
    DownloadTruncated,
    NetworkError,
    RepositoryError,
    ServerError,
    TransientError,
)
from patchd.fetch import DownloadPolicy
from patchd.fetch.sources import HttpSource
from patchd.state.layout import DownloadFiles
from support import badserver as _badserver
from support.badserver import BadServer, Conn, Request

badserver = _badserver.badserver  # the fixture
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

DATA = os.urandom(256 * 1024 + 17)
SIZE = len(DATA)
SHA = hashlib.sha256(DATA).hexdigest()


def source(server: BadServer, *, timeout: float = 5.0, **policy: float) -> HttpSource:
    return HttpSource(server.url("/manifest.json"), timeout=timeout, max_redirects=3,
                      policy=DownloadPolicy(**policy))  # type: ignore[arg-type]


async def fetch(server: BadServer, dest: Path, *, offset: int = 0, **kw: float) -> None:
    async with source(server, **kw) as src:
        await src.download(server.url("/b.patchd"), dest, size=SIZE, sha256=SHA,
                           offset=offset, progress=None)


def assert_prefix(dest: Path) -> bytes:
    """What is on disk is a true prefix of the bundle (or absent)."""
    have = dest.read_bytes() if dest.exists() else b""
    assert DATA.startswith(have), f"{len(have)} bytes on disk are not a prefix"
    return have


def serve_ranges(req: Request, conn: Conn) -> None:
    """A correct server: 200 for plain GETs, 206 for ``bytes=N-``."""
    rng = req.header("range")
    if rng is None:
        conn.respond(200, DATA)
        return
    start = int(rng.removeprefix("bytes=").rstrip("-"))
    conn.respond(206, DATA[start:],
                 {"Content-Range": f"bytes {start}-{SIZE - 1}/{SIZE}"})


async def test_reset_mid_body_keeps_prefix(badserver: BadServer, tmp_path: Path) -> None:
    """A TCP reset mid-body is a NetworkError and leaves a true prefix on disk."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.send(DATA[: SIZE // 2])
        conn.reset()
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(NetworkError):
        await fetch(badserver, dest)
    assert len(assert_prefix(dest)) <= SIZE // 2


async def test_truncated_body_is_transient(badserver: BadServer, tmp_path: Path) -> None:
    """A body closed before its Content-Length is transient and the prefix is kept for resume."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.send(DATA[:100_000])
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(NetworkError):
        await fetch(badserver, dest)
    assert len(assert_prefix(dest)) == 100_000
    badserver.handler = serve_ranges
    await fetch(badserver, dest, offset=100_000)
    assert dest.read_bytes() == DATA
    assert badserver.requests[-1].header("range") == "bytes=100000-"


async def test_short_content_length_ends_truncated(badserver: BadServer, tmp_path: Path) -> None:
    """A Content-Length smaller than the manifest size ends in DownloadTruncated, prefix kept."""
    def handler(req: Request, conn: Conn) -> None:
        conn.respond(200, DATA, {"Content-Length": str(SIZE // 2)})
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(DownloadTruncated):
        await fetch(badserver, dest)
    assert len(assert_prefix(dest)) == SIZE // 2


async def test_content_length_above_size_refused(badserver: BadServer, tmp_path: Path) -> None:
    """A Content-Length above the manifest size is refused before any byte is written."""
    def handler(req: Request, conn: Conn) -> None:
        conn.respond(200, DATA + b"x" * 10)
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(DownloadOversize) as info:
        await fetch(badserver, dest)
    assert isinstance(info.value, TransientError)  # a transport fault, never a tombstone
    assert not dest.exists() and not DownloadFiles.beside(dest).meta.exists()


async def test_body_longer_than_size_aborted(badserver: BadServer, tmp_path: Path) -> None:
    """A close-delimited body longer than the size aborts at once; the file is removed."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200)  # no Content-Length: body runs until close
        conn.send(DATA)
        while conn.send(b"x" * 65536):  # endless: only the client's abort stops it
            pass
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(DownloadOversize):
        await fetch(badserver, dest)
    assert not dest.exists()


async def test_206_with_wrong_start_restarts_fresh(badserver: BadServer, tmp_path: Path) -> None:
    """A 206 whose Content-Range starts elsewhere is never appended: restart from zero."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(DATA[:5000])

    def handler(req: Request, conn: Conn) -> None:
        if req.header("range"):
            conn.respond(206, DATA[4000:], {"Content-Range": f"bytes 4000-{SIZE - 1}/{SIZE}"})
        else:
            conn.respond(200, DATA)
    badserver.handler = handler
    await fetch(badserver, dest, offset=5000)
    assert dest.read_bytes() == DATA
    assert [r.header("range") for r in badserver.requests] == ["bytes=5000-", None]


async def test_206_with_wrong_total_restarts_fresh(badserver: BadServer, tmp_path: Path) -> None:
    """A 206 whose total differs from the manifest size is refused; a fresh GET follows."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(DATA[:5000])

    def handler(req: Request, conn: Conn) -> None:
        if req.header("range"):
            conn.respond(206, DATA[5000:], {"Content-Range": f"bytes 5000-{SIZE}/{SIZE + 1}"})
        else:
            conn.respond(200, DATA)
    badserver.handler = handler
    await fetch(badserver, dest, offset=5000)
    assert dest.read_bytes() == DATA
    assert len(badserver.requests) == 2


async def test_200_on_range_request_truncates(badserver: BadServer, tmp_path: Path) -> None:
    """A 200 to a range request restarts from zero: stale partial bytes never survive."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(b"stale bytes of an older file" * 100)
    badserver.handler = lambda req, conn: conn.respond(200, DATA)
    await fetch(badserver, dest, offset=2800)
    assert dest.read_bytes() == DATA
    assert badserver.requests[0].header("range") == "bytes=2800-"


async def test_416_restarts_fresh_once(badserver: BadServer, tmp_path: Path) -> None:
    """416 to a resume restarts with a plain GET, once; the result is correct."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(DATA[:7000])

    def handler(req: Request, conn: Conn) -> None:
        if req.header("range"):
            conn.respond(416, b"", {"Content-Range": f"bytes */{SIZE}"})
        else:
            conn.respond(200, DATA)
    badserver.handler = handler
    await fetch(badserver, dest, offset=7000)
    assert dest.read_bytes() == DATA
    assert [r.header("range") for r in badserver.requests] == ["bytes=7000-", None]


async def test_416_restart_happens_once(badserver: BadServer, tmp_path: Path) -> None:
    """After a 416 the fresh GET is the try's last request; its failure keeps the new prefix."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(DATA[:7000])

    def handler(req: Request, conn: Conn) -> None:
        if req.header("range"):
            conn.respond(416)
        else:
            conn.head(200, {"Content-Length": str(SIZE)})
            conn.send(DATA[:100])
    badserver.handler = handler
    with pytest.raises(NetworkError):
        await fetch(badserver, dest, offset=7000)
    assert [r.header("range") for r in badserver.requests] == ["bytes=7000-", None]
    assert len(assert_prefix(dest)) == 100


async def test_500_then_success(badserver: BadServer, tmp_path: Path) -> None:
    """A 500 is a ServerError keeping the partial; the caller's retry then completes the file."""
    dest = tmp_path / "b.patchd"
    dest.write_bytes(DATA[:9000])
    badserver.handler = lambda req, conn: conn.respond(500, b"oops")
    with pytest.raises(ServerError) as info:
        await fetch(badserver, dest, offset=9000)
    assert info.value.status == 500
    assert dest.read_bytes() == DATA[:9000]
    badserver.handler = serve_ranges
    await fetch(badserver, dest, offset=9000)
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_429_retry_after(badserver: BadServer, tmp_path: Path, form: str) -> None:
    """429 is a ServerError carrying Retry-After (delta-seconds or HTTP date) in seconds."""
    value = "120" if form == "seconds" else email.utils.formatdate(time.time() + 120, usegmt=True)
    badserver.handler = lambda req, conn: conn.respond(429, b"", {"Retry-After": value})
    with pytest.raises(ServerError) as info:
        await fetch(badserver, tmp_path / "b.patchd")
    assert info.value.status == 429
    assert info.value.retry_after is not None and 110 <= info.value.retry_after <= 120


async def test_404_on_bundle_is_transient(badserver: BadServer, tmp_path: Path) -> None:
    """404 on a bundle is BundleNotFound, a transient error (the mirror may lag the manifest)."""
    badserver.handler = lambda req, conn: conn.respond(404)
    with pytest.raises(BundleNotFound) as info:
        await fetch(badserver, tmp_path / "b.patchd")
    assert isinstance(info.value, TransientError)


async def test_redirect_loop_is_repository_error(badserver: BadServer, tmp_path: Path) -> None:
    """A redirect loop stops after max_redirects and is a RepositoryError (server misconfigured)."""
    def handler(req: Request, conn: Conn) -> None:
        other = "/a" if req.path != "/a" else "/b"
        conn.respond(302, b"", {"Location": other})
    badserver.handler = handler
    with pytest.raises(RepositoryError, match="redirects"):
        await fetch(badserver, tmp_path / "b.patchd")
    assert len(badserver.requests) == 4  # the request and 3 redirects


async def test_redirect_followed(badserver: BadServer, tmp_path: Path) -> None:
    """A redirect within the limit is followed to the bundle."""
    def handler(req: Request, conn: Conn) -> None:
        if req.path == "/b.patchd":
            conn.respond(301, b"", {"Location": "/mirror/b.patchd"})
        else:
            conn.respond(200, DATA)
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    await fetch(badserver, dest)
    assert dest.read_bytes() == DATA


async def test_trickle_is_stalled(badserver: BadServer, tmp_path: Path) -> None:
    """A server trickling below the stall threshold ends in DownloadStalled; the prefix is kept."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.send(DATA[:4096])
        conn.trickle(DATA[4096:], 0.02)
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    started = time.monotonic()
    with pytest.raises(DownloadStalled):
        await fetch(badserver, dest, stall_window=0.3, stall_min_bytes=1000)
    assert time.monotonic() - started < 5
    assert len(assert_prefix(dest)) >= 4096


async def test_silence_hits_between_bytes_timeout(badserver: BadServer, tmp_path: Path) -> None:
    """Headers then silence trips the between-bytes (read) timeout: a NetworkError."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(SIZE)})
        conn.send(DATA[:1000])
        conn.stop.wait(10)
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(NetworkError, match="timed out"):
        await fetch(badserver, dest, timeout=0.3)
    assert_prefix(dest)


async def test_gzip_encoded_body_is_hash_mismatch(badserver: BadServer, tmp_path: Path) -> None:
    """A body really transcoded to gzip is kept as bytes on the wire, so the hash refuses it."""
    def handler(req: Request, conn: Conn) -> None:
        assert req.header("accept-encoding") == "identity"
        conn.respond(200, gzip.compress(DATA), {"Content-Encoding": "gzip"})
    badserver.handler = handler
    dest = tmp_path / "b.patchd"
    with pytest.raises(BundleHashMismatch):
        await fetch(badserver, dest)
    assert not dest.exists() and not DownloadFiles.beside(dest).meta.exists()


async def test_content_encoding_label_not_decoded(badserver: BadServer, tmp_path: Path) -> None:
    """A stored file merely labelled Content-Encoding (S3 metadata) is taken verbatim and passes."""
    badserver.handler = lambda req, conn: conn.respond(200, DATA, {"Content-Encoding": "gzip"})
    dest = tmp_path / "b.patchd"
    await fetch(badserver, dest)
    assert dest.read_bytes() == DATA


async def test_enospc_is_disk_full(badserver: BadServer, tmp_path: Path) -> None:
    """ENOSPC while writing (a real one, from /dev/full) is DiskFull, a transient error."""
    badserver.handler = lambda req, conn: conn.respond(200, DATA)
    dest = tmp_path / "b.patchd"
    dest.symlink_to("/dev/full")
    with pytest.raises(DiskFull):
        await fetch(badserver, dest)
