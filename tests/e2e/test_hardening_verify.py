"""Strict verification on the real daemon (issue #15, item 5): it never stalls a boot.

With ``verify = "strict"`` a 256 MiB tree is verified off the lifecycle lock, once for
all the requests that arrive together, and kept until one of its listed files changes
(docs/lifecycle.md#strict-validation). Read-only clients run as ``nobody`` (a setuid
child); how often the daemon reads the tree's bytes is counted from outside, by
inotify opens of its first file, as well as by its ``verify.tree`` log lines.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from support.daemon import DaemonProcess
from support.env import Env, R, b, local_env
from support.hostile import log_events
from support.inotify import OpenCounter

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")
pytestmark = [needs_root, pytest.mark.timeout(180)]

STRICT = '[api]\nsocket_group = "nogroup"\n[trust]\nverify = "strict"\n'
BLOBS, BLOB_SIZE = 4, 64 << 20
#: A verification is kept only once every listed file's ctime is this old (the rule).
SETTLE_S = 2.0

#: A read-only user's GetBootTarget clients: ``n`` connections, each in its thread.
#: ``loop``: every thread calls once, then "ready" is printed and they call on and on
#: until stdin closes. ``once``: "connected" is printed; at a line on stdin all threads
#: send one call together. Either way a JSON summary is printed at the end.
_READERS = """\
import json, os, socket, sys, threading, time
path, uid, gid, n, mode = json.loads(sys.argv[1])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
REQUEST = b'{"method": "io.patchd.Updater.GetBootTarget", "parameters": {}}\\0'
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
def call(s):
    s.sendall(REQUEST)
    data = b""
    while not data.endswith(b"\\0"):
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("the daemon hung up")
        data += chunk
    return json.loads(data[:-1])
stop = threading.Event()
gate = threading.Barrier(n + 1)
calls, answers, errors = [0] * n, set(), []
def run(i):
    try:
        if mode == "once":
            gate.wait()
        answers.add(json.dumps(call(socks[i]), sort_keys=True))
        calls[i] += 1
        if mode == "loop":
            gate.wait()
            while not stop.is_set():
                answers.add(json.dumps(call(socks[i]), sort_keys=True))
                calls[i] += 1
    except Exception as exc:
        errors.append(repr(exc))
        gate.abort()
threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
if mode == "once":
    print("connected", flush=True)
    sys.stdin.readline()
gate.wait()
if mode == "loop":
    print("ready", flush=True)
    sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(json.dumps({"calls": calls, "answers": sorted(answers), "errors": errors}), flush=True)
"""


class Readers:
    """``with Readers(d, n, mode) as r:`` a setuid child of ``nobody`` calling
    GetBootTarget on ``n`` connections; ``r.summary`` once the block is left."""

    def __init__(self, d: DaemonProcess, n: int, mode: str) -> None:
        entry = pwd.getpwnam("nobody")
        self.args = [str(d.socket), entry.pw_uid, entry.pw_gid, n, mode]
        self.mode = mode
        self.proc: subprocess.Popen[str] | None = None
        self.summary: dict[str, Any] = {}

    def __enter__(self) -> Readers:
        self.proc = subprocess.Popen([sys.executable, "-c", _READERS, json.dumps(self.args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() in ("ready", "connected"), f"readers: {line!r} ({self.proc.wait()})"
        return self

    def go(self) -> None:
        """``once``: let every connection send its call now."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=120)  # closes stdin: the readers stop
        if exc_type is None:
            self.summary = json.loads(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Path]]:
    """A host and one signed patch that writes 4 × 64 MiB of incompressible data."""
    with local_env(tmp_path_factory.mktemp("verify")) as env:
        rng = random.Random(15)
        blobs: dict[str, str | bytes] = {f"data/blob{i}": rng.randbytes(BLOB_SIZE)
                                         for i in range(BLOBS)}
        yield env, env.patch(1, blobs)


def strict_host(world: tuple[Env, Path]) -> tuple[DaemonProcess, Path, dict[str, Any]]:
    """A strict daemon with the big patch installed: it, the tree, the boot target."""
    env, bundle = world
    d = env.daemon(STRICT)
    os.chmod(d.socket.parent, 0o755)  # nobody may reach the socket
    assert d.call("Install", {"path": str(bundle)}) == {"build": b(1)}
    tree = d.state_dir / "builds" / R / "1" / "tree"
    return d, tree, {"build": b(1), "path": str(tree)}


def settle(tree: Path) -> None:
    """Wait until every file's ctime is SETTLE_S old: only then is a verification kept.
    The condition is the clock itself, so this sleeps exactly until it holds."""
    newest = max(p.lstat().st_ctime_ns for p in tree.rglob("*"))
    left = newest / 1e9 + SETTLE_S + 0.05 - time.time()
    if left > 0:
        time.sleep(left)


def hashes(opens: OpenCounter) -> int:
    """Full verifications so far: each one opens data/blob0 (the first listed file)."""
    return opens.opens()["blob0"]


def timed(d: DaemonProcess, method: str) -> float:
    start = time.monotonic()
    d.call(method, {}, timeout=60)
    return time.monotonic() - start


def test_read_only_clients_looping_boot_target_never_stall_a_boot_start(
        world: tuple[Env, Path]) -> None:
    """Six of nobody's connections loop GetBootTarget on a verified 256 MiB tree: a
    reporter's BootStart and GetStatus answer within 1 s, and the tree is hashed once."""
    d, tree, target = strict_host(world)
    with OpenCounter(tree / "data") as opens:
        settle(tree)
        assert d.call("GetBootTarget") == target
        assert hashes(opens) == 1
        with Readers(d, 6, "loop") as readers:  # every connection has had its answer
            boot_start = timed(d, "BootStart")
            status = [timed(d, "GetStatus") for _ in range(5)]
            boot_success = timed(d, "BootSuccess")
        hashed = hashes(opens)
    summary = readers.summary
    assert boot_start < 1.0, f"BootStart took {boot_start:.2f} s"
    assert boot_success < 1.0, f"BootSuccess took {boot_success:.2f} s"
    assert max(status) < 1.0, f"GetStatus took {max(status):.2f} s: the event loop stalled"
    assert hashed == 1, f"an unchanged tree was hashed {hashed - 1} more times"
    assert summary["errors"] == [] and min(summary["calls"]) >= 2, summary
    assert summary["answers"] == [json.dumps({"parameters": target}, sort_keys=True)]
    verified = log_events(d, "verify.tree")
    assert [(e["build"], e["passed"], e["kept"]) for e in verified] == [(f"{R}+1", True, True)]


def test_concurrent_boot_target_requests_share_one_verification(
        world: tuple[Env, Path]) -> None:
    """Six GetBootTarget calls sent together on a tree never verified: one hash for all."""
    d, tree, target = strict_host(world)
    with OpenCounter(tree / "data") as opens:
        with Readers(d, 6, "once") as readers:
            readers.go()
        assert hashes(opens) == 1
    assert readers.summary["errors"] == [] and readers.summary["calls"] == [1] * 6
    assert readers.summary["answers"] == [json.dumps({"parameters": target}, sort_keys=True)]
    assert len(log_events(d, "verify.tree")) == 1


def test_a_kept_verification_lasts_exactly_until_a_listed_file_changes(
        world: tuple[Env, Path]) -> None:
    """Kept while nothing changes; a metadata-only change is hashed again (and not kept
    while under 2 s old); bytes changed in place with the mtime put back are caught at
    the very next request: validation_failed, and the host falls back."""
    env, _ = world
    d, tree, target = strict_host(world)
    with OpenCounter(tree / "data") as opens:
        settle(tree)
        for _ in range(3):
            assert d.call("GetBootTarget") == target
        assert hashes(opens) == 1  # kept: the next two read no byte

        blob1 = tree / "data" / "blob1"
        before = blob1.stat()
        os.utime(blob1, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the ctime moves
        assert d.call("GetBootTarget") == target
        assert hashes(opens) == 2  # the stamp changed: hashed again, still intact
        assert d.call("GetBootTarget") == target
        assert hashes(opens) == 3  # changed under 2 s ago: that result was not kept
        settle(tree)
        assert d.call("GetBootTarget") == target
        assert d.call("GetBootTarget") == target
        assert hashes(opens) == 4  # settled again: kept

        blob3 = tree / "data" / "blob3"
        before = blob3.stat()
        with open(blob3, "r+b") as f:  # one bit, same size, mtime put back
            f.seek(BLOB_SIZE // 2)
            byte = f.read(1)[0]
            f.seek(BLOB_SIZE // 2)
            f.write(bytes([byte ^ 1]))
        os.utime(blob3, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert d.call("GetBootTarget") == {"build": b(0), "path": str(env.release_dir)}
        assert hashes(opens) == 5
    builds = {(i["build"]["release"], i["build"]["patch"]): i for i in d.status()["builds"]}
    assert builds[(R, 1)].get("reason") == "validation_failed"
    verified = [(e["passed"], e["kept"]) for e in log_events(d, "verify.tree")]
    assert verified == [(True, True), (True, False), (True, False), (True, True), (False, False)]
