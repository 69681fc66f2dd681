"""A repository on the misbehaving server, and a real daemon that trusts it.

The hardening tests (``tests/e2e/test_hardening_*.py``) stage what a hostile or broken
repository serves (files by path, or a scripted route) and run the real ``patchd run``
against it; builders for signed manifests and bundles come from :mod:`support.attacks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patchd.trust.signing import format_public_key, public_raw
from support.attacks import (
    bundle_bytes,
    bundle_ref,
    file_op,
    header_doc,
    manifest_doc,
    sign,
    signed_members,
)
from support.badserver import BadServer, Conn, Request
from support.daemon import DaemonProcess, write_tree
from support.trees import new_key

RELEASE = "1.4.0"
Route = Callable[[Request, Conn], object]


@dataclass
class HostileRepo:
    """What the bad server serves: ``files`` by path, else ``routes`` by path, else 404."""

    tmp: Path
    server: BadServer
    key: Ed25519PrivateKey = field(default_factory=new_key)
    files: dict[str, bytes] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    serial: int = 0

    def __post_init__(self) -> None:
        self.server.handler = self.handle

    @property
    def public(self) -> str:
        return format_public_key(public_raw(self.key))

    def handle(self, req: Request, conn: Conn) -> object:
        route = self.routes.get(req.path)
        if route is not None:
            return route(req, conn)
        body = self.files.get(req.path)
        return conn.respond(404) if body is None else conn.respond(200, body)

    def url(self, path: str) -> str:
        return self.server.url(path)

    def bundle(self, patch: int, text: str | None = None, keys: list[Any] | None = None,
               **fields: Any) -> bytes:
        """A signed bundle of patch ``patch`` writing ``lib/p{patch}.txt``."""
        data = (text or f"patch {patch}\n").encode()
        doc = header_doc([file_op(f"lib/p{patch}.txt", data, 0)], release=RELEASE,
                         patch=patch, **fields)
        members = signed_members(doc, keys or [self.key], [data])
        return bundle_bytes(self.tmp / f"craft-{time.monotonic_ns()}", members)

    def publish(self, patches: list[tuple[int, list[dict[str, Any]]]],
                sig: bytes | None = None) -> None:
        """A manifest listing ``patches`` with a fresh serial, signed unless ``sig``."""
        self.serial += 1
        data, good = sign(manifest_doc(serial=self.serial, release=RELEASE,
                                       patches=patches), [self.key])
        self.files["/manifest.json"] = data
        self.files["/manifest.json.sig"] = good if sig is None else sig

    def ref(self, path: str, data: bytes) -> dict[str, Any]:
        """A manifest entry naming ``data`` (its size and sha256) served at ``path``."""
        return bundle_ref(self.url(path), data)


def start_daemon(tmp: Path, repo: HostileRepo, extra: str = "",
                 env: dict[str, str] | None = None, start: bool = True) -> DaemonProcess:
    """A real daemon on a fresh release tree, trusting ``repo.key``."""
    release = tmp / "opt" / "kiosk"
    if not release.exists():
        write_tree(release, {"bin/kiosk": "#!/bin/sh\n", "lib/app.txt": "app\n"},
                   version=RELEASE)
    d = DaemonProcess(tmp / "d", manifest_url=repo.url("/manifest.json"), keys=[repo.public],
                      release_dir=release,
                      extra='[server]\ntimeout = "2s"\n[install]\nmin_free = "0"\n' + extra,
                      env=env)
    if start:
        d.start()
    return d


def log_events(d: DaemonProcess, event: str | None = None) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (those with ``event`` when given)."""
    out = []
    for line in d.log().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and (event is None or obj.get("event") == event):
            out.append(obj)
    return out


def wait_event(d: DaemonProcess, event: str, timeout: float = 30,
               where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
    """The first log line of ``event`` satisfying ``where`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log_events(d, event):
            if where(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"{event!r} never logged:\n{d.log()[-6000:]}")
        time.sleep(0.05)


def hostile_world(tmp: Path) -> Iterator[HostileRepo]:
    """A started bad server with a repository on it (closed afterwards)."""
    server = BadServer()
    server.start()
    try:
        yield HostileRepo(tmp, server)
    finally:
        server.close()
