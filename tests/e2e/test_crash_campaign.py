"""Crash campaign: SIGKILL the real daemon at random instants, restart, check the invariants.

Each round runs one cycle against a real nginx: the server rolls patch 1 back (the
daemon forgets it and falls back), then publishes it again (the daemon downloads a
multi-MB bundle under a rate limit, clones a release of a few thousand files and
installs, then promotes). A launcher thread meanwhile does BootStart/BootSuccess in a
loop, so kills also land in boot reports. At a random instant within the cycle's
measured length the daemon is SIGKILLed; it is restarted and
:func:`invariants.check_after_restart` must hold, and no build may have become bad
(nothing in this campaign is bad input, so a tombstone would be lost work).

``PATCHD_FULL=1``: 100 kills, 3,000 files, an 8 MB bundle; default: 12 kills, smaller.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from invariants import (
    build_states,
    check_after_restart,
    listing,
    published_patches,
    read_pointers,
)

from patchd.core.model import Bad, Build
from support.daemon import DaemonProcess

RELEASE = "1.4.0"
FULL = os.environ.get("PATCHD_FULL") == "1"
KILLS = int(os.environ.get("PATCHD_CRASH_KILLS", "100" if FULL else "12"))
RATE = "4MB" if FULL else "6MB"
SEED = int(os.environ.get("PATCHD_CRASH_SEED", str(random.randrange(1 << 30))))

EXTRA = f"""
[install]
min_free = "0"
clone = "copy"
max_download_rate = "{RATE}"
"""

# Last log event of the update → the phase a kill hit (boot events are tracked apart).
PHASES = {
    "update.rolled_back_by_server": "rollback", "lifecycle.rolled_back": "rollback",
    "lifecycle.forgotten": "rollback",
    "update.start": "download", "lifecycle.download_started": "download",
    "download.started": "download",
    "download.complete": "install", "lifecycle.download_complete": "install",
    "lifecycle.install_started": "install", "install.cloned": "install",
    "apply.complete": "install",
    "lifecycle.installed": "promotion", "lifecycle.promoted": "promotion",
    "install.complete": "done",
}


class Cycle:
    """One rollback + roll-forward cycle driven over the socket, and a boot loop."""

    def __init__(self, world: Any, d: DaemonProcess) -> None:
        self.world = world
        self.d = d
        self.stage = "idle"
        self.stop = threading.Event()
        self.boots = 0
        self.threads = [threading.Thread(target=self._drive, daemon=True),
                        threading.Thread(target=self._boot_loop, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a campaign thread did not end"

    def _drive(self) -> None:
        try:
            self.stage = "manifest fetch"
            self.world.publisher.roll_back(RELEASE, 1)
            self.d.call("CheckNow")
            self.stage = "publish"
            self.world.publish(1)
            self.stage = "manifest fetch"
            reply = self.d.call("CheckNow")
            self.stage = "update"
            if reply["strategy"] != "none":
                self.d.wait_status(lambda s: s["activity"]["phase"] == "idle", "idle", 120)
            self.stage = "done"
        except Exception:  # the daemon was killed under us: that is the point
            return

    def _boot_loop(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            try:
                self.d.call("BootStart", {"pid": os.getpid()}, timeout=10)
                # A host takes a while to come up: a kill often lands mid-boot.
                if self.stop.wait(rng.uniform(0, 0.2)):
                    return
                self.d.call("BootSuccess", {}, timeout=10)
                self.boots += 1
            except Exception:
                if self.d.proc is not None and self.d.proc.poll() is not None:
                    return
            self.stop.wait(rng.uniform(0, 0.1))  # pace the host; not a wait for a condition


def _events_since(log_path: Path, offset: int) -> list[str]:
    with log_path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    events = []
    for line in data.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("event"), str):
            events.append(doc["event"])
    return events


def _phase(stage: str, events: list[str]) -> str:
    if stage in ("manifest fetch", "publish", "done"):
        last = next((PHASES[e] for e in reversed(events) if e in PHASES), None)
        return "rollback" if stage != "done" and last == "rollback" else stage
    return next((PHASES[e] for e in reversed(events) if e in PHASES), "download")


@pytest.mark.timeout(120 + 20 * KILLS)  # full size: ~8 s per kill on 2 cores
def test_sigkill_at_random_instants_keeps_every_invariant(crash_world: Any) -> None:
    """SIGKILL at random instants of fetch/download/install/promotion/boot never breaks
    an invariant: READY, intact boot tree, newest patch installed, no leftovers,
    release_dir untouched, state parseable, nothing marked bad."""
    world = crash_world
    rng = random.Random(SEED)
    d = world.daemon("crashd", extra=EXTRA)
    trees = world.trees | {Build(RELEASE, 0): world.release_dir}
    repo = world.publisher.repo
    before = listing(world.release_dir)
    check_after_restart(d, trees, repo, RELEASE, before)  # first install, clean

    started = time.monotonic()  # calibrate: one cycle without a kill
    cycle = Cycle(world, d)
    cycle.start()
    cycle.threads[0].join(timeout=120)
    cycle.join()
    span = time.monotonic() - started
    assert cycle.stage == "done", f"calibration cycle did not finish:\n{d.log()[-4000:]}"

    hits: Counter[str] = Counter()
    booting_hits = boots = 0
    print(f"\ncrash campaign: {KILLS} kills, seed {SEED}, cycle {span:.2f} s, "
          f"{world.info['n_files']} files, {int(world.info['blob']) >> 20} MiB bundle at {RATE}/s")
    for i in range(KILLS):
        offset = d.log_path.stat().st_size
        cycle = Cycle(world, d)
        # A quarter of the kills aim at the first tenth (manifest fetch, rollback),
        # which is short; the rest spread over the whole cycle and a little after.
        delay = rng.uniform(0, span * (0.1 if rng.random() < 0.25 else 1.1))
        cycle.start()
        cycle.stop.wait(delay)  # the random instant itself is the point of the test
        d.kill()
        cycle.join()
        boots += cycle.boots
        phase = _phase(cycle.stage, _events_since(d.log_path, offset))
        booting = read_pointers(d.state_dir).currently_booting is not None \
            if (d.state_dir / "pointers.json").exists() else False
        booting_hits += booting
        hits[phase] += 1
        if 1 not in published_patches(repo, RELEASE):
            world.publish(1)  # killed between the rollback and the roll-forward
        report = check_after_restart(d, trees, repo, RELEASE, before)
        bad = {b: s for b, s in build_states(d.state_dir).items() if isinstance(s, Bad)}
        assert not bad, f"kill {i} ({phase}) left builds marked bad: {bad}\n{d.log()[-4000:]}"
        print(f"kill {i + 1:3}: at {delay:5.2f} s in {phase:<15}"
              f"{' +boot report' if booting else '':<14} → {report.next_boot} "
              f"{report.notes}")
    d.stop()
    print(f"kills by phase: {dict(hits)}; with a boot in progress: {booting_hits}; "
          f"{boots} boots reported; "
          f"all {KILLS} restarts kept every invariant")
