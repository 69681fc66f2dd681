"""The boot protocol of docs/lifecycle.md on the real daemon with real host processes: a host
that dies before BootSuccess is caught by its pidfd, stale and live breadcrumbs survive
a daemon restart, the boot timeout, BootFailure, and a bad client cannot hold up a boot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess, state_of
from support.env import Env, R, b, local_env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """A host with a local (file://) repository and daemons to start."""
    with local_env(tmp_path) as e:
        yield e


#: A host process: BootStart with its own pid, print the reply, then act out ``mode``:
#: ``crash`` exits 1, ``success`` reports BootSuccess and exits 0, ``wait`` exits 1 once
#: its stdin is closed (so the test decides when the host dies).
HOST = """\
import json, os, sys
from patchd.varlink import VarlinkClient
path, mode = sys.argv[1], sys.argv[2]
with VarlinkClient(path) as c:
    reply = c.call("io.patchd.Updater.BootStart", {"pid": os.getpid()})
    print(json.dumps(reply), flush=True)
    if mode == "success":
        c.call("io.patchd.Updater.BootSuccess", {})
        sys.exit(0)
if mode == "wait":
    sys.stdin.read()
sys.exit(1)
"""


def host(d: DaemonProcess, mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start a host process; returns it and its BootStart reply (once made)."""
    proc = subprocess.Popen([sys.executable, "-c", HOST, str(d.socket), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # it prints nothing else
    if mode != "wait":
        proc.stdin.close()
    assert line, f"host failed to boot (exit {proc.wait()})"
    return proc, json.loads(line)


def end_host(proc: subprocess.Popen[str]) -> float:
    """Let a ``wait`` host exit (status 1); the monotonic time it was reaped."""
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 1
    return time.monotonic()


def install(env: Env, d: DaemonProcess, patch: int) -> None:
    assert d.call("Install", {"path": str(env.patch(patch))}) == {"build": b(patch)}


def booted(env: Env, d: DaemonProcess, patch: int) -> None:
    """Install ``patch`` and boot it successfully (the host's last good build)."""
    install(env, d, patch)
    d.call("BootStart", {})
    d.call("BootSuccess", {})


def tree(d: DaemonProcess, patch: int) -> str:
    return str(d.state_dir / "builds" / R / str(patch) / "tree")


def reason_of(status: dict[str, Any], patch: int) -> str | None:
    for info in status["builds"]:
        if info["build"] == b(patch):
            return info.get("reason")  # type: ignore[no-any-return]
    return None


def events(d: DaemonProcess) -> list[dict[str, Any]]:
    doc = json.loads((d.state_dir / "events.json").read_text())
    return list(doc["events"])


def wait_bad(d: DaemonProcess, patch: int, timeout: float) -> dict[str, Any]:
    return d.wait_status(lambda s: state_of(s, R, patch) == "bad", f"{R}+{patch} bad",
                         timeout=timeout)


def test_host_crash_detected_within_a_second(env: Env) -> None:
    """A host that calls BootStart with its pid and exits 1 makes the build bad
    (boot_crash) within 1 s, the boot target falls back, and boot_failure is queued."""
    d = env.daemon()
    booted(env, d, 1)
    install(env, d, 2)
    proc, reply = host(d, "crash")
    assert reply == {"build": b(2), "path": tree(d, 2)}
    assert proc.wait(timeout=10) == 1
    exited = time.monotonic()
    status = wait_bad(d, 2, timeout=1.0)  # GetStatus only: the pidfd watch found it
    assert time.monotonic() - exited < 1.0
    assert reason_of(status, 2) == "boot_crash"
    assert status["currently_booting"] is None and status["next_boot"] == b(1)
    assert d.call("GetBootTarget") == {"build": b(1), "path": tree(d, 1)}
    failures = [e for e in events(d) if e["type"] == "boot_failure"]
    assert [(e["release"], e["patch"]) for e in failures] == [(R, 2)]
    assert "boot_crash" in failures[0]["message"]


def test_host_that_reports_success_keeps_its_build(env: Env) -> None:
    """A host that reports BootSuccess and then exits is not a crash: the build stays."""
    d = env.daemon()
    install(env, d, 1)
    proc, reply = host(d, "success")
    assert reply["build"] == b(1)
    assert proc.wait(timeout=10) == 0
    assert d.call("GetBootTarget") == {"build": b(1), "path": tree(d, 1)}  # re-checks too
    status = d.status()
    assert state_of(status, R, 1) == "installed"
    assert status["last_booted"] == b(1) and status["currently_booting"] is None
    assert "crash_detected" not in d.log()


def test_stale_breadcrumb_resolved_at_startup(env: Env) -> None:
    """The daemon is SIGKILLed while a host boots; the host exits; the restarted daemon
    finds the breadcrumb's pid gone and marks the build bad (boot_crash) before READY."""
    d = env.daemon()
    install(env, d, 1)
    proc, _ = host(d, "wait")
    d.kill()
    end_host(proc)
    d.start()
    status = d.status()
    assert state_of(status, R, 1) == "bad" and reason_of(status, 1) == "boot_crash"
    assert status["next_boot"] == b(0) and status["currently_booting"] is None
    assert d.call("GetBootTarget") == {"build": b(0), "path": str(env.release_dir)}


def test_live_breadcrumb_watched_again_after_restart(env: Env) -> None:
    """A breadcrumb whose host still runs survives a daemon restart, is watched again,
    and the host's later exit is detected as a crash within 1 s."""
    d = env.daemon()
    install(env, d, 1)
    proc, _ = host(d, "wait")
    d.kill()
    d.start()
    status = d.status()
    assert status["currently_booting"] == b(1) and state_of(status, R, 1) == "installed"
    exited = end_host(proc)
    status = wait_bad(d, 1, timeout=1.0)
    assert time.monotonic() - exited < 1.0
    assert reason_of(status, 1) == "boot_crash" and status["next_boot"] == b(0)


def test_boot_timeout(env: Env) -> None:
    """With boot.timeout = 1s, a host that is still running but never reports success
    makes the build bad (boot_timeout)."""
    d = env.daemon('[boot]\ntimeout = "1s"\n')
    install(env, d, 1)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = time.monotonic()
        d.call("BootStart", {"pid": sleeper.pid})
        status = wait_bad(d, 1, timeout=5.0)
        waited = time.monotonic() - started
        assert waited >= 1.0, f"boot_timeout fired {waited:.2f} s after BootStart, not 1 s"
        assert reason_of(status, 1) == "boot_timeout"
        assert status["currently_booting"] is None and status["next_boot"] == b(0)
        assert sleeper.poll() is None  # the host was not what ended the boot
    finally:
        sleeper.kill()
        sleeper.wait()


def test_boot_timeout_counts_from_boot_start_across_a_restart(env: Env) -> None:
    """A daemon killed while a host boots resumes the boot timeout where it was: the
    build goes bad about ``timeout`` after BootStart, not ``timeout`` after the restart
    (and never early)."""
    d = env.daemon('[boot]\ntimeout = "4s"\n')
    install(env, d, 1)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = time.monotonic()
        d.call("BootStart", {"pid": sleeper.pid})
        time.sleep(2.0)  # the boot runs this long before the crash: part of the scenario
        d.kill()
        d.start()
        ready = time.monotonic()
        assert state_of(d.status(), R, 1) == "installed"
        # A fresh 4 s timer would fire at ready + 4; the resumed one by about start + 5.
        status = wait_bad(d, 1, timeout=max(0.5, started + 5.5 - ready))
        fired = time.monotonic()
        assert fired - started >= 3.0, f"fired {fired - started:.2f} s after BootStart"
        assert fired - ready < 4.0, f"fired {fired - ready:.2f} s after the restart"
        assert reason_of(status, 1) == "boot_timeout"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_boot_failure_with_reason(env: Env) -> None:
    """BootFailure marks the build bad (boot_failure) keeping the host's reason, falls
    back to the last good build and queues a boot_failure event."""
    d = env.daemon()
    booted(env, d, 1)
    install(env, d, 2)
    d.call("BootStart", {"build": b(2), "pid": os.getpid()})
    assert d.call("BootFailure", {"reason": "health check failed"}) == {}
    status = d.status()
    assert reason_of(status, 2) == "boot_failure" and status["next_boot"] == b(1)
    assert status["currently_booting"] is None
    state = json.loads((d.state_dir / "builds" / R / "2" / "state.json").read_text())
    assert state["state"] == "bad" and state["detail"] == "health check failed"
    assert [e["patch"] for e in events(d) if e["type"] == "boot_failure"] == [2]
    with pytest.raises(VarlinkError) as err:
        d.call("BootSuccess", {})  # nothing is booting any more
    assert err.value.name == "io.patchd.Updater.NoBootInProgress"


def test_client_that_never_reads_cannot_block_a_boot(env: Env) -> None:
    """While one client floods requests and never reads a reply (the daemon's writes to
    it are stuck), another client's BootStart is answered at once."""
    d = env.daemon()
    install(env, d, 1)
    request = b'{"method":"io.patchd.Updater.GetStatus"}\0'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
        hog.connect(str(d.socket))
        hog.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until both directions' buffers are full
            try:
                sent += hog.send(request * 64)
            except BlockingIOError:
                try:
                    hog.send(request)  # still full a moment later: the daemon stopped reading
                except BlockingIOError:
                    break
                sent += len(request)
        assert sent > 100_000
        started = time.monotonic()
        reply = d.call("BootStart", {}, timeout=5)
        elapsed = time.monotonic() - started
        assert reply == {"build": b(1), "path": tree(d, 1)}
        assert elapsed < 1.0
        assert d.call("BootSuccess", {}, timeout=5) == {}
    assert Path(d.socket).exists()
