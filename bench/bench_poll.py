"""Benchmark: what one poll of an unchanged repository costs on the wire, plain and TLS.

A real nginx (tests/support/nginx.py) serves a published manifest over HTTP and over
HTTPS (certificate from a private CA made by trustme, ``ca_file`` on the client). The
client is the daemon's: :class:`patchd.fetch.client.HttpClients` built from the
settings, an :class:`HttpSource` on it, ``fetch_manifest`` with the validators of the
previous poll. Between client and nginx sits a byte-counting TCP relay, so the figures
include TCP payload of TLS handshakes and records (not TCP/IP headers).

Two cases per scheme, ``--polls`` unchanged polls each:

- ``new connection``: the relay closes every connection after each poll, as a server's
  keep-alive timeout does between polls an hour apart: each poll pays one handshake;
- ``kept connection``: polls a few seconds apart reuse the connection: no handshake.

Targets: one request and at most one new connection (TLS handshake) per unchanged poll.

    .venv/bin/python bench/bench_poll.py
    .venv/bin/python bench/bench_poll.py --polls 5
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import anyio
from anyio.abc import SocketStream

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from common import emit  # noqa: E402


class Relay:
    """127.0.0.1:port → nginx, counting bytes both ways and connections accepted."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.bytes = 0
        self.connections = 0
        self.port = 0
        self._open: list[anyio.CancelScope] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        self.connections += 1
        with anyio.CancelScope() as scope:
            self._open.append(scope)
            async with (client, await anyio.connect_tcp("127.0.0.1", self.upstream) as server,
                        anyio.create_task_group() as tg):
                tg.start_soon(self._pipe, client, server)
                tg.start_soon(self._pipe, server, client)

    async def _pipe(self, src: SocketStream, dst: SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError):
            while True:
                data = await src.receive()
                self.bytes += len(data)
                await dst.send(data)

    def drop_connections(self) -> None:
        """What a server's keep-alive timeout does between two hourly polls."""
        for scope in self._open:
            scope.cancel()
        self._open.clear()


@contextlib.contextmanager
def repository(work: Path) -> Iterator[Path]:
    from support.daemon import Publisher, write_tree

    release = write_tree(work / "opt", {"bin/app": "r\n"}, version="1.4.0")
    target = write_tree(work / "t1", {"bin/app": "p1\n"}, version="1.4.0")
    pub = Publisher(work, work / "repo")
    pub.publish(pub.bundle("1.4.0", 1, release, target), expires=timedelta(days=30))
    yield work / "repo"


async def measure(url_port: int, scheme: str, relay: Relay, ca_file: str, polls: int,
                  drop: bool, nginx: object) -> tuple[float, float, float]:
    """(bytes, requests, new connections) per unchanged poll."""
    from patchd.fetch.client import HttpClients, TransportSettings
    from patchd.fetch.sources import HttpSource

    clients = HttpClients()
    settings = TransportSettings(timeout=10.0, ca_file=ca_file)
    src = HttpSource(f"{scheme}://127.0.0.1:{url_port}/manifest.json", timeout=10.0,
                     client=clients.get(settings))
    first = await src.fetch_manifest(None)
    assert first is not None
    if drop:
        relay.drop_connections()
        await anyio.sleep(0.1)  # the FIN reaches the client: the pool sees it closed
    start_bytes, start_conns = relay.bytes, relay.connections
    start_requests = len(nginx.barrier())  # type: ignore[attr-defined]
    for _ in range(polls):
        assert await src.fetch_manifest(first.validators) is None
        if drop:
            relay.drop_connections()
            await anyio.sleep(0.1)
    await clients.aclose()
    lines = nginx.barrier()  # type: ignore[attr-defined]
    requests = sum(not r.path.startswith("/.barrier") for r in lines[start_requests:])
    return ((relay.bytes - start_bytes) / polls, requests / polls,
            (relay.connections - start_conns) / polls)


async def run(args: argparse.Namespace, work: Path) -> None:
    import trustme

    from support.nginx import NginxTls, run_nginx

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    chain = work / "chain.pem"
    chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(work / "key.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    with repository(work) as repo, \
            run_nginx(repo, work / "plain") as plain, \
            run_nginx(repo, work / "tls", tls=NginxTls(chain, work / "key.pem")) as tls:
        figures: dict[str, tuple[float, float, float]] = {}
        for scheme, nginx, ca_file in (("http", plain, ""), ("https", tls, str(work / "ca.pem"))):
            for drop in (True, False):
                relay = Relay(nginx.port)
                async with anyio.create_task_group() as tg:
                    await tg.start(relay.serve)
                    figures[f"{scheme}_{'new' if drop else 'kept'}"] = await measure(
                        relay.port, scheme, relay, ca_file, args.polls, drop, nginx)
                    tg.cancel_scope.cancel()
    print(f"{'case':<12} {'bytes/poll':>10} {'requests':>9} {'handshakes':>10}")
    for name, (b, r, c) in figures.items():
        print(f"{name:<12} {b:>10.0f} {r:>9.2f} {c:>10.2f}")
    for name, (b, _, _) in figures.items():
        emit(f"poll_unchanged_bytes_{name}", round(b), "B", "report", True)
    worst_requests = max(r for _, r, _ in figures.values())
    emit("poll_unchanged_requests", worst_requests, "requests", "<= 1 per poll",
         worst_requests <= 1)
    new_tls = figures["https_new"][2]
    emit("poll_unchanged_tls_handshakes", new_tls, "handshakes", "<= 1 per poll", new_tls <= 1)
    kept = figures["https_kept"][2]
    emit("poll_unchanged_tls_handshakes_kept", kept, "handshakes", "0 on a kept connection",
         kept == 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-poll-") as tmp:
        anyio.run(run, args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
