"""Bundle benchmark: pack time, bundle sizes, read+verify throughput and reader RSS.

Default: a 1 GiB, 20,000-file tree with 1 % of its files changed (small edits).
``--small``: 64 MiB, 2,000 files, for a quick run. Every figure is printed with its
baseline and the ratio; the baselines run in the same process on the same files:

- patch bundle size with deltas vs with ``delta=False``
- full bundle read+verify (the patchd reader, payloads hashed and discarded) and
  read+verify+apply (files written and fsynced) vs ``zstd -dc BUNDLE | tar -x``
- the reader's peak RSS (VmHWM of a child process) vs the 64 MiB budget

Usage: python bench/bench_bundle.py [--small] [--dir DIR] [--keep]
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

from common import emit, make_tree
from patchd.publisher.pack import pack
from patchd.trust.signing import public_raw

RSS_BUDGET = 64 * 1024 * 1024

READER_CHILD = r"""
import sys, time
from pathlib import Path
from patchd.trust import Expected, open_bundle
from patchd.trust.signing import TrustedKeys
from patchd.build.apply import apply_bundle
bundle, raw, mode = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3]
trust = TrustedKeys.from_raw([raw], 1)
t = time.perf_counter()
with open_bundle(bundle, trust, Expected("bench", "full", "1.0", 0, "x86_64")) as reader:
    if mode == "apply":
        apply_bundle(reader, Path(sys.argv[4]))
    else:
        for op, payload in reader.ops(lambda p: b""):
            if payload is not None:
                while payload.read(1 << 20):
                    pass
elapsed = time.perf_counter() - t
# VmHWM is this process's own peak; ru_maxrss of a child would include the parent's
# RSS at fork time.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(elapsed, int(hwm) * 1024)
"""


def change(base: Path, target: Path, files: list[Path], fraction: float) -> int:
    """Copy base to target (hard links), then rewrite ``fraction`` of the files with edits."""
    subprocess.run(["cp", "-al", str(base), str(target)], check=True)
    rng = random.Random(2)
    picked = rng.sample(files, max(1, int(len(files) * fraction)))
    for src in picked:
        dest = target / src.relative_to(base)
        data = bytearray(src.read_bytes())
        at = rng.randrange(0, max(1, len(data) - 64))
        data[at : at + 64] = rng.randbytes(64)
        dest.unlink()  # break the hard link: the base must stay intact
        dest.write_bytes(bytes(data))
    return len(picked)


def timed(fn: object, *args: object, **kw: object) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args, **kw)  # type: ignore[operator]
    return time.perf_counter() - t, result


def run_reader(bundle: Path, raw: bytes, mode: str, dest: Path | None = None
               ) -> tuple[float, int]:
    """(seconds inside the reader, peak RSS bytes) of a child process."""
    args = [sys.executable, "-c", READER_CHILD, str(bundle), raw.hex(), mode]
    if dest is not None:
        args.append(str(dest))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    if proc.wait():
        raise SystemExit(f"reader child failed ({proc.returncode})")
    elapsed, hwm = out.decode().split()[-2:]
    return float(elapsed), int(hwm)


def line(name: str, value: str, baseline: str = "", ratio: str = "") -> None:
    print(f"{name:<38} {value:>14} {baseline:>22} {ratio:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="64 MiB / 2,000 files")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = ap.parse_args()
    total, count = ((64 << 20), 2000) if opts.small else ((1 << 30), 20000)
    work = Path(tempfile.mkdtemp(prefix="patchd-bench-", dir=opts.dir))
    key = Ed25519PrivateKey.generate()
    raw = public_raw(key)
    try:
        base, target = work / "base", work / "target"
        t_gen, files = timed(make_tree, base, total, count)
        changed = change(base, target, files, 0.01)  # type: ignore[arg-type]
        size = sum(p.stat().st_size for p in files)  # type: ignore[attr-defined]
        print(f"tree: {count} files, {size / 2**20:.0f} MiB, {changed} changed "
              f"(generated in {t_gen:.1f}s) in {work}")
        print(f"{'figure':<38} {'value':>14} {'baseline':>22} {'ratio':>10}")

        common = {"app": "bench", "release": "1.0", "arch": "x86_64", "private_keys": [key]}
        t_delta, _ = timed(pack, **common, patch=1, kind="patch", base=base, target=target,
                           out=work / "delta.patchd")
        t_plain, _ = timed(pack, **common, patch=1, kind="patch", base=base, target=target,
                           out=work / "plain.patchd", delta=False)
        s_delta = (work / "delta.patchd").stat().st_size
        s_plain = (work / "plain.patchd").stat().st_size
        line("pack patch bundle, deltas (s)", f"{t_delta:.2f}", f"no-delta {t_plain:.2f}s",
             f"{t_delta / t_plain:.2f}x")
        line("patch bundle size, deltas (KiB)", f"{s_delta / 1024:.0f}",
             f"no-delta {s_plain / 1024:.0f} KiB", f"{s_delta / s_plain:.3f}x")

        full = work / "full.patchd"
        t_full, _ = timed(pack, **common, patch=0, kind="full", base=None, target=target,
                          out=full)
        s_full = full.stat().st_size
        line("pack full bundle (MiB/s of tree)", f"{size / t_full / 2**20:.0f}",
             f"{t_full:.1f}s, {s_full / 2**20:.0f} MiB", "")

        os.sync()
        t_read, rss = run_reader(full, raw, "verify")
        (work / "apply").mkdir()
        t_apply, rss_apply = run_reader(full, raw, "apply", work / "apply")
        (work / "tar").mkdir()
        t = time.perf_counter()
        subprocess.run(f"zstd -dc {full} | tar -x -C {work / 'tar'}", shell=True, check=True)
        t_tar = time.perf_counter() - t
        mib = size / 2**20
        line("read+verify (MiB/s)", f"{mib / t_read:.0f}", f"zstd|tar -x {mib / t_tar:.0f} MiB/s",
             f"{t_tar / t_read:.2f}x")
        line("read+verify+apply+fsync (MiB/s)", f"{mib / t_apply:.0f}",
             f"zstd|tar -x {mib / t_tar:.0f} MiB/s", f"{t_tar / t_apply:.2f}x")
        line("reader peak RSS, verify (MiB)", f"{rss / 2**20:.1f}",
             f"budget {RSS_BUDGET / 2**20:.0f} MiB", f"{rss / RSS_BUDGET:.2f}x")
        line("reader peak RSS, apply (MiB)", f"{rss_apply / 2**20:.1f}",
             f"budget {RSS_BUDGET / 2**20:.0f} MiB", f"{rss_apply / RSS_BUDGET:.2f}x")
        ok = max(rss, rss_apply) < RSS_BUDGET
        print("RSS budget:", "met" if ok else "EXCEEDED")
        emit("patch_bundle_size", s_delta / 1024, "KiB", "< no-delta size",
             s_delta < s_plain, s_plain / 1024, s_delta / s_plain)
        emit("read_verify", mib / t_read, "MiB/s", ">= 1.0x zstd|tar -x",
             t_tar / t_read >= 1.0, mib / t_tar, t_tar / t_read)
        emit("reader_rss", max(rss, rss_apply) / 2**20, "MiB", "< 64 MiB", ok,
             RSS_BUDGET / 2**20, max(rss, rss_apply) / RSS_BUDGET)
        if not ok:
            raise SystemExit(1)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
