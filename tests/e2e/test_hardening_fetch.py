"""Hardening against hostile repositories and collectors, on the real daemon (issue #15).

Each test stages a misbehaving server (:mod:`support.badserver`) and runs ``patchd run``
against it: what the network sends may cost a retry, never a good patch, the daemon's
memory or its liveness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.varlink import VarlinkError
from support.badserver import Conn, Request
from support.daemon import state_of
from support.hostile import RELEASE, HostileRepo, hostile_world, start_daemon, wait_event
from support.trees import new_key


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    """A repository on the misbehaving server."""
    yield from hostile_world(tmp_path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build(patch: int) -> dict[str, object]:
    return {"release": RELEASE, "patch": patch}


def test_corrupt_transfer_is_retried_and_a_reissued_bundle_gets_a_fresh_try(
        tmp_path: Path, repo: HostileRepo) -> None:
    """Bytes that are not the signed ones are retried, never tombstoned; a bad signed
    bundle bans only its own sha256."""
    good = repo.bundle(2)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    repo.files["/b/2.patchd"] = bytes(flipped)
    repo.publish([(2, [repo.ref("/b/2.patchd", good)])])
    d = start_daemon(tmp_path, repo)
    d.expected_errors.add("signature_invalid")  # patch 3's tombstone below
    assert d.call("CheckNow")["build"] == _build(2)
    failed = wait_event(d, "download.failed", where=lambda e: "manifest says" in e["error"])
    assert failed["url"] == repo.url("/b/2.patchd")
    assert _sha(good) in failed["error"] and _sha(bytes(flipped)) in failed["error"]
    wait_event(d, "check.retry_scheduled")
    assert state_of(d.status(), RELEASE, 2) == "downloading"
    repo.files["/b/2.patchd"] = good  # the mirror heals: the backoff retry installs it
    d.wait_status(lambda s: s["next_boot"] == _build(2), "patch 2 installed on retry")

    evil = repo.bundle(3, keys=[new_key()])  # the signed bytes, but a bad inner signature
    repo.files["/b/3.patchd"] = evil
    repo.publish([(2, [repo.ref("/b/2.patchd", good)]), (3, [repo.ref("/b/3.patchd", evil)])])
    assert d.call("CheckNow")["build"] == _build(3)
    d.wait_status(lambda s: state_of(s, RELEASE, 3) == "bad", "patch 3 tombstoned")
    tomb = json.loads((d.state_dir / "builds" / RELEASE / "3" / "state.json").read_text())
    assert (tomb["reason"], tomb["sha256"]) == ("signature_invalid", _sha(evil))
    assert d.call("CheckNow") == {"strategy": "none", "build": None}

    fixed = repo.bundle(3, text="patch 3, re-issued\n")
    repo.files["/b/3b.patchd"] = fixed
    repo.publish([(2, [repo.ref("/b/2.patchd", good)]), (3, [repo.ref("/b/3b.patchd", fixed)])])
    assert d.call("CheckNow")["build"] == _build(3)
    status = d.wait_status(lambda s: s["next_boot"] == _build(3), "re-issued patch 3 installed")
    assert state_of(status, RELEASE, 3) == "installed"


def _gzip_bomb(mib: int) -> bytes:
    """A gzip stream of ``mib`` MiB of zeros (about 1 KiB per MiB on the wire)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(z.compress(zeros) for _ in range(mib)) + z.flush()


def _drain(conn: Conn) -> None:
    """Read the POST body the bad server left unread (else closing resets the client)."""
    conn.sock.settimeout(0.3)
    with contextlib.suppress(OSError):
        while conn.sock.recv(65536):
            pass


def test_hostile_event_collector_and_failing_tasks_never_stop_the_daemon(
        tmp_path: Path, repo: HostileRepo) -> None:
    """A gzip bomb and an endless answer from the collector cost at most 64 KiB each and
    a backoff; a fault in every background task is logged and the task restarts."""
    bomb = _gzip_bomb(512)
    answers: list[str] = []

    def collector(req: Request, conn: Conn) -> None:
        _drain(conn)
        answers.append(req.path)
        if len(answers) == 1:
            conn.respond(200, bomb, {"Content-Encoding": "gzip"})
        elif len(answers) == 2:
            conn.head(200, {"Content-Type": "application/json"})
            chunk = b"[" * 65536
            while conn.sent < 64 << 20 and conn.send(chunk):
                pass
        else:
            conn.respond(200, b"{}")

    repo.routes["/events"] = collector
    tasks = ("signals", "poll_loop", "event_sender", "watchdog", "config_watcher")
    d = start_daemon(tmp_path, repo, f'[server]\nevents_url = "{repo.url("/events")}"\n',
                     env={"PATCHD_TASK_FAULT": ",".join(tasks), "WATCHDOG_USEC": "2000000"})
    d.expected_errors.add("task.failed")  # the injected faults
    assert d.proc is not None
    for task in tasks:
        failed = wait_event(d, "task.failed", where=lambda e, t=task: e["task"] == t)
        assert failed["error_class"] == "RuntimeError"
        wait_event(d, "task.restarted", where=lambda e, t=task: e["task"] == t)
    d.call("BootStart")
    d.call("BootSuccess")  # queues boot_success and wakes the sender
    first = wait_event(d, "events.send_failed")
    assert "more than 64 KiB" in first["error"]
    wait_event(d, "events.send_failed", where=lambda e: e["failures"] == 2)
    sent = wait_event(d, "events.sent", timeout=60)
    assert sent["count"] >= 1 and len(answers) == 3
    hwm = next(int(line.split()[1]) for line in
               Path(f"/proc/{d.proc.pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    assert hwm < 150 * 1024, f"peak RSS {hwm} KiB"
    pings = d.wait_notify("WATCHDOG=1", timeout=5, after=len(d.notifications))
    assert pings >= 0
    assert d.stop() == 0  # the restarted signal handler still stops the daemon cleanly


#: The issue's trickle, kept clear of scheduling jitter: 8,200 bytes every 1.5 s is above
#: the stall threshold (16 KiB per 4 s at ``timeout = "2s"``) and under the 2 s read
#: timeout, so neither rule of before ever ends it.
TRICKLE_BYTES, TRICKLE_EVERY = 8200, 1.5


def _trickle_above_stall(conn: Conn, data: bytes) -> None:
    """Send ``data`` in TRICKLE_BYTES pieces every TRICKLE_EVERY seconds until the client
    leaves or the server stops."""
    for pos in range(0, len(data), TRICKLE_BYTES):
        if conn.stop.wait(TRICKLE_EVERY) or not conn.send(data[pos : pos + TRICKLE_BYTES]):
            return


def test_a_manifest_trickled_above_the_stall_threshold_ends_at_its_deadline(
        tmp_path: Path, repo: HostileRepo) -> None:
    """A manifest trickled just fast enough for the stall rule is cut off at the document
    deadline with a transient error naming the URL and the time; the next check works."""
    repo.publish([])

    def trickle(req: Request, conn: Conn) -> None:
        conn.head(200, {"Content-Length": str(1 << 20)})
        _trickle_above_stall(conn, b" " * (1 << 20))

    repo.routes["/manifest.json"] = trickle
    d = start_daemon(tmp_path, repo, '[server]\ndocument_deadline = "6s"\n')
    started = time.monotonic()
    with pytest.raises(VarlinkError) as info:
        d.call("CheckNow", timeout=20)
    elapsed = time.monotonic() - started
    assert 6 <= elapsed < 6 + 4, f"CheckNow answered after {elapsed:.1f}s"
    assert info.value.parameters["transient"] is True, info.value
    failed = wait_event(d, "check.failed")
    assert (failed["error_class"], failed["kind"]) == ("DownloadStalled", "transient")
    assert failed["error"].startswith(repo.url("/manifest.json") + ": not complete after 6.")
    assert "document deadline 6s" in failed["error"]
    assert "document deadline" in d.status()["last_error"]

    del repo.routes["/manifest.json"]  # the server behaves again
    good = repo.bundle(2)
    repo.files["/b/2.patchd"] = good
    repo.publish([(2, [repo.ref("/b/2.patchd", good)])])
    assert d.call("CheckNow")["build"] == _build(2)
    status = d.wait_status(lambda s: s["next_boot"] == _build(2), "patch 2 installed")
    assert status["last_error"] is None


def test_a_bundle_trickled_below_min_rate_fails_in_bounded_time_and_resumes(
        tmp_path: Path, repo: HostileRepo) -> None:
    """A bundle trickled above the stall threshold but below server.min_rate ends in a
    transient error within a window, keeps its bytes, and resumes from a good server."""
    good = repo.bundle(2, text=os.urandom(200_000).hex())
    url = repo.url("/b/2.patchd")
    ranges: list[str | None] = []

    def bundle(req: Request, conn: Conn) -> None:
        ranges.append(req.header("range"))
        if len(ranges) == 1:  # the first answer trickles; the mirror heals after it
            conn.head(200, {"Content-Length": str(len(good))})
            _trickle_above_stall(conn, good)
            return
        offset = int(req.header("range")[6:-1]) if req.header("range") else 0
        if offset:
            conn.respond(206, good[offset:], {
                "Content-Range": f"bytes {offset}-{len(good) - 1}/{len(good)}"})
        else:
            conn.respond(200, good)

    repo.routes["/b/2.patchd"] = bundle
    repo.publish([(2, [repo.ref("/b/2.patchd", good)])])
    assert len(good) > 20 * TRICKLE_BYTES  # the trickle alone would take 30 s and more
    d = start_daemon(tmp_path, repo, '[server]\nmin_rate = "8KiB"\n')
    started = time.monotonic()
    assert d.call("CheckNow")["build"] == _build(2)
    failed = wait_event(d, "download.failed", timeout=15,
                        where=lambda e: "server.min_rate" in e["error"])
    elapsed = time.monotonic() - started
    assert elapsed < 4 + 0.5 + 4, f"download.failed after {elapsed:.1f}s"  # window, step
    assert failed["url"] == url and failed["error"].startswith(url + ": ")
    assert "bytes/s over the last 4." in failed["error"]
    assert "below the minimum rate of 8192 bytes/s" in failed["error"]
    kept = failed["kept"]
    assert kept >= 2 * TRICKLE_BYTES
    check = wait_event(d, "check.failed", where=lambda e: e["error_class"] == "DownloadStalled")
    assert check["kind"] == "transient"
    status = d.status()
    assert state_of(status, RELEASE, 2) == "downloading"
    assert "server.min_rate" in status["last_error"]

    status = d.wait_status(lambda s: s["next_boot"] == _build(2), "patch 2 installed on retry")
    assert ranges[1] == f"bytes={kept}-", ranges  # resumed from the kept bytes
    assert status["last_error"] is None
