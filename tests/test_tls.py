"""Authenticated transport against a real nginx with TLS: CAs, client certificates,
bearer tokens, redirects, resume, and one client (one control connection, and bundle
bodies over the bulk client's own) per configuration.

Certificates are made at test time with trustme; the client is built from a real
config (``[server]`` keys) exactly as the daemon builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from patchd.config import config_from_dict
from patchd.core.errors import ConfigErrors, NetworkError, RedirectRefused, RepositoryError
from patchd.fetch.client import USER_AGENT, HttpClients, TransportSettings
from patchd.fetch.sources import HttpSource, open_source
from support.nginx import NGINX, NginxRepo, NginxTls, run_nginx

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60),
              pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx not installed")]

TOKEN = "Bearer s3cret-token"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _write(path: Path, blob: Any) -> Path:
    blob.write_to_path(str(path))
    return path


@contextlib.contextmanager
def serve(tmp_path: Path, ca: trustme.CA, *, identities: tuple[str, ...] = ("127.0.0.1",),
          expired: bool = False, client_ca: trustme.CA | None = None,
          location: str = "") -> Iterator[NginxRepo]:
    """nginx over HTTPS with a certificate from ``ca``, serving manifest and a bundle."""
    root = tmp_path / "repo"
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_bytes(b'{"serial": 1}\n')
    (root / "manifest.json.sig").write_bytes(b'{"signatures": []}\n')
    now = datetime.now(UTC)
    leaf = ca.issue_cert(*identities, not_before=now - timedelta(days=10) if expired else None,
                         not_after=now - timedelta(days=1) if expired else None)
    chain = tmp_path / "server-chain.pem"
    chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key = _write(tmp_path / "server.key", leaf.private_key_pem)
    tls = NginxTls(chain, key)
    if client_ca is not None:
        client = client_ca.issue_cert("host-1.fleet.example")
        cert = _write(tmp_path / "client.pem", client.cert_chain_pems[0])
        ckey = _write(tmp_path / "client.key", client.private_key_pem)
        tls = NginxTls(chain, key, _write(tmp_path / "client-ca.pem", client_ca.cert_pem),
                       cert, ckey)
    with run_nginx(root, tmp_path / "nginx", tls=tls, location=location) as repo:
        yield repo


def settings(tmp_path: Path, **server: str) -> TransportSettings:
    """The transport a daemon with these ``[server]`` keys would use."""
    config = config_from_dict({
        "app": {"name": "kiosk", "release_dir": str(tmp_path)},
        "server": {"manifest_url": "https://127.0.0.1/manifest.json", "timeout": "5s",
                   **server},
        "trust": {"keys": ["ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="]},
    })
    return TransportSettings.from_config(config.server)


def ca_file(tmp_path: Path, ca: trustme.CA, name: str = "ca.pem") -> str:
    return str(_write(tmp_path / name, ca.cert_pem))


def source(repo: NginxRepo, clients: HttpClients, s: TransportSettings) -> HttpSource:
    src = open_source(repo.url("manifest.json"), timeout=5.0, client=clients.get(s))
    assert isinstance(src, HttpSource)
    return src


async def fetch(repo: NginxRepo, s: TransportSettings) -> bytes:
    clients = HttpClients()
    try:
        async with source(repo, clients, s) as src:
            fetched = await src.fetch_manifest(None)
            assert fetched is not None
            return fetched.manifest
    finally:
        await clients.aclose()


async def test_private_ca_fetches_documents_on_one_connection_and_the_bundle_on_its_own(
        tmp_path: Path, ca: trustme.CA) -> None:
    """With ca_file, manifest and signature share one TLS connection; the bundle's body
    comes over the bulk client's own connection (read off its socket in a thread)."""
    data = os.urandom(1024 * 1024)
    with serve(tmp_path, ca) as repo:
        (repo.root / "b.patchd").write_bytes(data)
        clients = HttpClients()
        async with source(repo, clients, settings(tmp_path, ca_file=ca_file(tmp_path, ca))) as src:
            fetched = await src.fetch_manifest(None)
            assert fetched is not None and fetched.manifest == b'{"serial": 1}\n'
            dest = tmp_path / "b.patchd"
            await src.download(src.resolve("b.patchd"), dest, size=len(data),
                               sha256=hashlib.sha256(data).hexdigest(), offset=0, progress=None)
            assert dest.read_bytes() == data
        await clients.aclose()
        lines = repo.barrier()
        assert [r.path for r in lines] == ["/manifest.json", "/manifest.json.sig", "/b.patchd"]
        assert lines[0].connection == lines[1].connection != lines[2].connection


async def test_bundle_connection_has_the_control_traffics_certificate_and_token(
        tmp_path: Path, ca: trustme.CA) -> None:
    """The bulk client that carries bundle bodies is built from the same settings: with
    a client certificate and a token nginx demands, a bundle downloads; without the
    token it is refused like the manifest would be."""
    data = os.urandom(3 * 1024 * 1024 + 5)
    sha = hashlib.sha256(data).hexdigest()
    fleet = trustme.CA()
    check = f'if ($http_authorization != "{TOKEN}") {{ return 401; }}'
    with serve(tmp_path, ca, client_ca=fleet, location=check) as repo:
        assert repo.tls is not None and repo.tls.client_cert is not None
        (repo.root / "b.patchd").write_bytes(data)
        headers = tmp_path / "headers"
        headers.write_text(f"Authorization: {TOKEN}\n")
        headers.chmod(0o600)
        mtls = {"ca_file": ca_file(tmp_path, ca), "client_cert": str(repo.tls.client_cert),
                "client_key": str(repo.tls.client_key)}
        dest = tmp_path / "b.patchd"
        clients = HttpClients()
        try:
            for s, token in ((settings(tmp_path, **mtls), False),
                             (settings(tmp_path, headers_file=str(headers), **mtls), True)):
                async with source(repo, clients, s) as src:
                    download = src.download(src.resolve("b.patchd"), dest, size=len(data),
                                            sha256=sha, offset=0, progress=None)
                    if not token:
                        with pytest.raises(RepositoryError, match="server answered 401"):
                            await download
                    else:
                        await download
        finally:
            await clients.aclose()
        assert dest.read_bytes() == data
        assert [r.status for r in repo.barrier() if r.path == "/b.patchd"] == [401, 200]


async def test_unchanged_poll_is_one_request_without_a_new_handshake(tmp_path: Path,
                                                                     ca: trustme.CA) -> None:
    """Unchanged polls are one 304 each, all on the first poll's TLS connection."""
    with serve(tmp_path, ca) as repo:
        clients = HttpClients()
        async with source(repo, clients, settings(tmp_path, ca_file=ca_file(tmp_path, ca))) as src:
            first = await src.fetch_manifest(None)
            assert first is not None
            before = len(repo.barrier())
            assert await src.fetch_manifest(first.validators) is None
            assert await src.fetch_manifest(first.validators) is None
        await clients.aclose()
        lines = repo.barrier()
        polls = [r for r in lines[before:] if not r.path.startswith("/.barrier")]
        assert [(r.path, r.status) for r in polls] == [("/manifest.json", 304)] * 2
        assert {r.connection for r in polls} == {lines[0].connection}  # a 304 keeps it


async def test_system_store_refuses_a_private_ca(tmp_path: Path, ca: trustme.CA) -> None:
    """Without ca_file a private CA is unknown: the error names the issuer problem."""
    with (serve(tmp_path, ca) as repo,
          pytest.raises(RepositoryError, match="unable to get local issuer certificate")):
        await fetch(repo, settings(tmp_path))


async def test_wrong_ca_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    """ca_file replaces the system store: a certificate from another CA is refused."""
    with serve(tmp_path, ca) as repo:
        other = ca_file(tmp_path, trustme.CA(), "other-ca.pem")
        with pytest.raises(RepositoryError, match="certificate verify failed"):
            await fetch(repo, settings(tmp_path, ca_file=other))


async def test_hostname_mismatch_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    """A certificate for another name is refused, and the error says mismatch."""
    with (serve(tmp_path, ca, identities=("repo.example",)) as repo,
          pytest.raises(RepositoryError, match="mismatch, certificate is not valid for")):
        await fetch(repo, settings(tmp_path, ca_file=ca_file(tmp_path, ca)))


async def test_expired_certificate_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    """An expired server certificate is refused, and the error says expired."""
    with (serve(tmp_path, ca, expired=True) as repo,
          pytest.raises(RepositoryError, match="certificate has expired")):
        await fetch(repo, settings(tmp_path, ca_file=ca_file(tmp_path, ca)))


async def test_mutual_tls_needs_the_client_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    """With ssl_verify_client on, only a host showing its certificate gets the manifest."""
    fleet = trustme.CA()
    with serve(tmp_path, ca, client_ca=fleet) as repo:
        assert repo.tls is not None and repo.tls.client_cert is not None
        with pytest.raises(RepositoryError, match="server answered 400"):
            await fetch(repo, settings(tmp_path, ca_file=ca_file(tmp_path, ca)))
        good = settings(tmp_path, ca_file=ca_file(tmp_path, ca),
                        client_cert=str(repo.tls.client_cert),
                        client_key=str(repo.tls.client_key))
        assert await fetch(repo, good) == b'{"serial": 1}\n'


async def test_bearer_token_from_headers_file(tmp_path: Path, ca: trustme.CA) -> None:
    """nginx demanding a bearer token serves only a host with the headers file."""
    check = f'if ($http_authorization != "{TOKEN}") {{ return 401; }}'
    with (serve(tmp_path, ca, location=check) as repo,
          pytest.raises(RepositoryError, match="server answered 401")):
        await fetch(repo, settings(tmp_path, ca_file=ca_file(tmp_path, ca)))
        headers = tmp_path / "headers"
        headers.write_text(f"# the fleet's token\nAuthorization: {TOKEN}\n")
        headers.chmod(0o600)
        good = settings(tmp_path, ca_file=ca_file(tmp_path, ca), headers_file=str(headers))
        assert await fetch(repo, good) == b'{"serial": 1}\n'


def test_headers_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A token file group or others may read is refused, naming its mode."""
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: {TOKEN}\n")
    headers.chmod(0o644)
    with pytest.raises(ConfigErrors, match=r"server.headers_file: .* readable by group or "
                                           r"others \(mode 0644\)"):
        settings(tmp_path, headers_file=str(headers))


async def test_redirect_to_plain_http_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    """An https repository redirecting to http:// is refused, not followed."""
    with (serve(tmp_path, ca, location="return 302 http://127.0.0.1:9/manifest.json;") as repo,
          pytest.raises(RedirectRefused, match="from https to http; refused")):
        await fetch(repo, settings(tmp_path, ca_file=ca_file(tmp_path, ca)))


async def test_resume_over_tls(tmp_path: Path, ca: trustme.CA) -> None:
    """A download cancelled half-way resumes with a 206 over TLS, as over plain HTTP."""
    data = os.urandom(8 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    with serve(tmp_path, ca) as repo:
        (repo.root / "b.patchd").write_bytes(data)
        dest = tmp_path / "b.patchd"
        clients = HttpClients()
        async with source(repo, clients, settings(tmp_path, ca_file=ca_file(tmp_path, ca))) as src:
            url = src.resolve("b.patchd")
            with anyio.CancelScope() as scope:
                def progress(done: int, total: int) -> None:
                    if done >= total // 2:
                        scope.cancel()
                await src.download(url, dest, size=len(data), sha256=sha, offset=0,
                                   progress=progress)
            have = dest.stat().st_size
            assert 0 < have < len(data)
            await src.download(url, dest, size=len(data), sha256=sha, offset=have, progress=None)
        await clients.aclose()
        assert dest.read_bytes() == data
        got = [r for r in repo.barrier() if r.path == "/b.patchd"]
        assert [r.status for r in got] == [200, 206]
        assert got[1].range == f"bytes={have}-"


def test_one_client_per_transport_configuration(tmp_path: Path, ca: trustme.CA) -> None:
    """Equal settings (a reload that changed nothing) reuse the client; a change builds one."""
    clients = HttpClients()
    pem = ca_file(tmp_path, ca)
    first = clients.get(settings(tmp_path, ca_file=pem))
    assert clients.get(settings(tmp_path, ca_file=pem)) is first
    assert clients.built == 1
    assert first.headers["user-agent"] == USER_AGENT
    assert clients.get(settings(tmp_path)) is not first
    assert clients.built == 2
    anyio.run(clients.aclose)


async def test_a_broken_record_mid_body_keeps_every_byte_before_it(
        tmp_path: Path, ca: trustme.CA) -> None:
    """A TLS server whose connection breaks mid-body (garbage where the next record
    belongs: a fault nginx cannot make, so a hand-written server) ends the download
    with a NetworkError, and every byte of the good records before it is on disk: the
    receive loop hands over what it read before the error, then raises it."""
    good = os.urandom(300_000)
    total = len(good) + 1_000_000
    leaf = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sent = threading.Event()

    def serve_once() -> None:
        raw, _ = listener.accept()
        with server_ctx.wrap_socket(raw, server_side=True) as conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
            conn.sendall(good)
            # A record header announcing 16 KiB of application data, then noise: the
            # client's decryption fails there, after the good records.
            # (socket.socket's own sendall: bytes past the TLS layer, on its socket)
            socket.socket.sendall(conn, b"\x17\x03\x03\x40\x00" + os.urandom(16384))
            sent.set()
            with contextlib.suppress(OSError):
                socket.socket.recv(conn, 1)  # until the client gives up

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    clients = HttpClients()
    dest = tmp_path / "b.patchd"
    try:
        url = f"https://127.0.0.1:{port}/b.patchd"
        src = open_source(url, timeout=5.0,
                          client=clients.get(settings(tmp_path, ca_file=ca_file(tmp_path, ca))))
        async with src:
            with pytest.raises(NetworkError, match="SSL"):
                await src.download(url, dest, size=total, sha256="0" * 64, offset=0,
                                   progress=None)
    finally:
        await clients.aclose()
        listener.close()
        thread.join(timeout=5)
    assert sent.is_set()
    assert dest.read_bytes() == good
