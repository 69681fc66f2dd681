"""A repository in a local directory: paths from URLs, capped reads, the bundle transport.

A local file has no validators and always continues at the offset asked for, so
:class:`LocalTransport` resumes any partial as it is; everything else (size cap, stall
rule, hashing, what is discarded) is the download template's, as for HTTP.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import anyio

from patchd.core.errors import BundleNotFound, DownloadTruncated, ManifestInvalid, RepositoryError
from patchd.fetch.limits import DownloadPolicy, RateLimiter
from patchd.fetch.partial import Validators
from patchd.fetch.pump import Body
from patchd.fetch.transfer import Stream, Transport
from patchd.trust.manifest import MAX_DOCUMENT_BYTES


def local_path(url: str) -> Path:
    """The path a ``file://`` URL or a plain path names (RepositoryError otherwise)."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise RepositoryError(f"file URL with a remote host is not supported: {url!r}")
        return Path(unquote(parts.path))
    if parts.scheme:
        raise RepositoryError(f"a local repository cannot serve {url!r}")
    return Path(url)


def read_capped(path: Path) -> bytes:
    """A whole document (manifest, signature), refused past MAX_DOCUMENT_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise RepositoryError(f"{path}: not found in the local repository") from exc
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ManifestInvalid(f"{path} is larger than 4 MiB; refused")
    return data


class _FileBody(Body):
    """A local file from an offset, read from the pump's receive thread."""

    def __init__(self, f: io.FileIO | None) -> None:
        super().__init__()
        self._file = f

    def _read(self, view: memoryview, timeout: float) -> int | None:
        if self._file is None:
            return 0
        return self._file.readinto(view)

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()


def _open_at(path: Path, offset: int) -> _FileBody:
    f = io.FileIO(path, "rb")
    try:
        f.seek(offset)
    except BaseException:
        f.close()
        raise
    return _FileBody(f)


class LocalTransport(Transport):
    """Bundles copied from local files; ``url`` is the file's path (see :func:`local_path`)."""

    validated: ClassVar[bool] = False
    quiet: ClassVar[bool] = True

    def __init__(self, policy: DownloadPolicy) -> None:
        super().__init__(policy, RateLimiter(0))

    async def _check(self, url: str) -> None:
        src = Path(url)
        if not await anyio.to_thread.run_sync(src.is_file):
            raise BundleNotFound(f"{src}: no such bundle in the local repository", status=404)

    @contextlib.asynccontextmanager
    async def _open(
        self, url: str, offset: int, size: int, origin: Validators,
    ) -> AsyncIterator[Stream | None]:
        # Nothing left to copy (a zero-byte bundle): the source is not even opened.
        body = (await anyio.to_thread.run_sync(_open_at, Path(url), offset)
                if offset < size else _FileBody(None))
        try:
            yield Stream(body, resumed=True)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(body.close)

    def _truncated(self, url: str, done: int, size: int) -> DownloadTruncated:
        return DownloadTruncated(f"{url}: {done} bytes, manifest says {size}")
