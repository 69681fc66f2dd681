"""Crash safety of materialise(): a child installing a bundle is SIGKILLed at random instants;
after each kill the reopened store holds no staging junk and no temp files, and the
next attempt installs a tree identical (bytes, modes, links) to the expected one.
"""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patchd.build.install import materialise
from patchd.core.model import Build, Downloaded, Installed
from patchd.host.process import FAILPOINT_EXIT
from patchd.trust.signing import public_raw
from support.install_child import Env, leftovers, listing, listing_digest, make_env, stage_download
from support.trees import big_content

FULL = os.environ.get("PATCHD_FULL") == "1"
KILLS = int(os.environ.get("PATCHD_INSTALL_KILLS", "50" if FULL else "10"))
CHILD = Path(__file__).parent / "support" / "install_child.py"
R = "1.0"
B1 = Build(R, 1)


def _trees(env: Env, rng: random.Random) -> Path:
    """A release of ~400 files in nested dirs and a target changing, adding, deleting,
    retyping and re-moding a share of them; returns the target tree."""
    target = env.work / "target"
    for root in (env.release, target):
        (root / "lib").mkdir(parents=True)
        (root / "VERSION").write_text("1.0\n")
    for d in range(20):
        for f in range(20):
            rel = f"lib/d{d:02}/f{f:02}"
            data = big_content(d * 100 + f, 0) if f % 5 == 0 else rng.randbytes(rng.randrange(2000))
            for root in (env.release, target):
                (root / rel).parent.mkdir(exist_ok=True)
            (env.release / rel).write_bytes(data)
            roll = rng.random()
            if roll < 0.1:
                continue  # deleted
            if roll < 0.2 and f % 5 == 0:
                (target / rel).write_bytes(big_content(d * 100 + f, 2))  # a delta
            elif roll < 0.3:
                (target / rel).write_bytes(rng.randbytes(3000))
            elif roll < 0.35:
                os.symlink(f"f{(f + 1) % 20:02}", target / rel)
                continue
            else:
                (target / rel).write_bytes(data)
            os.chmod(target / rel, 0o755 if roll < 0.4 else 0o644)
    for d in range(5):
        (target / "new" / f"n{d}").mkdir(parents=True)
        (target / "new" / f"n{d}" / "file").write_bytes(rng.randbytes(5000))
    return target


def _spawn(env: Env, bundle: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(CHILD), str(env.state), str(env.cache), str(env.release),
            str(bundle), R, "1", "patch", "hardlink", public_raw(env.key).hex()]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_line(proc: subprocess.Popen[bytes], want: bytes, timeout: float) -> None:
    """Block until the child printed ``want`` (fail at the deadline)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child did not print {want!r} in {timeout} s"
    line = proc.stdout.readline().strip()
    assert line == want, (line, proc.stderr.read() if proc.stderr else b"")
    assert time.monotonic() <= deadline


def _fresh_round(env: Env, bundle: Path, index: int) -> None:
    """New state and cache dirs holding the downloaded bundle, as the downloader leaves them."""
    env.state = env.work.parent / f"state{index}"
    env.cache = env.work.parent / f"cache{index}"
    with env.open() as lc:
        stage_download(lc, B1, bundle)


def test_sigkill_during_install_leaves_no_junk_and_retry_is_exact(tmp_path: Path) -> None:
    """SIGKILL at 10 random instants (50 with PATCHD_FULL=1) of a child's install: after
    reopening, no staging or temp files remain, and the finished tree is exact."""
    rng = random.Random(int(os.environ.get("PATCHD_CRASH_SEED", "6")))
    env = make_env(tmp_path)
    target = _trees(env, rng)
    expected = listing(target)
    bundle = env.pack(B1, env.release, target)
    release_digest = listing_digest(env.release)

    # One uninterrupted run measures how long materialise() takes in the child.
    _fresh_round(env, bundle, 0)
    with _spawn(env, bundle) as proc:
        _wait_line(proc, b"ready", 30)
        started = time.monotonic()
        _wait_line(proc, b"done", 60)
        duration = time.monotonic() - started
        assert proc.wait(10) == 0
    assert listing(env.state / "builds" / R / "1" / "tree") == expected

    interrupted = 0
    for i in range(1, KILLS + 1):
        _fresh_round(env, bundle, i)
        with _spawn(env, bundle) as proc:
            _wait_line(proc, b"ready", 30)
            time.sleep(rng.uniform(0, duration))  # the random instant is the point here
            proc.kill()
            proc.wait(10)
        with env.open() as lc:  # start-up sweep
            assert leftovers(env.state) == [], f"round {i}"
            state = lc.state(B1)
            if isinstance(state, Installed):
                assert listing(lc.tree_path(B1)) == expected, f"round {i}"
                assert lc.pointers.next_boot == B1, f"round {i}: promotion lost"
            else:
                interrupted += 1
                assert isinstance(state, Downloaded), (i, state)
                assert not (env.state / "builds" / R / "1" / "tree").exists()
                assert lc.download_path(B1).is_file()
                assert lc.pointers.next_boot == Build(R, 0)
                materialise(lc, env.request(B1, lc.download_path(B1), clone="hardlink"))
                lc.promote_to_next_boot(B1)  # as the updater does next
            assert listing(lc.tree_path(B1)) == expected, f"round {i}"
            assert lc.pointers.next_boot == B1
        assert leftovers(env.state) == []
        assert listing_digest(env.release) == release_digest, f"release changed in round {i}"
    print(f"install took {duration:.3f} s; {interrupted} of {KILLS} kills interrupted it")
    if interrupted < KILLS // 3:
        pytest.fail(f"only {interrupted} of {KILLS} kills landed inside install()")


def test_kill_after_install_complete_still_promotes(tmp_path: Path) -> None:
    """Dying right after the installed state is written must still end with the new
    build as next_boot once the daemon restarts."""
    env = make_env(tmp_path)
    (env.release / "a").parent.mkdir(parents=True)
    (env.release / "VERSION").write_text("1.0\n")
    (env.release / "a").write_text("old")
    target = env.work / "target"
    target.mkdir()
    (target / "VERSION").write_text("1.0\n")
    (target / "a").write_text("new")
    bundle = env.pack(B1, env.release, target)
    _fresh_round(env, bundle, 0)
    args = [sys.executable, str(CHILD), str(env.state), str(env.cache), str(env.release),
            str(bundle), R, "1", "patch", "hardlink", public_raw(env.key).hex()]
    done = subprocess.run(args, capture_output=True, timeout=60,
                          env={**os.environ, "PATCHD_FAILPOINT": "install_complete.after"})
    assert done.returncode == FAILPOINT_EXIT, done.stderr
    with env.open() as lc:
        assert isinstance(lc.state(B1), Installed)
        assert lc.pointers.next_boot == B1
