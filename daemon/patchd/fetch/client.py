"""The HTTP client: built once per transport configuration, shared by every request.

Building an ``httpx.AsyncClient`` means building an SSL context, and loading the
system's CA store into one costs 0.3–0.8 s of CPU on a small host. So a client is made
once per :class:`TransportSettings` and reused: across polls, across config reloads
that leave the transport alone, and between the repository and the events POST. Within
one check the manifest, its signature, root versions and the bundle all go through it,
so they share its keep-alive connection (one TLS handshake).

Bundle bodies go through its twin, the bulk client (:meth:`RepoClient.bulk`): httpx's
synchronous client, built from the same settings and the same SSL context, used from
worker threads (:mod:`patchd.fetch.wire`), so that the event loop never handles a
bundle's bytes. A bundle therefore has a connection of its own, with the same TLS,
certificates, headers and proxy as the control traffic's.

What the settings mean (docs/config.md#server):

- ``ca_file`` **replaces** the system store: a private repository's certificate is
  checked against that CA only, so a public CA cannot vouch for an impostor;
- ``client_cert``/``client_key``: mutual TLS;
- ``headers``: extra headers (``Authorization``) read from ``headers_file`` by the
  config loader, sent with every request;
- ``proxy``: an explicit proxy; without it the environment's ``HTTPS_PROXY``/
  ``NO_PROXY`` apply as before;
- a redirect from ``https://`` to ``http://`` is refused (:class:`RedirectRefused`):
  whatever the plain-text hop returns (or the token it would carry) is exposed.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import structlog

from patchd import __version__
from patchd.config import ServerSection
from patchd.core.errors import RedirectRefused, TransportConfigError

__all__ = ["USER_AGENT", "HttpClients", "RepoClient", "TransportSettings", "build_client"]

log = structlog.get_logger("patchd.fetch.client")

USER_AGENT = f"patchd/{__version__}"


def _fingerprint(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class TransportSettings:
    """Everything a client is built from; equal settings share one client."""

    timeout: float
    max_redirects: int = 5
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    proxy: str = ""
    #: (path, mtime, size) of the certificate files: a renewed certificate on disk
    #: and a reload give a new client, an untouched one keeps the old.
    files: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def from_config(cls, server: ServerSection, max_redirects: int = 5) -> TransportSettings:
        paths = [p for p in (server.ca_file, server.client_cert, server.client_key) if p]
        return cls(timeout=server.timeout, max_redirects=max_redirects,
                   ca_file=server.ca_file, client_cert=server.client_cert,
                   client_key=server.client_key, headers=server.headers, proxy=server.proxy,
                   files=tuple(_fingerprint(p) for p in paths))


def ssl_context(settings: TransportSettings) -> ssl.SSLContext:
    """The context that checks the server (and shows our certificate, for mTLS)."""
    try:
        if settings.ca_file:
            ctx = ssl.create_default_context(cafile=settings.ca_file)
        else:
            ctx = httpx.create_ssl_context(trust_env=True)
        if settings.client_cert:
            ctx.load_cert_chain(settings.client_cert, settings.client_key or None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TransportConfigError(f"TLS settings unusable: {exc}") from exc
    return ctx


def _downgrade(response: httpx.Response) -> RedirectRefused | None:
    request = response.request
    if not response.has_redirect_location or request.url.scheme != "https":
        return None
    target = request.url.join(response.headers["location"])
    if target.scheme != "https":
        return RedirectRefused(f"{request.url}: redirected to {target}, from https to "
                               f"{target.scheme}; refused (fix the server or the URL)")
    return None


async def _refuse_downgrade(response: httpx.Response) -> None:
    """Response hook: httpx calls it for every hop, before following a redirect."""
    refused = _downgrade(response)
    if refused is not None:
        raise refused


def _refuse_downgrade_sync(response: httpx.Response) -> None:
    """The same hook for the bulk client."""
    refused = _downgrade(response)
    if refused is not None:
        raise refused


async def _finish_not_modified(response: httpx.Response) -> None:
    """Response hook: a 304 has no body by definition (h11 reads none), but unless it
    is read the connection is not known to be idle and is closed, so the next poll
    would pay a new TCP and TLS handshake. Reading it returns it to the pool."""
    if response.status_code == 304:
        await response.aread()


def _client_args(settings: TransportSettings, ctx: ssl.SSLContext) -> dict[str, Any]:
    """What the control client and the bulk client share: everything but the hooks."""
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    headers.update(dict(settings.headers))
    timeout = settings.timeout
    return {
        "http2": False,
        "follow_redirects": True,
        "max_redirects": settings.max_redirects,
        "timeout": httpx.Timeout(connect=timeout, read=timeout, write=timeout, pool=timeout),
        "trust_env": True,
        "verify": ctx,
        "proxy": settings.proxy or None,
        "headers": headers,
    }


class RepoClient(httpx.AsyncClient):
    """The client of one transport configuration: async for manifests, signatures,
    roots and events, with the bulk client for bundle bodies beside it."""

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self._ssl = ssl_context(settings)
        super().__init__(**_client_args(settings, self._ssl),
                         event_hooks={"response": [_refuse_downgrade, _finish_not_modified]})
        self._bulk: httpx.Client | None = None

    def bulk(self) -> httpx.Client:
        """The synchronous twin for worker threads (built on first use, then kept)."""
        if self._bulk is None:
            self._bulk = httpx.Client(**_client_args(self.settings, self._ssl),
                                      event_hooks={"response": [_refuse_downgrade_sync]})
        return self._bulk

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            bulk, self._bulk = self._bulk, None
            if bulk is not None:
                bulk.close()


def build_client(settings: TransportSettings) -> RepoClient:
    """A new client for ``settings`` (costly: see the module's docstring)."""
    return RepoClient(settings)


class HttpClients:
    """The daemon's client: one per transport configuration, replaced when it changes.

    A replaced client is closed by :meth:`close_retired`, once its users (the old
    source, the event sender) have let go of it.
    """

    def __init__(self) -> None:
        self._settings: TransportSettings | None = None
        self._client: RepoClient | None = None
        self._retired: list[RepoClient] = []
        #: How many clients were built (tests and the bench prove reuse with it).
        self.built = 0

    def __repr__(self) -> str:
        return f"<HttpClients built={self.built} {self._settings!r}>"

    def get(self, settings: TransportSettings) -> RepoClient:
        """The client for ``settings``: the current one if they did not change."""
        if self._client is None or settings != self._settings:
            client = build_client(settings)
            if self._client is not None:
                self._retired.append(self._client)
            self._client, self._settings = client, settings
            self.built += 1
            log.debug("http.client_built", settings=repr(settings), count=self.built)
        return self._client

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for client in retired:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await client.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            self._retired.append(self._client)
            self._client = self._settings = None
        await self.close_retired()
