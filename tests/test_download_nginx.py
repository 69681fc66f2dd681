"""Manifest fetches and bundle downloads against a real nginx on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import anyio
import pytest

from patchd.core.errors import BundleNotFound, ManifestInvalid, RepositoryError
from patchd.fetch.sources import HttpSource, open_source
from patchd.state.layout import DownloadFiles
from support import nginx as _nginx
from support.nginx import NginxRepo

nginx_repo = _nginx.nginx_repo  # the fixture
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SIZE = 8 * 1024 * 1024 + 321


@pytest.fixture
def bundle(nginx_repo: NginxRepo) -> tuple[bytes, str]:
    """An 8 MiB bundle file served at /b.patchd: its bytes and sha256."""
    data = os.urandom(SIZE)
    (nginx_repo.root / "b.patchd").write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def src_for(repo: NginxRepo, max_rate: int = 0) -> HttpSource:
    source = open_source(repo.url("manifest.json"), timeout=5.0, max_rate=max_rate)
    assert isinstance(source, HttpSource)
    return source


def bundle_requests(repo: NginxRepo) -> list[_nginx.LogLine]:
    return [r for r in repo.barrier() if r.path == "/b.patchd"]


async def cancelled_at(src: HttpSource, url: str, dest: Path, data: bytes, sha: str,
                       fraction: float) -> int:
    """Run a download and cancel it once ``fraction`` of the bytes are on disk."""
    with anyio.CancelScope() as scope:
        def progress(done: int, total: int) -> None:
            if done >= total * fraction:
                scope.cancel()
        await src.download(url, dest, size=len(data), sha256=sha, offset=0, progress=progress)
    assert scope.cancelled_caught, "the download finished before it could be cancelled"
    have = await anyio.Path(dest).read_bytes()
    assert data.startswith(have) and len(have) >= len(data) * fraction
    return len(have)


async def test_fresh_download(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                              tmp_path: Path) -> None:
    """A fresh download lands the exact bytes, reports progress up to the total, drops its meta."""
    data, sha = bundle
    dest = tmp_path / "cache" / "b.patchd"
    dest.parent.mkdir()
    seen: list[tuple[int, int]] = []
    async with src_for(nginx_repo) as src:
        url = src.resolve("b.patchd")
        assert url == nginx_repo.url("b.patchd")
        await src.download(url, dest, size=SIZE, sha256=sha, offset=0,
                           progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == data
    assert seen[-1] == (SIZE, SIZE) and seen == sorted(seen)
    assert not DownloadFiles.beside(dest).meta.exists()
    [req] = bundle_requests(nginx_repo)
    assert (req.status, req.range) == (200, "")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
async def test_resume_after_cancel(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                                   tmp_path: Path, fraction: float) -> None:
    """Cancelled mid-way, the partial is a prefix; the resume sends Range+If-Range and completes."""
    data, sha = bundle
    dest = tmp_path / "b.patchd"
    async with src_for(nginx_repo) as src:
        url = src.resolve("b.patchd")
        have = await cancelled_at(src, url, dest, data, sha, fraction)
        await src.download(url, dest, size=SIZE, sha256=sha, offset=have, progress=None)
    assert dest.read_bytes() == data
    _first, second = bundle_requests(nginx_repo)
    assert second.range == f"bytes={have}-" and second.status == 206
    assert second.if_range.startswith('"')  # nginx's strong ETag
    assert second.body_bytes == SIZE - have


@pytest.mark.parametrize("offset", [1, 65536, SIZE - 1])
async def test_resume_at_offsets(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                                 tmp_path: Path, offset: int) -> None:
    """A partial of any length (no meta: after a lost meta file) resumes with exactly the rest."""
    data, sha = bundle
    dest = tmp_path / "b.patchd"
    dest.write_bytes(data[:offset])
    async with src_for(nginx_repo) as src:
        await src.download(src.resolve("b.patchd"), dest, size=SIZE, sha256=sha,
                           offset=offset, progress=None)
    assert dest.read_bytes() == data
    [req] = bundle_requests(nginx_repo)
    assert (req.range, req.if_range, req.status) == (f"bytes={offset}-", "", 206)


async def test_if_range_changed_file_restarts(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                                              tmp_path: Path) -> None:
    """A partial of an older file (mirror lag) fails If-Range: nginx sends 200, we restart fresh."""
    old, _old_sha = bundle
    new = os.urandom(SIZE)
    new_sha = hashlib.sha256(new).hexdigest()  # the manifest already names the new file
    dest = tmp_path / "b.patchd"
    async with src_for(nginx_repo) as src:
        url = src.resolve("b.patchd")
        have = await cancelled_at(src, url, dest, old, new_sha, 0.5)
        path = nginx_repo.root / "b.patchd"
        path.write_bytes(new)  # the mirror catches up
        later = time.time() + 100
        os.utime(path, (later, later))
        await src.download(url, dest, size=SIZE, sha256=new_sha, offset=have, progress=None)
    assert dest.read_bytes() == new
    _first, second = bundle_requests(nginx_repo)
    assert second.range == f"bytes={have}-" and second.if_range and second.status == 200


async def test_partial_of_other_hash_restarts(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                                              tmp_path: Path) -> None:
    """A partial whose meta names another sha256 is not resumed: a plain GET starts fresh."""
    data, sha = bundle
    dest = tmp_path / "b.patchd"
    async with src_for(nginx_repo) as src:
        url = src.resolve("b.patchd")
        have = await cancelled_at(src, url, dest, data, "f" * 64, 0.3)
        await src.download(url, dest, size=SIZE, sha256=sha, offset=have, progress=None)
    assert dest.read_bytes() == data
    _first, second = bundle_requests(nginx_repo)
    assert (second.range, second.status) == ("", 200)


async def test_complete_file_not_requested(nginx_repo: NginxRepo, bundle: tuple[bytes, str],
                                           tmp_path: Path) -> None:
    """A complete, correct file on disk is verified locally: nginx sees no second request."""
    data, sha = bundle
    dest = tmp_path / "b.patchd"
    async with src_for(nginx_repo) as src:
        url = src.resolve("b.patchd")
        await src.download(url, dest, size=SIZE, sha256=sha, offset=0, progress=None)
        await src.download(url, dest, size=SIZE, sha256=sha, offset=SIZE, progress=None)
    assert dest.read_bytes() == data
    assert len(bundle_requests(nginx_repo)) == 1


async def test_bundle_404_is_bundle_not_found(nginx_repo: NginxRepo, tmp_path: Path) -> None:
    """A bundle missing on the server is BundleNotFound (transient) and leaves nothing behind."""
    dest = tmp_path / "b.patchd"
    async with src_for(nginx_repo) as src:
        with pytest.raises(BundleNotFound):
            await src.download(src.resolve("b.patchd"), dest, size=10, sha256="0" * 64,
                               offset=0, progress=None)
    assert not dest.exists() or dest.stat().st_size == 0


async def test_rate_limit(nginx_repo: NginxRepo, tmp_path: Path) -> None:
    """max_rate holds the transfer near the limit: 1 MiB at 2 MiB/s takes at least ~0.4 s."""
    data = os.urandom(1024 * 1024)
    (nginx_repo.root / "b.patchd").write_bytes(data)
    dest = tmp_path / "b.patchd"
    started = time.monotonic()
    async with src_for(nginx_repo, max_rate=2 * 1024 * 1024) as src:
        await src.download(src.resolve("b.patchd"), dest, size=len(data),
                           sha256=hashlib.sha256(data).hexdigest(), offset=0, progress=None)
    assert time.monotonic() - started >= 0.4
    assert dest.read_bytes() == data


async def test_manifest_conditional_get(nginx_repo: NginxRepo) -> None:
    """Manifest and .sig are fetched; with the validators back nginx answers 304 → None."""
    root = nginx_repo.root
    (root / "manifest.json").write_bytes(b'{"serial": 1}')
    (root / "manifest.json.sig").write_bytes(b'{"signatures": []}')
    async with src_for(nginx_repo) as src:
        got = await src.fetch_manifest(None)
        assert got is not None
        assert got.manifest == b'{"serial": 1}' and got.signature == b'{"signatures": []}'
        assert set(got.validators) == {"etag", "last_modified"}
        assert await src.fetch_manifest(got.validators) is None
        (root / "manifest.json").write_bytes(b'{"serial": 2}')
        later = time.time() + 100
        os.utime(root / "manifest.json", (later, later))
        again = await src.fetch_manifest(got.validators)
        assert again is not None and again.manifest == b'{"serial": 2}'
    statuses = [(r.path, r.status) for r in nginx_repo.barrier()]
    assert statuses == [("/manifest.json", 200), ("/manifest.json.sig", 200),
                        ("/manifest.json", 304),
                        ("/manifest.json", 200), ("/manifest.json.sig", 200)]


async def test_manifest_404_is_repository_error(nginx_repo: NginxRepo) -> None:
    """A missing manifest (or its signature) is a RepositoryError, a configuration problem."""
    async with src_for(nginx_repo) as src:
        with pytest.raises(RepositoryError, match="404"):
            await src.fetch_manifest(None)
        (nginx_repo.root / "manifest.json").write_bytes(b"{}")
        with pytest.raises(RepositoryError, match=r"\.sig"):
            await src.fetch_manifest(None)


async def test_manifest_over_cap_refused(nginx_repo: NginxRepo) -> None:
    """A manifest over 4 MiB is refused as ManifestInvalid from its Content-Length."""
    (nginx_repo.root / "manifest.json").write_bytes(b" " * (4 * 1024 * 1024 + 1))
    async with src_for(nginx_repo) as src:
        with pytest.raises(ManifestInvalid, match="larger than 4 MiB"):
            await src.fetch_manifest(None)


async def test_corrupt_partial_on_disk_is_fetched_again_at_once(
        nginx_repo: NginxRepo, bundle: tuple[bytes, str], tmp_path: Path) -> None:
    """A partial whose kept bytes are not a prefix of the bundle (a power cut kept a later
    write but lost an earlier one) fails the final hash after its resume; the same call
    then fetches the whole bundle again, instead of failing into a backoff."""
    data, sha = bundle
    dest = tmp_path / "b.patchd"
    half = SIZE // 2
    dest.write_bytes(bytes(4096) + data[4096:half])  # a hole where a lost write was
    async with src_for(nginx_repo) as src:
        await src.download(src.resolve("b.patchd"), dest, size=SIZE, sha256=sha,
                           offset=half, progress=None)
    assert dest.read_bytes() == data
    first, second = bundle_requests(nginx_repo)
    assert (first.range, first.status) == (f"bytes={half}-", 206)
    assert (second.range, second.status, second.body_bytes) == ("", 200, SIZE)
