"""Attack campaign: the real daemon refuses every update-security attack we can stage.

Threat classes after TUF's list (arbitrary install, rollback, indefinite freeze,
endless data, mix-and-match, wrong app/channel, slow retrieval, malicious mirror,
path traversal and link tricks, untrusted keys, threshold not met). Each case stages
hostile repository contents, triggers ``CheckNow`` on a running ``patchd run`` and
proves, for that case alone:

- the refusal is the specific one expected: the error class and message in the
  daemon's JSON log (and in the ``UpdateFailed`` reply for manifest refusals);
- nothing was installed: no tree for the build, ``pointers.json`` byte-identical,
  no staging left, the release tree and a canary directory outside the state
  untouched, nothing else in the state directory changed;
- the tombstone policy of docs/lifecycle.md: signed bytes that are bad (signature,
  invalid bundle) mark the build ``bad`` with the matching reason; bytes that are not
  the signed size and sha256, and slow retrieval, are transient (no tombstone);
  manifest refusals change nothing, not even the accepted serial;
- the daemon still serves (GetStatus right after) and, at the end, still installs a
  legitimate patch in every arena.

Three daemons ("arenas") share one nginx, one misbehaving server and one release:
``main`` (repository on nginx, ``[server] timeout = "1s"``), ``threshold`` (two
trusted keys, threshold 2) and ``mirror`` (manifest served by the scriptable
:class:`BadServer`, for endless and trickled manifests). Cases stay independent: each
stages its own patch number and a fresh, higher manifest serial.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.trust.signing import format_public_key, public_raw
from patchd.varlink import ProtocolError, VarlinkError
from support.attacks import (
    RepoWriter,
    bundle_bytes,
    bundle_ref,
    dup_sig_file,
    file_op,
    foreign_arch,
    header_doc,
    manifest_doc,
    sign,
    signed_members,
    tar_member,
)
from support.badserver import BadServer, Conn, Request
from support.daemon import DaemonProcess, state_of, write_tree
from support.nginx import NGINX, run_nginx
from support.trees import new_key, snapshot

RELEASE = "1.4.0"
MIB = 1024 * 1024
REPORT: dict[str, str] = {}

Stage = Callable[["Ctx"], None]


# --- the world ------------------------------------------------------------------------


@dataclass
class Arena:
    """One daemon and where its repository lives (an nginx dir, or the bad server)."""

    name: str
    d: DaemonProcess
    sign_keys: list[Any]
    repo: RepoWriter | None = None          # nginx-served directory
    base_url: str = ""                      # URL of that directory / of the mirror
    mirror_prefix: str = ""                 # path prefix on the bad server

    def __repr__(self) -> str:
        return f"Arena({self.name!r}, serial={self.accepted_serial()})"

    def accepted_serial(self) -> int:
        client = json.loads((self.d.state_dir / "client.json").read_text())
        return int(client.get("channels", {}).get("stable", {}).get("manifest_serial") or 0)


@dataclass
class World:
    tmp: Path
    release_dir: Path
    canary: Path
    bad: BadServer
    key: Any                 # trusted by every arena
    key2: Any                # trusted by the threshold arena only
    other: Any               # trusted by nobody
    arenas: dict[str, Arena] = field(default_factory=dict)
    bad_files: dict[str, bytes] = field(default_factory=dict)
    bad_routes: dict[str, Callable[[Request, Conn], object]] = field(default_factory=dict)
    bad_sent: dict[str, int] = field(default_factory=dict)
    #: Set at the end of every case: trickling handlers then reset their connection.
    abort: threading.Event = field(default_factory=threading.Event)
    patch: int = 1

    def next_patch(self) -> int:
        self.patch += 1
        return self.patch

    def handle(self, req: Request, conn: Conn) -> object:
        route = self.bad_routes.get(req.path)
        if route is not None:
            return route(req, conn)
        body = self.bad_files.get(req.path)
        if body is None:
            return conn.respond(404)
        return conn.respond(200, body)


@dataclass
class Ctx:
    """What a case's stage function gets: its arena, patch number and helpers."""

    world: World
    arena: Arena
    patch: int
    release: str = RELEASE
    serial: int = 0

    @property
    def tree(self) -> Path:
        return self.arena.d.state_dir / "builds" / self.release / str(self.patch) / "tree"

    def rel_to_canary(self, inside: str = "") -> str:
        """A relative path from ``tree/inside`` to the canary directory."""
        return os.path.relpath(self.world.canary, self.tree / inside)

    def members(self, ops: list[dict[str, Any]] | None = None,
                payloads: list[bytes] | None = None, keys: list[Any] | None = None,
                **fields: Any) -> list[Any]:
        """Signed members of a bundle for this case's build (override anything)."""
        if ops is None:
            data = f"patch {self.patch}\n".encode()
            ops, payloads = [file_op(f"lib/attack-{self.patch}.txt", data, 0)], [data]
        fields = {"release": self.release, "patch": self.patch, **fields}
        return signed_members(header_doc(ops, **fields), keys or [self.world.key],
                              payloads or [])

    def bundle(self, members: list[Any] | None = None, compression: str = "zstd") -> bytes:
        return bundle_bytes(self.world.tmp / f"craft-{self.patch}",
                            members or self.members(), compression)

    def serve(self, data: bytes, name: str | None = None) -> str:
        """Put ``data`` in the arena's repository; the URL the manifest should name."""
        name = name or f"{self.release}/{self.patch}-any.patchd"
        if self.arena.repo is not None:
            self.arena.repo.write(name, data)
            return name
        self.world.bad_files[f"{self.arena.mirror_prefix}/{name}"] = data
        return name

    def route(self, name: str, handler: Callable[[Request, Conn], object]) -> str:
        """Serve ``name`` from the bad server with ``handler``; its absolute URL."""
        path = f"/routes/{self.arena.name}/{self.patch}/{name}"
        self.world.bad_routes[path] = handler
        return self.world.bad.url(path)

    def doc(self, refs: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
        """A manifest listing this case's patch with ``refs`` and a fresh serial."""
        self.serial = kw.pop("serial", self.arena.accepted_serial() + 1)
        return manifest_doc(serial=self.serial, release=RELEASE,
                            patches=[(self.patch, refs)] if refs else [], **kw)

    def publish(self, doc: dict[str, Any], keys: list[Any] | None = None,
                sig: bytes | None = None, pad: int = 0) -> tuple[bytes, bytes]:
        data, good_sig = sign(doc, keys or self.arena.sign_keys, pad)
        self.publish_raw(data, good_sig if sig is None else sig)
        return data, good_sig

    def publish_raw(self, data: bytes, sig: bytes) -> None:
        if self.arena.repo is not None:
            self.arena.repo.manifest(data, sig)
        else:
            self.world.bad_files[f"{self.arena.mirror_prefix}/manifest.json"] = data
            self.world.bad_files[f"{self.arena.mirror_prefix}/manifest.json.sig"] = sig

    def publish_bundle(self, data: bytes, **ref: Any) -> None:
        """The everyday case: serve ``data`` and list it, correctly, in a manifest."""
        self.publish(self.doc([bundle_ref(self.serve(data), data, **ref)]))


# --- fixtures -------------------------------------------------------------------------


def _daemon(world: World, name: str, url: str, keys: list[Any], extra: str = "") -> DaemonProcess:
    d = DaemonProcess(world.tmp / name, manifest_url=url,
                      keys=[format_public_key(public_raw(k)) for k in keys],
                      release_dir=world.release_dir,
                      extra='[server]\ntimeout = "1s"\n[install]\nmin_free = "0"\n' + extra)
    d.start()
    return d


def _make_release(root: Path, canary: Path) -> None:
    write_tree(root, {"bin/kiosk": "#!/bin/sh\necho kiosk\n", "lib/app.py": "print(1)\n",
                      "share/doc.txt": "doc\n"}, version=RELEASE)
    # An OS package may ship absolute links; no write may ever go through them.
    os.symlink(canary, root / "share" / "escape")
    os.symlink(canary / "secret", root / "share" / "secret-link")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """nginx, the bad server, a release with outward links, and the three arenas."""
    if not Path(NGINX).exists() or shutil.which(NGINX) is None:
        pytest.skip(f"nginx not installed at {NGINX} (CI installs it)")
    tmp = tmp_path_factory.mktemp("attacks")
    canary = tmp / "canary"
    write_tree(canary, {"secret": "do not touch\n"})
    release = tmp / "opt" / "kiosk"
    _make_release(release, canary)
    (tmp / "repo").mkdir()
    bad = BadServer()
    bad.start()
    with run_nginx(tmp / "repo", tmp / "nginx") as nginx:
        w = World(tmp, release, canary, bad, new_key(), new_key(), new_key())
        bad.handler = w.handle
        try:
            main = RepoWriter(tmp / "repo" / "main")
            w.arenas["main"] = Arena("main", _daemon(w, "d-main", nginx.url("main/manifest.json"),
                                                     [w.key]), [w.key], main,
                                     nginx.url("main"))
            thr = RepoWriter(tmp / "repo" / "thresh")
            w.arenas["threshold"] = Arena(
                "threshold", _daemon(w, "d-thresh", nginx.url("thresh/manifest.json"),
                                     [w.key, w.key2], "[trust]\nthreshold = 2\n"),
                [w.key, w.key2], thr, nginx.url("thresh"))
            w.arenas["mirror"] = Arena(
                "mirror", _daemon(w, "d-mirror", bad.url("/mirror/manifest.json"), [w.key]),
                [w.key], None, bad.url("/mirror"), "/mirror")
            for arena in w.arenas.values():
                install_legit(w, arena, 1)
            yield w
        finally:
            for arena in w.arenas.values():
                arena.d.close()
            bad.close()


def install_legit(w: World, arena: Arena, patch: int) -> None:
    """Control: a well-formed, correctly signed bundle installs and becomes next_boot."""
    ctx = Ctx(w, arena, patch)
    ctx.publish_bundle(ctx.bundle(ctx.members(keys=arena.sign_keys)))
    reply = arena.d.call("CheckNow")
    assert reply == {"strategy": "patch", "build": {"release": RELEASE, "patch": patch}}, reply
    status = arena.d.wait_status(
        lambda s: s["activity"]["phase"] == "idle"
        and s["next_boot"] == {"release": RELEASE, "patch": patch},
        f"control patch {patch} installed in {arena.name}", timeout=30)
    assert state_of(status, RELEASE, patch) == "installed"
    assert (ctx.tree / f"lib/attack-{patch}.txt").read_bytes() == f"patch {patch}\n".encode()


# --- the cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    threat: str
    outcome: str              # "manifest" | "bad" | "transient"
    error_class: str
    message: str
    stage: Stage
    arena: str = "main"
    bad_reason: str | None = None
    full: bool = False        # the decided build is a full upgrade (release 1.5.N, 0)
    within: float = 30.0      # seconds for CheckNow to answer and the refusal to be logged
    at_check: bool = False    # refused by CheckNow itself (else by the update task)

    def __str__(self) -> str:
        return self.name


CASES: list[Case] = []


def case(name: str, threat: str, outcome: str, error_class: str, message: str,
         arena: str = "main", bad_reason: str | None = None, full: bool = False,
         within: float = 30.0, at_check: bool = False
         ) -> Callable[[Stage], Stage]:
    def register(fn: Stage) -> Stage:
        CASES.append(Case(name, threat, outcome, error_class, message, fn, arena,
                          bad_reason, full, within, outcome == "manifest" or at_check))
        return fn
    return register


def manifest_case(name: str, threat: str, error_class: str, message: str,
                  arena: str = "main", **kw: Any) -> Callable[[Stage], Stage]:
    return case(name, threat, "manifest", error_class, message, arena, **kw)


def bundle_case(name: str, threat: str, error_class: str, message: str, reason: str,
                arena: str = "main", full: bool = False) -> Callable[[Stage], Stage]:
    return case(name, threat, "bad", error_class, message, arena, reason, full)


# Arbitrary installation ----------------------------------------------------------------

@bundle_case("unsigned bundle", "arbitrary install", "SignatureInvalid",
             "no signature by a trusted key (key ids present: none", "signature_invalid")
def _unsigned_bundle(x: Ctx) -> None:
    members = x.members()
    members[1] = tar_member("bundle.sig", b'{"signatures": []}')
    x.publish_bundle(x.bundle(members))


@bundle_case("bundle signed by an untrusted key", "arbitrary install", "SignatureInvalid",
             "no signature by a trusted key", "signature_invalid")
def _untrusted_bundle(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(keys=[x.world.other])))


@bundle_case("bundle header changed after signing", "arbitrary install", "SignatureInvalid",
             "0 of 1 signatures by trusted keys verify", "signature_invalid")
def _tampered_header(x: Ctx) -> None:
    members = x.members()
    info, header = members[0]
    evil = header.replace(b'"mode": 420', b'"mode": 511')
    assert evil != header
    info.size = len(evil)
    members[0] = (info, evil)
    x.publish_bundle(x.bundle(members))


@bundle_case("bundle.sig is garbage", "arbitrary install", "SignatureInvalid",
             "signature file is not JSON", "signature_invalid")
def _bundle_sig_garbage(x: Ctx) -> None:
    members = x.members()
    members[1] = tar_member("bundle.sig", os.urandom(200).replace(b"\0", b"x"))
    x.publish_bundle(x.bundle(members))


@case("manifest entry names another file of the right size", "arbitrary install",
      "transient", "BundleHashMismatch", "manifest says")
def _other_file_same_size(x: Ctx) -> None:
    good = x.bundle()
    decoy = x.bundle(x.members(ops=[file_op("bin/kiosk", b"#!/bin/sh\nevil\n", 0)],
                               payloads=[b"#!/bin/sh\nevil\n"]))
    decoy = (decoy + b"\0" * len(good))[: len(good)]
    url = x.serve(decoy, f"{RELEASE}/decoy-{x.patch}.patchd")
    x.publish(x.doc([bundle_ref(url, good)]))


@bundle_case("random bytes listed with their own hash", "arbitrary install",
             "BundleInvalid", "corrupt or truncated archive", "invalid_bundle")
def _not_an_archive(x: Ctx) -> None:
    x.publish_bundle(os.urandom(4096))


@bundle_case("truncated bundle listed with its own hash", "arbitrary install",
             "BundleInvalid", "truncated", "invalid_bundle")
def _truncated(x: Ctx) -> None:
    data = os.urandom(64 * 1024)
    full = x.bundle(x.members(ops=[file_op("lib/blob", data, 0)], payloads=[data]))
    x.publish_bundle(full[: len(full) // 2])


# Rollback, freeze, wrong app/channel, keys (manifest level: nothing may change) ---------

@manifest_case("older manifest serial replayed", "rollback attack",
               "ManifestSerialRollback", "is lower than the accepted")
def _older_serial(x: Ctx) -> None:
    x.publish(x.doc([], serial=x.arena.accepted_serial() - 1))


@manifest_case("same serial, different bytes", "rollback attack",
               "ManifestSerialRollback", "was already accepted with other bytes")
def _same_serial(x: Ctx) -> None:
    data = x.bundle()
    x.publish(x.doc([bundle_ref(x.serve(data), data)], serial=x.arena.accepted_serial()))


@manifest_case("expired manifest", "indefinite freeze", "ManifestExpired", "manifest expired at")
def _expired(x: Ctx) -> None:
    data = x.bundle()
    x.publish(x.doc([bundle_ref(x.serve(data), data)],
                    expires=datetime.now(UTC) - timedelta(minutes=1)))


@manifest_case("manifest of another app", "wrong app", "ManifestMismatch",
               "manifest is for app 'other'")
def _other_app_manifest(x: Ctx) -> None:
    x.publish(x.doc([], app="other"))


@manifest_case("mirror serves a validly signed manifest of another channel",
               "malicious mirror", "ManifestMismatch", "channel 'beta'")
def _other_channel(x: Ctx) -> None:
    data = x.bundle()
    x.publish(x.doc([bundle_ref(x.serve(data), data)], channel="beta"))


@manifest_case("manifest signed by an untrusted key", "key not trusted",
               "ManifestSignatureInvalid", "no signature by a trusted key")
def _untrusted_manifest(x: Ctx) -> None:
    data = x.bundle()
    x.publish(x.doc([bundle_ref(x.serve(data), data)]), keys=[x.world.other])


@manifest_case("unsigned manifest", "arbitrary install", "ManifestSignatureInvalid",
               "key ids present: none")
def _unsigned_manifest(x: Ctx) -> None:
    x.publish(x.doc([]), sig=b'{"signatures": []}\n')


@manifest_case("manifest changed after signing", "arbitrary install",
               "ManifestSignatureInvalid", "0 of 1 signatures by trusted keys verify")
def _tampered_manifest(x: Ctx) -> None:
    evil = x.bundle(x.members(keys=[x.world.other]))
    data, sig = sign(x.doc([]), [x.world.key])
    doc = json.loads(data)
    doc["releases"][0]["patches"] = [{"patch": x.patch, "bundles": [
        bundle_ref(x.serve(evil), evil)]}]
    x.publish_raw(json.dumps(doc, indent=2).encode(), sig)


@manifest_case("manifest signature file is garbage", "signature garbage",
               "ManifestSignatureInvalid", "signature file is not JSON")
def _manifest_sig_garbage(x: Ctx) -> None:
    x.publish(x.doc([]), sig=os.urandom(300))


@manifest_case("manifest larger than 4 MiB", "endless data", "ManifestInvalid",
               "is larger than 4 MiB (Content-Length")
def _big_manifest(x: Ctx) -> None:
    x.publish(x.doc([]), pad=4 * MIB)


@manifest_case("signature file larger than 4 MiB", "endless data", "ManifestInvalid",
               "manifest.json.sig is larger than 4 MiB")
def _big_sig(x: Ctx) -> None:
    data, sig = sign(x.doc([]), [x.world.key])
    x.publish_raw(data, sig + b" " * (4 * MIB))


# Threshold ------------------------------------------------------------------------------

@manifest_case("threshold 2, manifest signed by one key", "threshold not met",
               "ManifestSignatureInvalid", "below the threshold of 2", arena="threshold")
def _threshold_one(x: Ctx) -> None:
    x.publish(x.doc([]), keys=[x.world.key])


@manifest_case("threshold 2, one key's signature listed twice", "threshold not met",
               "ManifestSignatureInvalid", "below the threshold of 2", arena="threshold")
def _threshold_dup(x: Ctx) -> None:
    data, _ = sign(x.doc([]), [x.world.key])
    x.publish_raw(data, dup_sig_file(data, x.world.key))


@manifest_case("threshold 2, second signature by an untrusted key", "threshold not met",
               "ManifestSignatureInvalid", "1 of 1 signatures by trusted keys verify",
               arena="threshold")
def _threshold_untrusted_second(x: Ctx) -> None:
    x.publish(x.doc([]), keys=[x.world.key, x.world.other])


@bundle_case("threshold 2, bundle signed by one key", "threshold not met", "SignatureInvalid",
             "below the threshold of 2", "signature_invalid", arena="threshold")
def _threshold_bundle(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(keys=[x.world.key2])))


# Endless data and slow retrieval -------------------------------------------------------

@case("bundle body longer than the manifest's size", "endless data", "transient",
      "DownloadOversize", "exceeds the manifest's")
def _longer_body(x: Ctx) -> None:
    good = x.bundle()
    url = x.serve(good + os.urandom(8192))
    x.publish(x.doc([bundle_ref(url, good)]))


def _endless(world: World, key: str, conn: Conn, head: dict[str, str]) -> None:
    conn.head(200, head)
    chunk = os.urandom(64 * 1024)
    while conn.sent < 64 * MIB and conn.send(chunk):
        pass
    world.bad_sent[key] = conn.sent


@case("endless bundle body without Content-Length", "endless data", "transient",
      "DownloadOversize", "server sent more than the manifest's")
def _endless_bundle(x: Ctx) -> None:
    good = x.bundle()
    url = x.route("endless.patchd", lambda r, c: _endless(x.world, f"bundle-{x.patch}", c, {}))
    x.publish(x.doc([bundle_ref(url, good)]))


def _trickle(world: World, conn: Conn, data: bytes, interval: float) -> None:
    """One byte per ``interval``; a reset as soon as the case ends (see World.abort)."""
    for i in range(len(data)):
        if world.abort.wait(interval):
            conn.reset()
            return
        if not conn.send(data[i : i + 1]):
            return


@case("bundle trickled below the stall threshold", "slow retrieval", "transient",
      "DownloadStalled", "stall threshold")
def _slow_bundle(x: Ctx) -> None:
    data = x.bundle(x.members(ops=[file_op("lib/b", b"b" * 40_000, 0)],
                              payloads=[b"b" * 40_000]))

    def trickle(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(len(data))})
        _trickle(x.world, conn, data, 0.25)

    x.publish(x.doc([bundle_ref(x.route("slow.patchd", trickle), data)]))


@case("bundle response head trickled", "slow retrieval", "transient", "DownloadStalled",
      "stall", within=10.0)
def _slow_bundle_head(x: Ctx) -> None:
    data = x.bundle()

    def trickle(req: Request, conn: Conn) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\n")
        _trickle(x.world, conn, b"X-Slow: " + b"z" * 100_000, 0.25)

    x.publish(x.doc([bundle_ref(x.route("slow-head.patchd", trickle), data)]))


@manifest_case("endless manifest stream", "endless data", "ManifestInvalid",
               "is larger than 4 MiB; stopped reading", arena="mirror")
def _endless_manifest(x: Ctx) -> None:
    x.publish(x.doc([]))
    x.world.bad_routes["/mirror/manifest.json"] = (
        lambda r, c: _endless(x.world, "manifest", c, {}))


@manifest_case("endless signature stream", "endless data", "ManifestInvalid",
               "manifest.json.sig is larger than 4 MiB; stopped reading", arena="mirror")
def _endless_sig(x: Ctx) -> None:
    x.publish(x.doc([]))
    x.world.bad_routes["/mirror/manifest.json.sig"] = (
        lambda r, c: _endless(x.world, "sig", c, {}))


@manifest_case("manifest announcing 1 GB", "endless data", "ManifestInvalid",
               "refused unread", arena="mirror")
def _lying_length(x: Ctx) -> None:
    x.publish(x.doc([]))
    x.world.bad_routes["/mirror/manifest.json"] = (
        lambda r, c: _endless(x.world, "length", c, {"Content-Length": str(10**9)}))


@case("mirror flips one byte of the bundle", "malicious mirror", "transient",
      "BundleHashMismatch", "manifest says", arena="mirror")
def _mirror_flip(x: Ctx) -> None:
    good = x.bundle()
    x.publish(x.doc([bundle_ref(x.serve(good), good)]))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    x.serve(bytes(bad))


@case("manifest trickled below the stall threshold", "slow retrieval", "transient",
      "DownloadStalled", "stall", arena="mirror", within=10.0, at_check=True)
def _slow_manifest(x: Ctx) -> None:
    data, _sig = x.publish(x.doc([]))

    def trickle(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(len(data))})
        _trickle(x.world, conn, data, 0.25)

    x.world.bad_routes["/mirror/manifest.json"] = trickle


# Mix and match -------------------------------------------------------------------------

@bundle_case("bundle of patch N-1 listed as patch N", "mix-and-match", "BundleInvalid",
             "bundle is for patch", "invalid_bundle")
def _mix_patch(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(patch=x.patch - 1)))


@bundle_case("bundle of another release", "mix-and-match", "BundleInvalid",
             "bundle is for release '1.3.0'", "invalid_bundle")
def _mix_release(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(release="1.3.0")))


@bundle_case("another app's bundle", "wrong app", "BundleInvalid",
             "bundle is for app 'other'", "invalid_bundle")
def _mix_app(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(app="other")))


@bundle_case("bundle for another arch", "mix-and-match", "BundleInvalid",
             "bundle is for arch", "invalid_bundle")
def _mix_arch(x: Ctx) -> None:
    x.publish_bundle(x.bundle(x.members(arch=foreign_arch())))


@bundle_case("full bundle listed as a patch", "mix-and-match", "BundleInvalid",
             "bundle is for kind 'full', expected 'patch'", "invalid_bundle")
def _full_as_patch(x: Ctx) -> None:
    data = b"full\n"
    x.publish_bundle(x.bundle(x.members(ops=[file_op("VERSION", data, 0)], payloads=[data],
                                        kind="full", patch=0)))


@bundle_case("patch bundle listed as a full upgrade", "mix-and-match", "BundleInvalid",
             "bundle is for kind 'patch', expected 'full'", "invalid_bundle", full=True)
def _patch_as_full(x: Ctx) -> None:
    data = x.bundle(x.members(release=x.release, patch=1))
    url = x.serve(data, f"{x.release}/full-any.patchd")
    x.publish(x.doc([], full={"release": x.release, "bundles": [bundle_ref(url, data)]}))


# Path traversal and link tricks --------------------------------------------------------

def _path_case(name: str, message: str, ops: Callable[[Ctx], list[dict[str, Any]]],
               payloads: Callable[[Ctx], list[bytes]] = lambda x: [b"pwned\n"],
               error_class: str = "UnsafePath") -> None:
    def stage(x: Ctx) -> None:
        x.publish_bundle(x.bundle(x.members(ops=ops(x), payloads=payloads(x))))
    bundle_case(name, "path traversal", error_class, message, "invalid_bundle")(stage)


_path_case("'../' path", "path is not normalised",
           lambda x: [file_op(x.rel_to_canary() + "/pwned", b"pwned\n", 0)])
_path_case("absolute path", "path is absolute",
           lambda x: [file_op(str(x.world.canary / "pwned"), b"pwned\n", 0)])
_path_case("'a/../../x' path", "path is not normalised",
           lambda x: [{"op": "dir", "path": "a", "mode": 0o755},
                      file_op("a/../../" + x.rel_to_canary() + "/pwned", b"pwned\n", 0)])
_path_case("symlink escaping the tree, then a file through it", "resolves outside the tree",
           lambda x: [{"op": "symlink", "path": "lib/esc", "target": x.rel_to_canary("lib")},
                      file_op("lib/esc/pwned", b"pwned\n", 0)])
_path_case("absolute symlink target", "absolute target",
           lambda x: [{"op": "symlink", "path": "lib/esc", "target": str(x.world.canary)}],
           lambda x: [])
_path_case("write through a symlink the bundle made", "passes through the symlink 'lnk'",
           lambda x: [{"op": "symlink", "path": "lnk", "target": "share"},
                      file_op("lnk/escape/pwned", b"pwned\n", 0)])
_path_case("write through a symlink of the base tree", "'share/escape' is a symlink",
           lambda x: [file_op("share/escape/pwned", b"pwned\n", 0)])
_path_case("dir op through a symlink of the base tree", "'share/escape' is a symlink",
           lambda x: [{"op": "dir", "path": "share/escape/newdir", "mode": 0o755}],
           lambda x: [])
_path_case("delete through a symlink of the base tree", "'share/escape' is a symlink",
           lambda x: [{"op": "delete", "path": "share/escape/secret"}], lambda x: [])
_path_case("delta whose base is a symlink to outside", "delta base 'share/secret-link' is a",
           lambda x: [{**file_op("share/secret-link", b"pwned\n", 0), "op": "delta",
                       "base_sha256": hashlib.sha256(b"do not touch\n").hexdigest()}],
           lambda x: [b"frame"])
_path_case("setuid mode", "has setuid/setgid/sticky",
           lambda x: [file_op("bin/su", b"pwned\n", 0, mode=0o4755)], error_class="BundleInvalid")


def _member_case(name: str, message: str, mutate: Callable[[Ctx, list[Any]], list[Any]]
                 ) -> None:
    def stage(x: Ctx) -> None:
        x.publish_bundle(x.bundle(mutate(x, x.members())))
    bundle_case(name, "bundle members", "BundleInvalid", message, "invalid_bundle")(stage)


def _replace_payload(type_: bytes) -> Callable[[Ctx, list[Any]], list[Any]]:
    def mutate(x: Ctx, members: list[Any]) -> list[Any]:
        members[2] = tar_member("payload/0", type_=type_,
                                linkname=str(x.world.canary / "secret"))
        return members
    return mutate


_member_case("hardlink member", "is a link", _replace_payload(b"1"))
_member_case("symlink member", "is a link", _replace_payload(b"2"))
_member_case("device member", "is a device", _replace_payload(b"3"))
_member_case("fifo member", "is a device", _replace_payload(b"6"))
_member_case("duplicate member", "unexpected member 'bundle.json' where 'bundle.sig'",
             lambda x, m: [m[0], *m])
_member_case("extra member after the last op", "unexpected member 'payload/1' after",
             lambda x, m: [*m, tar_member("payload/1", b"surprise")])
_member_case("payload longer than its op", "its op says",
             lambda x, m: [*m[:2], tar_member("payload/0", b"much longer than the op says\n")])


@bundle_case("ops write more than unpacked_size", "endless data", "BundleInvalid",
             "more than unpacked_size", "invalid_bundle")
def _unpacked(x: Ctx) -> None:
    data = b"x" * 100
    x.publish_bundle(x.bundle(x.members(ops=[file_op("lib/x", data, 0)], payloads=[data],
                                        unpacked_size=10)))


# --- the runner -------------------------------------------------------------------------


def _log_lines(d: DaemonProcess, offset: int) -> list[dict[str, Any]]:
    with open(d.log_path, "rb") as f:
        f.seek(offset)
        raw = f.read()
    out = []
    for line in raw.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def wait_refusal(d: DaemonProcess, offset: int, timeout: float = 30) -> dict[str, Any]:
    """The first error the daemon logs after ``offset``; fails loudly if it installs."""
    deadline = time.monotonic() + timeout
    while True:
        for line in _log_lines(d, offset):
            if line.get("event") == "install.complete":
                raise AssertionError(f"ATTACK ACCEPTED: {line}\n{d.log()[-4000:]}")
            if "error_class" in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no refusal logged within {timeout}s:\n{d.log()[-4000:]}")
        time.sleep(0.02)


def state_listing(state_dir: Path) -> dict[str, tuple[Any, ...]]:
    return snapshot(state_dir)


@dataclass
class Before:
    pointers: bytes
    client: bytes
    state: dict[str, tuple[Any, ...]]
    release: dict[str, tuple[Any, ...]]
    canary: dict[str, tuple[Any, ...]]
    offset: int

    @classmethod
    def take(cls, world: World, d: DaemonProcess) -> Before:
        return cls((d.state_dir / "pointers.json").read_bytes(),
                   (d.state_dir / "client.json").read_bytes(), state_listing(d.state_dir),
                   snapshot(world.release_dir), snapshot(world.canary),
                   d.log_path.stat().st_size)


def check_nothing_installed(world: World, arena: Arena, x: Ctx, c: Case, before: Before
                            ) -> dict[str, Any]:
    d = arena.d
    status = d.status()  # still serving
    assert status["activity"]["phase"] == "idle", status
    assert (d.state_dir / "pointers.json").read_bytes() == before.pointers
    assert status["next_boot"] == {"release": RELEASE, "patch": 1}
    assert not x.tree.exists(), f"a tree exists for the refused build: {x.tree}"
    assert snapshot(world.release_dir) == before.release, "release_dir was written"
    assert snapshot(world.canary) == before.canary, "the canary outside the state was written"
    after = state_listing(d.state_dir)
    bdir = f"builds/{x.release}/{x.patch}"
    allowed = {"client.json", "events.json", f"builds/{x.release}", bdir, f"{bdir}/state.json"}
    changed = {k for k in set(after) | set(before.state) if after.get(k) != before.state.get(k)}
    assert changed <= allowed, f"unexpected changes in the state dir: {sorted(changed - allowed)}"
    assert not any(".staging" in k or ".patchd-tmp" in k for k in after), sorted(after)
    state = state_of(status, x.release, x.patch)
    client_now = (d.state_dir / "client.json").read_bytes()
    if c.at_check:
        assert state is None, f"a manifest refusal touched build state: {state}"
        assert client_now == before.client, "a refused manifest changed client.json"
        assert not (d.state_dir / bdir).exists()
    elif c.outcome == "bad":
        info = next(b for b in status["builds"] if b["build"] == {"release": x.release,
                                                                  "patch": x.patch})
        assert (info["state"], info["reason"]) == ("bad", c.bad_reason), info
        assert arena.accepted_serial() == x.serial, "the manifest itself was valid"
        downloads = d.cache_dir / "downloads"
        leftovers = [p.name for p in downloads.glob(f"{x.release}-{x.patch}*")] \
            if downloads.exists() else []
        assert leftovers == [], f"a bad build's download was kept: {leftovers}"
    else:
        assert state == "downloading", f"transient failure must not tombstone: {state}"
    return status


def run_case(world: World, c: Case) -> None:
    arena = world.arenas[c.arena]
    d = arena.d
    x = Ctx(world, arena, world.next_patch())
    if c.full:
        x.release = f"1.5.{x.patch}"
        x.patch = 0
    before = Before.take(world, d)
    # The refusal is provoked on purpose; anything else at error level fails the case.
    d.expected_errors = {c.bad_reason if c.outcome == "bad" and c.bad_reason else
                         "check.failed"}
    world.abort.clear()
    try:
        c.stage(x)
        check_now(d, c, x)
        line = wait_refusal(d, before.offset, c.within)
        expected_event = c.bad_reason if c.outcome == "bad" else "check.failed"
        assert (line["event"], line["error_class"]) == (expected_event, c.error_class), line
        assert c.message in line["error"], line
        kind = {"manifest": "config", "bad": "bad_input", "transient": "transient"}[c.outcome]
        assert line["kind"] == kind, line
        d.wait_status(lambda s: s["activity"]["phase"] == "idle", "update task ended")
        check_nothing_installed(world, arena, x, c, before)
    finally:
        # Unblock whatever still trickles (a frozen check would hold the next case).
        world.abort.set()
        world.bad_routes.clear()
        d.wait_status(lambda s: s["activity"]["phase"] == "idle", "daemon idle after case",
                      timeout=60)
    REPORT[c.name] = f"{c.threat}: {line['error_class']} ({c.outcome})"


def check_now(d: DaemonProcess, c: Case, x: Ctx) -> None:
    """CheckNow answers within ``c.within``: an error for refusals at the check, else the
    decided build (the refusal then comes from the update task)."""
    try:
        if c.at_check:
            with pytest.raises(VarlinkError) as info:
                d.call("CheckNow", timeout=c.within)
            assert info.value.name == "io.patchd.Updater.UpdateFailed", info.value
            transient = c.outcome == "transient"
            assert info.value.parameters["transient"] is transient, info.value
            assert c.message in info.value.parameters["reason"], info.value
        else:
            reply = d.call("CheckNow", timeout=c.within)
            want = {"strategy": "full" if c.full else "patch",
                    "build": {"release": x.release, "patch": x.patch}}
            assert reply == want, reply
    except ProtocolError as exc:
        raise AssertionError(f"FROZEN: CheckNow did not answer within {c.within}s ({exc})"
                             ) from None


@pytest.mark.parametrize("c", CASES, ids=str)
def test_attack_refused(world: World, c: Case) -> None:
    """The daemon refuses the attack with its specific reason and installs nothing."""
    run_case(world, c)


def test_endless_streams_were_cut_short(world: World) -> None:
    """Endless manifests, signatures and bodies were read only to the cap, not forever."""
    if not world.bad_sent:
        pytest.skip("no endless case ran in this session")
    # What the server managed to send = what the daemon read + both kernel socket buffers.
    slack = sum(_tcp_buffer_max(name) for name in ("tcp_rmem", "tcp_wmem")) + MIB
    for key, sent in world.bad_sent.items():
        cap = 4 * MIB if key in ("manifest", "sig", "length") else 64 * 1024
        assert sent <= cap + slack, f"{key}: {sent} bytes sent, cap {cap} + buffers {slack}"


def _tcp_buffer_max(name: str) -> int:
    try:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 8 * MIB


def test_legit_updates_still_install_after_the_campaign(world: World) -> None:
    """After every refusal each arena still installs a legitimate patch (no wedged state)."""
    for arena in world.arenas.values():
        world.bad_routes.clear()
        patch = world.next_patch()
        ctx = Ctx(world, arena, patch)
        ctx.publish_bundle(ctx.bundle(ctx.members(keys=arena.sign_keys)))
        assert arena.d.call("CheckNow")["build"] == {"release": RELEASE, "patch": patch}
        want = {"release": RELEASE, "patch": patch}

        def installed(s: dict[str, Any], want: dict[str, Any] = want) -> bool:
            return bool(s["next_boot"] == want and s["activity"]["phase"] == "idle")

        status = arena.d.wait_status(installed, f"legit patch in {arena.name}")
        assert state_of(status, RELEASE, patch) == "installed"
    assert snapshot(world.canary)["secret"][0] == "file"
    refused = len(REPORT)
    print(f"\nattack campaign: {refused} of {len(CASES)} cases refused as expected")
    for name, what in REPORT.items():
        print(f"  {name}: {what}")


def test_campaign_size() -> None:
    """The campaign stages at least 25 distinct attacks."""
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)
