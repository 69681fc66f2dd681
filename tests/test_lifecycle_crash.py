"""Crash consistency: a process driving the store is killed at random instants (SIGKILL)
or at named failpoints, and reloading the store always satisfies the invariants."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import structlog

from patchd.core.model import Build
from patchd.host.process import FAILPOINT_EXIT
from patchd.state.lifecycle import FAILPOINTS, Lifecycle
from support.lifecycle_child import check_files_parse, check_invariants, make_release, random_step

FULL = os.environ.get("PATCHD_FULL") == "1"
KILLS = int(os.environ.get("PATCHD_CRASH_KILLS", "1000" if FULL else "200"))
CHILD = Path(__file__).parent / "support" / "lifecycle_child.py"


def _child(dirs: tuple[Path, Path, Path], seed: int, progress: int) -> None:
    """In the forked child: random transitions forever, one byte on ``progress`` per step."""
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        rng = random.Random(seed)
        with Lifecycle.open(*dirs) as lc:
            while True:
                random_step(lc, rng)
                os.write(progress, b".")
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def _wait_steps(fd: int, count: int, deadline: float) -> None:
    """Block until the child reported ``count`` steps (or fail at the deadline)."""
    seen = 0
    while seen < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "child made no progress before the deadline"
        data = os.read(fd, 4096)
        assert data, "child exited on its own"
        seen += len(data)


def test_sigkill_at_random_instants_keeps_invariants(tmp_path: Path) -> None:
    """SIGKILL at 200 random instants (1000 full) of random transitions; reloads keep invariants."""
    dirs = make_release(tmp_path, "1.0.0")
    rng = random.Random(int(os.environ.get("PATCHD_CRASH_SEED", "4")))
    bad: set[Build] = set()
    started = time.monotonic()
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            os.close(read_fd)
            _child(dirs, rng.randrange(2**32), write_fd)
        os.close(write_fd)
        try:
            _wait_steps(read_fd, rng.randint(0, 12), time.monotonic() + 30)
            # The kill instant itself is what is random here, not a wait for something.
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGKILL)
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(read_fd)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"kill {kill}: child ended with status {status} instead of being killed")
        check_files_parse(dirs[0])  # before open repairs anything: no torn file
        with Lifecycle.open(*dirs) as lc:
            check_invariants(lc)
            now = lc.bad_builds()
            assert bad <= now, f"kill {kill}: tombstones lost {bad - now}: {lc!r}"
            bad = now
    elapsed = time.monotonic() - started
    print(f"{KILLS} kills in {elapsed:.1f}s, {len(bad)} builds bad at the end")


def _run_child(dirs: tuple[Path, Path, Path], failpoint: str, seed: int, steps: int,
               ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHD_FAILPOINT": failpoint}
    return subprocess.run([sys.executable, str(CHILD), *map(str, dirs), str(seed), str(steps)],
                          env=env, capture_output=True, text=True, timeout=120)


# Failpoints the random driver reaches within a few hundred steps from a fresh store.
QUICK_FAILPOINTS = ["release_change.pointers.after", "download_started.after",
                    "install_complete.before", "promote.pointers.after",
                    "current_link.before", "boot_failure.tombstone.after", "forget.after"]


@pytest.mark.parametrize("name", FAILPOINTS if FULL else QUICK_FAILPOINTS)
def test_failpoint_crash_keeps_invariants(tmp_path: Path, name: str) -> None:
    """Dying at a named failpoint (before/after a state write) leaves a reloadable store."""
    dirs = make_release(tmp_path, "1.0.0")
    fired = False
    for seed in range(4):
        proc = _run_child(dirs, name, seed, 400)
        assert proc.returncode in (0, FAILPOINT_EXIT), proc.stderr
        fired = fired or proc.returncode == FAILPOINT_EXIT
        check_files_parse(dirs[0])
        with Lifecycle.open(*dirs) as lc:
            check_invariants(lc)
        if fired:
            break
    if name in QUICK_FAILPOINTS:
        assert fired, f"failpoint {name} was never reached"
