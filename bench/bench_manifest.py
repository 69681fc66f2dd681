"""Benchmark: the manifest's size after 1,000 publishes, bounded against the full history.

The real publisher (``patchd.publisher.publish``: pack, publish, ``--roll-back``)
publishes a year of a busy channel into a temp repository: patches for 4
architectures, each staged 10 % → 50 % → 100 % (three publishes), every 8th patch
rolled back at 10 % and fixed by the next, a renewal (a publish of no bundle) every
10th publish, a new release every 40 patches (a full bundle, then its patches). After
every publish:

- the size of ``manifest.json`` (the bounded manifest hosts fetch), against the
  baseline: the manifest the same publishes made before it was bounded (every patch of
  every release; computed with the same steps, unbounded, written as publish writes);
- (after every 5th publish) every host (each release, each next boot, 5 arches, 2
  rollout buckets, with and without a tombstone on the newest patch) decides from the
  bounded manifest as from the history; the documented exceptions (a tombstoned floor,
  a dropped release) are counted apart.

Targets: under 16 KiB at every point; no other difference.

    .venv/bin/python bench/bench_manifest.py
    .venv/bin/python bench/bench_manifest.py --publishes 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from common import emit  # noqa: E402
from patchd.core.model import Build  # noqa: E402
from patchd.host.logs import configure_logging  # noqa: E402
from patchd.publisher.history import HISTORY, with_bundle, with_rolled_back  # noqa: E402
from patchd.publisher.publish import keygen, pack_command, publish, roll_back  # noqa: E402
from patchd.trust.manifest import BundleRef, Manifest, manifest_to_json, parse_manifest  # noqa: E402
from patchd.trust.strategy import Decision, HostView, decide  # noqa: E402

ARCHS = ("x86_64", "aarch64", "armv7l", "riscv64")
HOST_ARCHS = (*ARCHS, "ppc64le")  # the last: named by no bundle
LIMIT = 16 * 1024
NOW = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Step:
    kind: str  # "patch" (a new patch at 10 %), "rollout", "rollback", "renew", "full"
    release: str
    patch: int = 0
    rollout: int = 0


def _releases() -> Iterator[Step]:
    """Patches of one release after another, each staged or rolled back."""
    release_no = 0
    while True:
        release = f"1.{release_no}"
        if release_no:
            yield Step("full", release)
        for patch in range(1, 41):
            yield Step("patch", release, patch, 10)
            if patch % 8 == 0:
                yield Step("rollback", release, patch)
                continue
            yield Step("rollout", release, patch, 50)
            yield Step("rollout", release, patch, 100)
        release_no += 1


def schedule(publishes: int) -> Iterator[Step]:
    """The channel's year, one publish at a time; every 10th is a renewal."""
    steps = _releases()
    release = "1.0"
    for i in range(publishes):
        if i % 10 == 9:
            yield Step("renew", release)
            continue
        step = next(steps)
        release = step.release
        yield step


class Channel:
    """The repository, its packer, and the unbounded baseline kept beside it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repo"
        self.key = work / "k.pem"
        keygen(self.key)
        self.baseline = Manifest("kiosk", "stable", 0, NOW, {})
        self.bundles: dict[tuple[str, int], list[Path]] = {}

    def tree(self, release: str, name: str, content: str) -> Path:
        path = self.work / "trees" / release / name
        if not path.exists():
            path.mkdir(parents=True)
            (path / "VERSION").write_text(release + "\n")
            (path / "app").write_text(content)
        return path

    def pack(self, release: str, patch: int) -> list[Path]:
        base = self.tree(release, "base", "base")
        target = self.tree(release, f"t{patch}", f"patch {patch}")
        out = []
        for arch in ARCHS:
            path = self.work / "bundles" / f"{release}-{patch}-{arch}.patchd"
            path.parent.mkdir(exist_ok=True)
            pack_command(app="kiosk", release=release, patch=None if patch == 0 else patch,
                         full=patch == 0, base=None if patch == 0 else base, target=target,
                         keys=[self.key], arch=arch, out=path)
            out.append(path)
        return out

    def run(self, step: Step, now: datetime) -> None:
        expires = timedelta(days=30)
        if step.kind == "rollback":
            roll_back(self.repo, "kiosk", "stable", [self.key], step.release, step.patch,
                      expires, now=now)
            self.baseline = with_rolled_back(self.baseline, step.release, step.patch)
            return
        bundles: list[Path] = []
        rollout: int | None = None
        if step.kind in ("patch", "full"):
            bundles = self.pack(step.release, step.patch)
            rollout = step.rollout if step.kind == "patch" else None
        elif step.kind == "rollout":
            bundles = [self.repo / step.release / f"{step.patch}-{a}.patchd" for a in ARCHS]
            rollout = step.rollout
        publish(self.repo, "kiosk", "stable", [self.key], bundles, rollout, expires, now=now)
        for path in bundles:  # the same step, unbounded, for the baseline
            arch = path.stem.rsplit("-", 1)[1]
            stem = "full" if step.kind == "full" else str(step.patch)
            url = f"{step.release}/{stem}-{arch}.patchd"
            size = (self.repo / url).stat().st_size
            ref = BundleRef(arch, url, size, "0" * 64)
            self.baseline = with_bundle(self.baseline, step.release, step.patch, ref,
                                        rollout, 100)

    def baseline_bytes(self) -> int:
        doc = manifest_to_json(self.baseline)
        return len((json.dumps(doc, indent=2) + "\n").encode())


def compare(history: Manifest, served: Manifest) -> tuple[int, int, int]:
    """(hosts checked, decisions that differ, of them documented exceptions)."""
    checked = differ = exceptions = 0
    for release, entry in history.releases.items():
        top = max((p.patch for p in entry.patches), default=0)
        for patch in range(top + 1):
            for arch in HOST_ARCHS:
                for client in ("a", "b"):
                    for bad in (frozenset(), frozenset({Build(release, top)})):
                        host = HostView(release, Build(release, patch), bad, arch, client)
                        checked += 1
                        full = decide(history, host)
                        bounded = decide(served, host)
                        if full == bounded:
                            continue
                        differ += 1
                        if release not in served.releases or tombstoned_floor(
                                served, host, full, bounded):
                            exceptions += 1
    return checked, differ, exceptions


def tombstoned_floor(served: Manifest, host: HostView, full: Decision,
                     bounded: Decision) -> bool:
    """The documented exception: the host tombstoned a patch offered to every host of its
    arch above the history's answer; the bounded manifest gives an older one or none."""
    if full.build is None:
        return False
    entry = served.releases[host.release]
    floor_bad = any(p.patch > full.build.patch and p.rollout == 100
                    and p.patch not in entry.rolled_back and p.bundle_for(host.arch)
                    and Build(host.release, p.patch) in host.bad for p in entry.patches)
    return floor_bad and (bounded == Decision("none") or (
        bounded.build is not None and bounded.build.patch < full.build.patch))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=1000)
    parser.add_argument("--check-every", type=int, default=5, metavar="N",
                        help="compare decisions after every Nth publish (and the last)")
    args = parser.parse_args()
    configure_logging("console", "warning", stream=sys.stderr)
    print(f"load average: {os.getloadavg()[0]:.2f} (2 cores shared)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        channel = Channel(Path(tmp))
        largest = checked = differ = exceptions = 0
        kinds: dict[str, int] = {}
        for i, step in enumerate(schedule(args.publishes)):
            kinds[step.kind] = kinds.get(step.kind, 0) + 1
            channel.run(step, NOW + timedelta(hours=i))
            data = (channel.repo / "manifest.json").read_bytes()
            largest = max(largest, len(data))
            if i % args.check_every and i != args.publishes - 1:
                continue
            history = parse_manifest((channel.repo / HISTORY).read_bytes())
            c, d, e = compare(history, parse_manifest(data))
            checked, differ, exceptions = checked + c, differ + d, exceptions + e
        size = len(data)
        base = channel.baseline_bytes()
        served = parse_manifest(data)
        print(f"{args.publishes} publishes ({', '.join(f'{n} {k}' for k, n in kinds.items())})"
              f" in {time.monotonic() - started:.0f} s; releases kept {sorted(served.releases)}")
        print(f"manifest.json {size} B (largest on the way {largest} B); the same history "
              f"unbounded {base} B; history file {(channel.repo / HISTORY).stat().st_size} B")
        print(f"decisions checked {checked} (after every {args.check_every}th publish): "
              f"{differ} differ, {exceptions} of them the documented exceptions")
        print(f"load average: {os.getloadavg()[0]:.2f}")
    ok = largest < LIMIT
    emit("manifest_bytes_after_publishes", size, "B", f"< {LIMIT} at every publish", ok,
         baseline=base, ratio=size / base)
    emit("manifest_bytes_largest", largest, "B", f"< {LIMIT}", ok, baseline=base,
         ratio=largest / base)
    emit("decisions_differing", differ - exceptions, "hosts", "0 (but the documented "
         "exceptions)", differ == exceptions, baseline=checked, ratio=(differ - exceptions)
         / max(1, checked))
    return 0 if ok and differ == exceptions else 1


if __name__ == "__main__":
    raise SystemExit(main())
