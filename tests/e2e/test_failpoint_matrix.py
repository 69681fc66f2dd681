"""Killed in every step: the daemon dies at each failpoint, restarts, and the invariants hold.

For every failpoint name the lifecycle (and the installer, if it has any) declares, the
real daemon runs with ``PATCHD_FAILPOINT=name`` through one tour that passes every
point: first start, download + install + promotion, boot success, a newer patch, a
boot crash (the host's pid exits before BootSuccess), another patch then a server
rollback, a manual rollback, an install that fails for lack of space, and a restart on
an old-format ``pointers.json``. The daemon must die there with status 86; it is then
restarted without the failpoint and :func:`invariants.check_after_restart` runs.

By default a spread sample of the names runs (CI time); ``PATCHD_FULL=1`` runs them all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from invariants import check_after_restart, listing

from patchd.core.model import Build
from patchd.host.process import FAILPOINT_EXIT
from patchd.state import lifecycle
from support.daemon import DaemonProcess

RELEASE = "1.4.0"
FULL = os.environ.get("PATCHD_FULL") == "1"
World = Any  # tests/e2e/conftest.py's World, handed over by the ``matrix_world`` fixture

BASE_EXTRA = """
[install]
min_free = "0"
"""
NO_SPACE_EXTRA = """
[install]
min_free = "1000GB"
"""


def all_failpoints() -> list[str]:
    """Every failpoint name declared now (lifecycle, plus install's if it has them)."""
    names = list(lifecycle.FAILPOINTS)
    try:
        from patchd.build import install

        names += [n for n in getattr(install, "FAILPOINTS", ()) if n not in names]
    except ImportError:  # pragma: no cover
        pass
    return names


NAMES = all_failpoints()
# CI: every 4th name, plus the ones only the end of the tour reaches.
SAMPLE = NAMES if FULL else sorted(set(NAMES[::4]) | {n for n in NAMES if n.startswith(
    ("install_aborted", "open.pointers", "forget", "mark_bad"))}, key=NAMES.index)


class Tour:
    """The flow that passes every failpoint, step by step, on one daemon."""

    def __init__(self, world: World, d: DaemonProcess) -> None:
        self.world = world
        self.d = d
        self.reached: list[str] = []

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("start", self.start),
            ("install p1", lambda: self.publish_and_check(1)),
            ("boot success p1", self.boot_success),
            ("install p2", lambda: self.publish_and_check(2)),
            ("boot crash p2", self.boot_crash),
            ("install p3", lambda: self.publish_and_check(3)),
            ("server rollback p3", self.server_rollback),
            ("manual rollback", self.manual_rollback),
            ("install without space", self.install_without_space),
            ("restart on old pointers", self.restart_old_pointers),
        ]

    def start(self) -> None:
        self.d.start(wait_ready=False)
        self.d.wait_notify("READY=1", timeout=30)

    def publish_and_check(self, patch: int) -> None:
        self.world.publish(patch)
        self.d.check_and_wait()

    def boot_success(self) -> None:
        self.d.call("BootStart", {"pid": os.getpid()})
        self.d.call("BootSuccess", {})

    def boot_crash(self) -> None:
        host = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        try:
            booted = self.d.call("BootStart", {"pid": host.pid})["build"]
        finally:
            host.kill()
            host.wait()
        self.d.wait_status(lambda s: any(b["build"] == booted and b["state"] == "bad"
                                         for b in s["builds"]), "boot crash detected")

    def server_rollback(self) -> None:
        self.world.publisher.roll_back(RELEASE, 3)
        self.d.check_and_wait()

    def manual_rollback(self) -> None:
        self.d.call("Rollback")

    def install_without_space(self) -> None:
        d = self.d
        mark = len(d.notifications)
        d.write_config(self.world.manifest_url, [self.world.publisher.public], NO_SPACE_EXTRA)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        reloading = d.wait_notify("RELOADING=1", after=mark)
        d.wait_notify("READY=1", after=reloading)
        self.world.publish(4)
        d.check_and_wait()
        status = d.status()
        assert status["last_error"] and "DiskFull" in status["last_error"], status

    def restart_old_pointers(self) -> None:
        d = self.d
        d.stop()
        path = d.state_dir / "pointers.json"
        doc = json.loads(path.read_text())
        doc.pop("os_release", None)
        path.write_text(json.dumps(doc))
        d.write_config(self.world.manifest_url, [self.world.publisher.public], BASE_EXTRA)
        self.start()

    def run(self) -> int | None:
        """Run the steps until the daemon dies; its exit status, or None if it lived."""
        for label, step in self.steps():
            self.reached.append(label)
            try:
                step()
            except Exception:
                if _wait_exit(self.d, 10) is None:
                    raise
            if self.d.proc is not None and self.d.proc.poll() is not None:
                return self.d.proc.returncode
        return None


def _wait_exit(d: DaemonProcess, timeout: float) -> int | None:
    if d.proc is None:
        return None
    try:
        return d.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("name", SAMPLE)
def test_killed_at_failpoint_then_invariants_hold(matrix_world: World, name: str) -> None:
    """The daemon dies with status 86 at the failpoint; restarted, every invariant holds."""
    world = matrix_world
    world.publisher.repo = world.nginx.root / f"fp-{name}"
    work = world.tmp / f"d-{name}"
    d = world.daemon(name, extra=BASE_EXTRA, env={"PATCHD_FAILPOINT": name}, work=work)
    before = listing(world.release_dir)
    tour = Tour(world, d)
    started = time.monotonic()
    rc = tour.run()
    assert rc is not None, f"failpoint {name} never reached; the tour ran {tour.reached}"
    assert rc == FAILPOINT_EXIT, (f"daemon exited {rc} (not {FAILPOINT_EXIT}) at step "
                                  f"{tour.reached[-1]!r} with {name}:\n{d.log()[-4000:]}")
    d.extra_env = {}
    if not (world.publisher.repo / "manifest.json").exists():
        world.publish(1)  # died before publishing: give the restart something to do
    d.write_config(world.manifest_url, [world.publisher.public], BASE_EXTRA)
    report = check_after_restart(d, world.trees | {_base(): world.release_dir},
                                 world.publisher.repo, RELEASE, before)
    d.stop()
    print(f"failpoint {name:34} died at step {tour.reached[-1]!r:28} → next_boot "
          f"{report.next_boot} builds {report.notes} ({time.monotonic() - started:.1f} s)")


def test_matrix_size_reported() -> None:
    """The matrix covers every declared failpoint name (two per write site at least)."""
    print(f"failpoint matrix: {len(NAMES)} names declared, {len(SAMPLE)} run "
          f"({'full' if FULL else 'sample; PATCHD_FULL=1 runs all'})")
    assert len(NAMES) >= 2 * len(lifecycle.WRITE_SITES)


def _base() -> Build:
    return Build(RELEASE, 0)
