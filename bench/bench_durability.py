"""Durability cost: fsyncs per install and per state change, and their time on a real disk.

The power-cut campaign (tests/e2e/test_powercut.py) decides which fsyncs are needed;
this bench says what they cost. In this process, on the disk holding ``--dir`` (default:
a temp dir under /var/tmp, a real disk, never tmpfs), it counts and times every
``os.fsync`` the daemon's code makes while it:

- installs a patch (``materialise()``: hard-link clone of a ``make_tree`` release, a
  bundle changing 1 % of the files, the state writes around it) — the figure is the
  count, whose target is the proven minimum: one per directory of the new tree, one
  per file the bundle wrote, one for the rename into place, two per state file;
- records boot start + boot success in a loop (one state change each: ``pointers.json``
  written atomically = 2 fsyncs).

Baseline of the install: the same install with fsync made a no-op, then one ``syncfs``
of the file system (what the code did before the campaign: cheaper, but invisible to
FUSE and network file systems and not proven). Each side runs ``--rounds`` times and
the best counts, as in the other benches. Prints RESULT lines for bench/run.

Usage: python bench/bench_durability.py [--small] [--dir DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench_install import change
from common import emit, make_tree
from patchd.build.install import InstallRequest, materialise
from patchd.core.model import Build
from patchd.publisher.pack import pack
from patchd.state.lifecycle import Lifecycle
from patchd.trust.signing import TrustedKeys, public_raw

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
B1 = Build("1.0", 1)
#: fsync time of one install (best round): an update is rare and its download takes
#: longer; half a second of flushing is the budget. The ratio to one syncfs is shown.
INSTALL_FSYNC_TARGET_MS = 500.0
STATE_CHANGE_TARGET_MS = 50.0


class FsyncMeter:
    """Counts and times os.fsync while installed; ``noop`` makes fsync do nothing."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._real: Callable[[int], None] = os.fsync

    @contextmanager
    def measuring(self, noop: bool = False) -> Iterator[FsyncMeter]:
        self.count, self.seconds = 0, 0.0
        real = self._real

        def fsync(fd: int) -> None:
            self.count += 1
            if noop:
                return
            t = time.perf_counter()
            real(fd)
            self.seconds += time.perf_counter() - t

        os.fsync = fsync  # type: ignore[assignment]
        try:
            yield self
        finally:
            os.fsync = real  # type: ignore[assignment]


def syncfs(path: Path) -> float:
    """Seconds of one syncfs(2) of the file system holding ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t = time.perf_counter()
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        return time.perf_counter() - t
    finally:
        os.close(fd)


def install_once(work: Path, base: Path, bundle: Path, key: Ed25519PrivateKey,
                 meter: FsyncMeter, noop: bool) -> tuple[int, float, int, int]:
    """(fsyncs, seconds in fsync, directories of the tree, files the bundle wrote)."""
    state, cache = work / "state", work / "cache"
    with Lifecycle.open(state, cache, base) as lc:
        dest = lc.download_path(B1)
        sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
        # A download starts from no file (record_download_started deletes any): the
        # bytes land after it, as the downloader writes them.
        lc.record_download_started(B1, "file:///bench", sha, bundle.stat().st_size)
        shutil.copyfile(bundle, dest)
        lc.record_download_complete(B1)
        req = InstallRequest(build=B1, bundle=dest, kind="patch", app="bench",
                             arch="x86_64", trust=TrustedKeys.from_raw([public_raw(key)], 1),
                             clone="hardlink")
        os.sync()  # start clean: the meter must not pay for the setup's writes
        with meter.measuring(noop):
            installed = materialise(lc, req)
        tree = lc.tree_path(B1)
    dirs = sum(1 for _ in os.walk(tree))
    return meter.count, meter.seconds, dirs, len(installed.files)


def state_changes(work: Path, base: Path, meter: FsyncMeter, n: int) -> tuple[float, float]:
    """(fsyncs per state change, milliseconds per state change) over ``n`` boot pairs."""
    with Lifecycle.open(work / "state-boot", work / "cache-boot", base) as lc:
        os.sync()
        t = time.perf_counter()
        with meter.measuring():
            for _ in range(n):
                lc.record_boot_start(None, os.getpid(), None)
                lc.record_boot_success(None)
        elapsed = time.perf_counter() - t
        count = meter.count
    return count / (2 * n), elapsed * 1000 / (2 * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="20 MiB / 500 files")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="a directory on the disk to measure (default /var/tmp)")
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    total, count = ((20 << 20), 500) if opts.small else ((100 << 20), 2000)
    work = Path(tempfile.mkdtemp(prefix="patchd-bench-durability-", dir=opts.dir))
    key = Ed25519PrivateKey.generate()
    meter = FsyncMeter()
    try:
        base, target = work / "base", work / "target"
        files = make_tree(base, total, count, version="1.0")
        changed = change(base, target, files, 0.01)
        bundle = work / "patch.patchd"
        pack(app="bench", release="1.0", patch=1, kind="patch", arch="x86_64",
             private_keys=[key], base=base, target=target, out=bundle)
        print(f"tree: {count} files, {len(changed)} changed, on {work}")
        best: tuple[int, float, int, int] | None = None
        base_s = float("inf")
        for i in range(opts.rounds):
            got = install_once(work / f"r{i}", base, bundle, key, meter, noop=False)
            best = got if best is None or got[1] < best[1] else best
            install_once(work / f"n{i}", base, bundle, key, meter, noop=True)
            base_s = min(base_s, syncfs(work))
            print(f"round {i}: {got[0]} fsyncs, {got[1] * 1000:.1f} ms in fsync "
                  f"({got[2]} dirs, {got[3]} files written); syncfs {base_s * 1000:.1f} ms")
            shutil.rmtree(work / f"r{i}")
            shutil.rmtree(work / f"n{i}")
        assert best is not None
        fsyncs, secs, dirs, written = best
        # two state files (install started, complete) = 4, and the rename into place = 1
        minimum = dirs + written + 5
        emit("durability_fsyncs_per_install", fsyncs, "fsyncs", f"<={minimum}",
             fsyncs <= minimum)
        ratio = secs / base_s if base_s > 0 else float("inf")
        emit("durability_fsync_time_install", secs * 1000, "ms",
             f"<={INSTALL_FSYNC_TARGET_MS:g}", secs * 1000 <= INSTALL_FSYNC_TARGET_MS,
             baseline=base_s * 1000, ratio=ratio)
        per, ms = state_changes(work, base, meter, 20 if opts.small else 100)
        emit("durability_fsyncs_per_state_change", per, "fsyncs", "<=2", per <= 2)
        emit("durability_state_change_time", ms, "ms", f"<={STATE_CHANGE_TARGET_MS:g}",
             ms <= STATE_CHANGE_TARGET_MS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
