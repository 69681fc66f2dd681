"""Install benchmark: materialise() of a 1 %-changed patch vs ``cp -al`` + ``tar -x``.

Default: a 1 GiB, 20,000-file release with a patch bundle changing 1 % of its files.
``--small``: 100 MiB, 2,000 files. In the same run, on the same files and a warm
cache, the baseline is ``cp -al base new`` plus extracting a tar of the changed files
of the target into ``new``; materialise() runs in a child process (fresh state directory,
bundle already downloaded) that reports its own time and peak RSS (VmHWM). Each side
runs ``--rounds`` times (default 3) and the best time counts.

Prints ``RESULT name=install_time ...`` and ``RESULT name=install_rss ...`` lines for
bench/run. Usage: python bench/bench_install.py [--small] [--dir DIR] [--keep] [--rounds N]
[--clone MODE] [--patchd-path DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import make_tree
from patchd.publisher.pack import pack
from patchd.trust.signing import public_raw

TIME_TARGET = 1.5
PATCHD_PATH = ""
RSS_BUDGET_MIB = 64

INSTALL_CHILD = r"""
import hashlib, logging, shutil, sys, time
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from patchd.build.install import InstallRequest, materialise
from patchd.state.lifecycle import Lifecycle
from patchd.core.model import Build
from patchd.trust.signing import TrustedKeys
state, cache, release, bundle, raw, clone = sys.argv[1:7]
build = Build("1.0", 1)
with Lifecycle.open(Path(state), Path(cache), Path(release)) as lc:
    h = hashlib.sha256()
    with open(bundle, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    lc.record_download_started(build, "file:///bench", h.hexdigest(), Path(bundle).stat().st_size)
    dest = lc.download_path(build)
    shutil.copyfile(bundle, dest)
    lc.record_download_complete(build)
    req = InstallRequest(build=build, bundle=dest, kind="patch", app="bench", arch="x86_64",
                         trust=TrustedKeys.from_raw([bytes.fromhex(raw)], 1), clone=clone)
    t = time.perf_counter()
    materialise(lc, req)
    lc.promote_to_next_boot(req.build)  # as the updater does next
    elapsed = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(elapsed, int(hwm) * 1024)
"""


def change(base: Path, target: Path, files: list[Path], fraction: float) -> list[str]:
    """Hard-link base to target, then rewrite ``fraction`` of the files with small edits."""
    subprocess.run(["cp", "-al", str(base), str(target)], check=True)
    rng = random.Random(2)
    changed = []
    for src in rng.sample(files, max(1, int(len(files) * fraction))):
        rel = src.relative_to(base)
        data = bytearray(src.read_bytes())
        at = rng.randrange(0, max(1, len(data) - 64))
        data[at : at + 64] = rng.randbytes(64)
        (target / rel).unlink()
        (target / rel).write_bytes(bytes(data))
        changed.append(str(rel))
    return sorted(changed)


def baseline(base: Path, tar: Path, dest: Path) -> float:
    """Seconds for ``cp -al base dest`` plus extracting the changed files' tar into it."""
    t = time.perf_counter()
    subprocess.run(["cp", "-al", str(base), str(dest)], check=True)
    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
    return time.perf_counter() - t


def run_install(work: Path, base: Path, bundle: Path, raw: bytes, clone: str, i: int
                ) -> tuple[float, int]:
    """(seconds inside install(), peak RSS bytes) of a child with a fresh state dir."""
    args = [sys.executable, "-c", INSTALL_CHILD, str(work / f"state{i}"),
            str(work / f"cache{i}"), str(base), str(bundle), raw.hex(), clone]
    env = dict(os.environ)
    if PATCHD_PATH:  # --patchd-path: measure another checkout's daemon/ (before/after)
        env["PYTHONPATH"] = PATCHD_PATH
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    elapsed, hwm = out.split()[-2:]
    return float(elapsed), int(hwm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="100 MiB / 2,000 files")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side (best counts)")
    ap.add_argument("--clone", default="auto", help="install.clone mode (default auto)")
    ap.add_argument("--patchd-path", default="", help="PYTHONPATH for the install child")
    opts = ap.parse_args()
    global PATCHD_PATH
    PATCHD_PATH = opts.patchd_path
    total, count = ((100 << 20), 2000) if opts.small else ((1 << 30), 20000)
    work = Path(tempfile.mkdtemp(prefix="patchd-bench-install-", dir=opts.dir))
    key = Ed25519PrivateKey.generate()
    try:
        base, target = work / "base", work / "target"
        t = time.perf_counter()
        files = make_tree(base, total, count, version="1.0")
        changed = change(base, target, files, 0.01)
        size = sum(p.stat().st_size for p in files)
        print(f"tree: {count} files, {size / 2**20:.0f} MiB, {len(changed)} changed "
              f"(generated in {time.perf_counter() - t:.1f}s) in {work}")
        bundle = work / "patch.patchd"
        pack(app="bench", release="1.0", patch=1, kind="patch", arch="x86_64",
             private_keys=[key], base=base, target=target, out=bundle)
        tar = work / "changed.tar"
        listfile = work / "changed.list"
        listfile.write_text("".join(f"{rel}\n" for rel in changed))
        subprocess.run(["tar", "-cf", str(tar), "-C", str(target), "-T", str(listfile)],
                       check=True)
        print(f"bundle {bundle.stat().st_size / 1024:.0f} KiB, "
              f"tar of changed files {tar.stat().st_size / 1024:.0f} KiB")
        os.sync()
        base_times, inst_times, rss = [], [], 0
        for i in range(opts.rounds):
            # Each side starts with nothing dirty: the fsyncs inside materialise() must not be
            # charged for flushing the previous round's removals.
            os.sync()
            base_times.append(baseline(base, tar, work / f"cp{i}"))
            os.sync()
            elapsed, hwm = run_install(work, base, bundle, public_raw(key), opts.clone, i)
            inst_times.append(elapsed)
            rss = max(rss, hwm)
            print(f"round {i}: baseline {base_times[-1]:.3f}s  install {elapsed:.3f}s  "
                  f"rss {hwm / 2**20:.1f} MiB")
            shutil.rmtree(work / f"cp{i}")
            shutil.rmtree(work / f"state{i}")
        b, inst = min(base_times), min(inst_times)
        ratio = inst / b
        mib = rss / 2**20
        print(f"RESULT name=install_time value={inst:.3f} unit=s baseline={b:.3f} "
              f"ratio={ratio:.2f} target=<={TIME_TARGET} "
              f"pass={'yes' if ratio <= TIME_TARGET else 'no'}")
        print(f"RESULT name=install_rss value={mib:.1f} unit=MiB baseline=- ratio=- "
              f"target=<{RSS_BUDGET_MIB} pass={'yes' if mib < RSS_BUDGET_MIB else 'no'}")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
