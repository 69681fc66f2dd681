"""Repository sources: scheme dispatch, URL resolution, local repositories, manifest caps,
and the pure helpers of the download engine."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import pytest

from patchd.core.errors import (
    BundleHashMismatch,
    DownloadOversize,
    DownloadTruncated,
    ManifestInvalid,
    RepositoryError,
)
from patchd.fetch import verify_file
from patchd.fetch.http import parse_content_range, parse_retry_after
from patchd.fetch.sources import HttpSource, LocalSource, open_source
from support import badserver as _badserver
from support.badserver import BadServer, Conn, Request

badserver = _badserver.badserver  # the fixture
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

DATA = os.urandom(3 * 1024 * 1024 + 5)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A local repository directory with a manifest, its signature and one bundle."""
    root = tmp_path / "repo"
    (root / "1.0").mkdir(parents=True)
    (root / "manifest.json").write_bytes(b'{"serial": 1}')
    (root / "manifest.json.sig").write_bytes(b'{"signatures": []}')
    (root / "1.0" / "b.patchd").write_bytes(DATA)
    return root


async def test_open_source_dispatches_on_scheme(tmp_path: Path) -> None:
    """http(s) gives an HttpSource, file:// and paths a LocalSource, anything else is refused."""
    async with open_source("https://example.invalid/a/manifest.json", timeout=1) as s:
        assert isinstance(s, HttpSource)
        assert s.resolve("1.0/b.patchd") == "https://example.invalid/a/1.0/b.patchd"
        assert s.resolve("https://cdn.invalid/x") == "https://cdn.invalid/x"
    async with open_source(f"file://{tmp_path}/manifest.json", timeout=1) as s:
        assert isinstance(s, LocalSource)
        assert s.resolve("1.0/b.patchd") == str(tmp_path / "1.0" / "b.patchd")
        assert s.resolve("/abs/b.patchd") == "/abs/b.patchd"
    async with open_source(str(tmp_path / "manifest.json"), timeout=1) as s:
        assert isinstance(s, LocalSource)
    with pytest.raises(RepositoryError, match="scheme"):
        open_source("ftp://example.invalid/manifest.json", timeout=1)


async def test_local_manifest_and_not_modified(repo: Path) -> None:
    """A local manifest comes with its .sig; unchanged content + same validators → None."""
    async with open_source(f"file://{repo}/manifest.json", timeout=1) as src:
        got = await src.fetch_manifest(None)
        assert got is not None and got.manifest == b'{"serial": 1}'
        assert got.signature == b'{"signatures": []}'
        assert await src.fetch_manifest(got.validators) is None
        await anyio.Path(repo / "manifest.json").write_bytes(b'{"serial": 2}')
        again = await src.fetch_manifest(got.validators)
        assert again is not None and again.manifest == b'{"serial": 2}'


async def test_local_manifest_missing_or_huge(repo: Path) -> None:
    """A missing local manifest is a RepositoryError; one over 4 MiB is ManifestInvalid."""
    async with open_source(str(repo / "nope.json"), timeout=1) as src:
        with pytest.raises(RepositoryError, match="not found"):
            await src.fetch_manifest(None)
    await anyio.Path(repo / "manifest.json").write_bytes(b" " * (4 * 1024 * 1024 + 1))
    async with open_source(str(repo / "manifest.json"), timeout=1) as src:
        with pytest.raises(ManifestInvalid, match="larger than 4 MiB"):
            await src.fetch_manifest(None)


async def test_local_copy_with_progress(repo: Path, tmp_path: Path) -> None:
    """A local bundle is copied verified, with progress ending at the total."""
    dest = tmp_path / "b.patchd"
    seen: list[int] = []
    async with open_source(str(repo / "manifest.json"), timeout=1) as src:
        await src.download(src.resolve("1.0/b.patchd"), dest, size=len(DATA), sha256=SHA,
                           offset=0, progress=lambda d, t: seen.append(d))
    assert await anyio.Path(dest).read_bytes() == DATA
    assert seen[-1] == len(DATA)


async def test_local_cancel_then_resume(repo: Path, tmp_path: Path) -> None:
    """A cancelled local copy leaves a prefix; the next call resumes from it and completes."""
    dest = tmp_path / "b.patchd"
    async with open_source(str(repo / "manifest.json"), timeout=1) as src:
        url = src.resolve("1.0/b.patchd")
        with anyio.CancelScope() as scope:
            def progress(done: int, total: int) -> None:
                if done >= total // 3:
                    scope.cancel()
            await src.download(url, dest, size=len(DATA), sha256=SHA, offset=0,
                               progress=progress)
        have = await anyio.Path(dest).read_bytes()
        assert scope.cancelled_caught and DATA.startswith(have) and len(have) < len(DATA)
        await src.download(url, dest, size=len(DATA), sha256=SHA, offset=len(have),
                           progress=None)
    assert await anyio.Path(dest).read_bytes() == DATA


async def test_local_wrong_bytes(repo: Path, tmp_path: Path) -> None:
    """Local copies: a bad hash or oversize removes the file; a short source is transient."""
    dest = tmp_path / "b.patchd"
    async with open_source(str(repo / "manifest.json"), timeout=1) as src:
        url = src.resolve("1.0/b.patchd")
        with pytest.raises(BundleHashMismatch):
            await src.download(url, dest, size=len(DATA), sha256="0" * 64, offset=0,
                               progress=None)
        assert not await anyio.Path(dest).exists()
        with pytest.raises(DownloadOversize):
            await src.download(url, dest, size=len(DATA) - 1, sha256=SHA, offset=0,
                               progress=None)
        assert not await anyio.Path(dest).exists()
        with pytest.raises(DownloadTruncated):
            await src.download(url, dest, size=len(DATA) + 1, sha256=SHA, offset=0,
                               progress=None)
        assert await anyio.Path(dest).read_bytes() == DATA


async def test_http_manifest_endless_body_refused(badserver: BadServer) -> None:
    """An endless manifest without Content-Length is cut off past 4 MiB as ManifestInvalid."""
    def handler(req: Request, conn: Conn) -> None:
        conn.head(200)
        while conn.send(b" " * 65536):
            pass
    badserver.handler = handler
    async with open_source(badserver.url("/manifest.json"), timeout=5) as src:
        with pytest.raises(ManifestInvalid, match="larger than 4 MiB"):
            await src.fetch_manifest(None)


async def test_http_manifest_304_without_validators_is_error(badserver: BadServer) -> None:
    """A 304 to an unconditional request is not "unchanged" but a repository error."""
    badserver.handler = lambda req, conn: conn.respond(304)
    async with open_source(badserver.url("/manifest.json"), timeout=5) as src:
        with pytest.raises(RepositoryError, match="304"):
            await src.fetch_manifest(None)


async def test_verify_file(tmp_path: Path) -> None:
    """verify_file accepts the right bytes and raises BundleHashMismatch on size or hash."""
    path = tmp_path / "f"
    await anyio.Path(path).write_bytes(b"hello")
    await verify_file(path, 5, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(BundleHashMismatch, match="bytes on disk"):
        await verify_file(path, 6, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(BundleHashMismatch, match="sha256"):
        await verify_file(path, 5, "0" * 64)


def test_parse_content_range() -> None:
    """Content-Range parsing takes START-END/TOTAL and refuses anything else."""
    assert parse_content_range("bytes 5-9/10") == (5, 9, 10)
    assert parse_content_range("bytes */10") is None
    assert parse_content_range("items 5-9/10") is None
    assert parse_content_range(None) is None


def test_parse_retry_after() -> None:
    """Retry-After accepts delta-seconds and HTTP dates (past dates mean now)."""
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
