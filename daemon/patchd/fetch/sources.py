"""Repository sources: where manifests and bundles come from (docs/formats.md).

A repository is static files, reached over HTTP(S) or in a local directory
(``file://`` URL or a plain path). Both kinds offer the same three operations:
resolve a bundle URL against the manifest URL, fetch the manifest and its signature
(conditionally), and download a bundle through the template of
:mod:`patchd.fetch.transfer` with their transport (:mod:`patchd.fetch.http`,
:mod:`patchd.fetch.local`).

One :class:`HttpSource` uses ONE :class:`patchd.fetch.client.RepoClient` for all its
requests (connection reuse, proxies from the environment via ``trust_env``; bundle
bodies through its bulk twin): the daemon's shared client (built once per transport
configuration), else one of its own that it closes; use it as ``async with``.

Root versions live at ``root/N.json`` (and ``.sig``) beside the manifest
(docs/formats.md#the-root-of-trust); one that cannot be fetched for a reason a retry
will not fix is a gap in the chain (:class:`RootVersionInvalid`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import anyio
import httpx
import structlog

from patchd.core.errors import RepositoryError, RootVersionInvalid
from patchd.fetch.client import RepoClient, TransportSettings, build_client
from patchd.fetch.http import HttpTransport, get_document
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.local import LocalTransport, local_path, read_capped
from patchd.fetch.pump import Progress

log = structlog.get_logger("patchd.fetch.sources")

#: The download knobs of a LocalSource made without a policy (open_source passes one).
LOCAL_POLICY = DownloadPolicy(stall_window=3600.0, stall_min_bytes=1)


@dataclass(frozen=True, slots=True)
class ManifestFetch:
    """A fetched manifest, its signature file, and the validators to persist."""

    manifest: bytes
    signature: bytes
    validators: dict[str, str]


class Source:
    """A repository; subclasses implement the operations. Use as ``async with``."""

    def __init__(self, manifest_url: str) -> None:
        self.manifest_url = manifest_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.manifest_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release connections; the default has nothing to release."""

    def resolve(self, url: str) -> str:
        raise NotImplementedError

    async def fetch_manifest(self, validators: dict[str, str] | None) -> ManifestFetch | None:
        """Manifest and signature, or None when unchanged since ``validators``."""
        raise NotImplementedError

    @staticmethod
    def root_name(version: int) -> str:
        """Where root ``version`` is, relative to the manifest (docs/formats.md)."""
        return f"root/{version}.json"

    async def fetch_root(self, version: int) -> tuple[bytes, bytes]:
        """Root ``version``'s document and signature file, unconditionally."""
        url = self.resolve(self.root_name(version))
        try:
            return await self._fetch_pair(url)
        except RepositoryError as exc:
            raise RootVersionInvalid(
                f"root version {version} cannot be fetched ({exc}); a gap in the chain"
            ) from exc

    async def _fetch_pair(self, url: str) -> tuple[bytes, bytes]:
        raise NotImplementedError

    async def download(
        self, url: str, dest: Path, *, size: int, sha256: str, offset: int,
        progress: Progress | None,
    ) -> None:
        """Bring ``url`` (already resolved) into ``dest``, verified and fsynced; the meta
        lives beside it (:meth:`patchd.state.layout.DownloadFiles.beside`)."""
        raise NotImplementedError


def open_source(
    manifest_url: str, *, timeout: float, max_rate: int = 0, min_rate: int = 0,
    document_deadline: float = 0.0, max_redirects: int = 5,
    policy: DownloadPolicy | None = None, client: RepoClient | None = None,
) -> Source:
    """The source for ``manifest_url``: HTTP(S), or local for ``file://`` and paths.

    ``timeout`` is the connect and between-bytes timeout; the stall window (also the
    window of ``min_rate``) defaults to twice it. ``document_deadline``: the most a
    manifest, signature or root may take in all (0: none). ``policy`` overrides the
    download knobs (tests use small stall values). ``client``: a shared HTTP client
    (not closed by the source).
    """
    scheme = urlsplit(manifest_url).scheme.lower()
    if policy is None:
        policy = DownloadPolicy(stall_window=max(2 * timeout, 1.0), max_rate=max_rate,
                                min_rate=min_rate, document_deadline=document_deadline)
    if scheme in ("http", "https"):
        return HttpSource(manifest_url, timeout=timeout, max_redirects=max_redirects,
                          policy=policy, client=client)
    if scheme in ("", "file"):
        return LocalSource(manifest_url, policy=policy)
    raise RepositoryError(f"unsupported URL scheme {scheme!r} in {manifest_url!r}; "
                          "use http://, https://, file:// or a path")


class HttpSource(Source):
    """A repository on an HTTP(S) server or CDN."""

    def __init__(
        self, manifest_url: str, *, timeout: float, max_redirects: int = 5,
        policy: DownloadPolicy | None = None, client: RepoClient | None = None,
    ) -> None:
        super().__init__(manifest_url)
        self.policy = policy or DownloadPolicy()
        # One limiter for the source, so the configured rate holds across downloads.
        self.limiter = RateLimiter(self.policy.max_rate)
        self._owns_client = client is None
        self.client = client if client is not None else build_client(
            TransportSettings(timeout=timeout, max_redirects=max_redirects))
        self.bundles = HttpTransport(self.client, self.policy, self.limiter)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    def resolve(self, url: str) -> str:
        return str(httpx.URL(self.manifest_url).join(url))

    async def fetch_manifest(self, validators: dict[str, str] | None) -> ManifestFetch | None:
        headers: dict[str, str] = {}
        if validators:
            if validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
        fetched = await get_document(self.client, self.manifest_url, headers, self.policy)
        if fetched is None:
            log.debug("manifest.not_modified", url=self.manifest_url)
            return None
        manifest, new_validators = fetched
        sig_url = self.manifest_url + ".sig"
        sig = await get_document(self.client, sig_url, {}, self.policy)
        assert sig is not None  # unconditional: never 304
        return ManifestFetch(manifest, sig[0], new_validators)

    async def _fetch_pair(self, url: str) -> tuple[bytes, bytes]:
        doc = await get_document(self.client, url, {}, self.policy)
        sig = await get_document(self.client, url + ".sig", {}, self.policy)
        assert doc is not None and sig is not None  # unconditional: never 304
        return doc[0], sig[0]

    async def download(
        self, url: str, dest: Path, *, size: int, sha256: str, offset: int,
        progress: Progress | None,
    ) -> None:
        await self.bundles.download(url, dest, size=size, sha256=sha256, offset=offset,
                                    progress=progress)


class LocalSource(Source):
    """A repository in a local directory (a mounted USB stick, an NFS share, tests)."""

    def __init__(self, manifest_url: str, *, policy: DownloadPolicy | None = None) -> None:
        super().__init__(manifest_url)
        self.manifest_path = local_path(manifest_url).absolute()
        self.bundles = LocalTransport(policy or LOCAL_POLICY)

    def resolve(self, url: str) -> str:
        if urlsplit(url).scheme:
            return str(local_path(url))
        return str(self.manifest_path.parent / url)

    async def fetch_manifest(self, validators: dict[str, str] | None) -> ManifestFetch | None:
        manifest = await anyio.to_thread.run_sync(read_capped, self.manifest_path)
        sig_path = self.manifest_path.with_name(self.manifest_path.name + ".sig")
        signature = await anyio.to_thread.run_sync(read_capped, sig_path)
        # A content hash as the ETag is exact where mtimes are coarse (FAT on a stick).
        etag = '"' + hashlib.sha256(manifest + b"\0" + signature).hexdigest()[:32] + '"'
        if validators and validators.get("etag") == etag:
            return None
        return ManifestFetch(manifest, signature, {"etag": etag})

    async def _fetch_pair(self, url: str) -> tuple[bytes, bytes]:
        path = Path(url)
        doc = await anyio.to_thread.run_sync(read_capped, path)
        sig = await anyio.to_thread.run_sync(read_capped, path.with_name(path.name + ".sig"))
        return doc, sig

    async def download(
        self, url: str, dest: Path, *, size: int, sha256: str, offset: int,
        progress: Progress | None,
    ) -> None:
        await self.bundles.download(str(local_path(url)), dest, size=size, sha256=sha256,
                                    offset=offset, progress=progress)
