"""Benchmark: an app keeps its pace while patchd downloads and installs a 1 GiB bundle.

The stand-in app is CPU-bound: one worker process per core (nice 0), each counting its
own loop iterations, so every core is busy and anything patchd takes shows. A real
nginx (niced to 19: it stands in for a remote server) serves a repository with a 1 GiB
patch bundle (16 files of random data). A real ``patchd run`` downloads and installs
it (``CheckNow`` until the update is done) at the unit's settings, applied outside
systemd as ``nice -n 19 ionice -c 2 -n 7`` (``Nice=19``,
``IOSchedulingClass=best-effort``, ``IOSchedulingPriority=7``; ``CPUWeight=`` and
``IOWeight=`` need the unit's cgroup).

The machine is shared, and its load drifts more in a minute than patchd costs; so the
baseline is taken in the same run, interleaved: the update runs in 1.5-second slices
with the daemon stopped (SIGSTOP) for 0.5 s between them, and the app's rate while
patchd ran is compared with its rate while it was stopped (the app alone). The same
again by a fresh daemon without the settings, for comparison.

Targets: the app keeps at least 90 % of its rate alone. Beside it: the daemon's peak
RSS (the unit's ``MemoryMax=`` has headroom over it) and its CPU seconds per GiB.

    .venv/bin/python bench/bench_gentle.py
    .venv/bin/python bench/bench_gentle.py --size-mb 128
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_fleet import Nginx  # noqa: E402
from common import cpu_seconds, emit, rss_kib  # noqa: E402
from daemon_run import RELEASE, DaemonProcess, publish_patch, start_daemon  # noqa: E402


def gentle_prefix(nice: int) -> list[str]:
    """The unit's settings (systemd/patchd@.service), as commands outside systemd."""
    return ["nice", "-n", str(nice), "ionice", "-c", "2", "-n", "7"]


WORKER = r"""
import signal, sys, time
marks = []
n = 0
def mark(*_):
    marks.append((time.monotonic(), n))
def stop(*_):
    mark()
    print(" ".join(f"{t:.6f}:{c}" for t, c in marks), flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, mark)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
mark()
while True:
    for _ in range(10000):
        pass
    n += 10000
"""


class App:
    """The stand-in app: one counting worker per core; :meth:`mark` has every worker
    note its count, so the rate of any stretch between two marks is known."""

    def __init__(self) -> None:
        self.workers = [subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE,
                                         text=True) for _ in range(os.cpu_count() or 1)]
        for w in self.workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"

    def mark(self) -> None:
        for w in self.workers:
            w.send_signal(signal.SIGUSR1)

    def stop(self) -> list[list[tuple[float, int]]]:
        """Each worker's marks: (monotonic time, iterations so far)."""
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
        out = []
        for w in self.workers:
            text, _ = w.communicate(timeout=30)
            out.append([(float(t), int(c)) for t, c in
                        (pair.split(":") for pair in text.split())])
        return out


def rates(marks: list[list[tuple[float, int]]], slices: list[tuple[float, float, bool]]
          ) -> tuple[float, float]:
    """The app's rate (all workers) while patchd ran, and while it was stopped: each
    worker's iterations between the marks nearest each slice's ends."""
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}  # iterations, worker-seconds
    for worker in marks:
        for begin, end, running in slices:
            a = min(worker, key=lambda m: abs(m[0] - begin))
            b = min(worker, key=lambda m: abs(m[0] - end))
            if b[0] > a[0]:
                totals[running][0] += b[1] - a[1]
                totals[running][1] += b[0] - a[0]
    per_worker = {k: v[0] / v[1] for k, v in totals.items() if v[1]}
    return per_worker[True] * len(marks), per_worker[False] * len(marks)


def during_update(daemon: object, slice_seconds: float, pause: float
                  ) -> tuple[float, float, float, float, int]:
    """The app's rate while patchd updates and while it is stopped (SIGSTOP), in
    alternating slices of the same run (a drifting load on the shared machine weighs on
    both alike); then the update's running seconds, CPU seconds and peak RSS (KiB)."""
    pid = daemon.proc.pid  # type: ignore[attr-defined]
    cpu_before = cpu_seconds(pid)
    app = App()
    reply = daemon.call("CheckNow")  # type: ignore[attr-defined]
    assert reply["strategy"] == "patch", reply
    slices: list[tuple[float, float, bool]] = []
    running_seconds = 0.0
    try:
        while True:
            begin = time.monotonic()
            app.mark()
            time.sleep(slice_seconds)
            status = daemon.status()  # type: ignore[attr-defined]
            app.mark()
            end = time.monotonic()
            slices.append((begin, end, True))
            running_seconds += end - begin
            if status["activity"]["phase"] == "idle":
                break
            os.kill(pid, signal.SIGSTOP)
            begin = time.monotonic()
            app.mark()
            time.sleep(pause)
            app.mark()
            slices.append((begin, time.monotonic(), False))
            os.kill(pid, signal.SIGCONT)
    finally:
        os.kill(pid, signal.SIGCONT)
    marks = app.stop()
    assert status["next_boot"] == {"release": RELEASE, "patch": 1}, status
    _, peak = rss_kib(pid)
    with_patchd, without = rates(marks, slices)
    return with_patchd, without, running_seconds, cpu_seconds(pid) - cpu_before, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="bundle size in MiB")
    parser.add_argument("--nice", type=int, default=19, help="the unit's Nice=")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the comparison without the settings")
    parser.add_argument("--slice", type=float, default=1.5,
                        help="seconds patchd runs before each pause")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds patchd is stopped between slices (the app alone)")
    args = parser.parse_args()
    from patchd.host.logs import configure_logging

    configure_logging("console", "warning", stream=sys.stderr)
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bench-gentle-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        repo = publish_patch(work, work / "www" / "stable", size)
        bundle_size = repo.bundle.stat().st_size
        print(f"bundle {bundle_size / 2**20:.0f} MiB made, packed and published in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        nginx = Nginx(work / "www", work / "nginx", prefix=["nice", "-n", "19"])
        daemons: list[DaemonProcess] = []
        try:
            def daemon(name: str, wrapper: list[str]) -> DaemonProcess:
                d = start_daemon(work / name, nginx.url("stable/manifest.json"), repo, wrapper)
                daemons.append(d)
                return d

            print(f"load average: {os.getloadavg()}", flush=True)
            gentle = during_update(daemon("gentle", gentle_prefix(args.nice)), args.slice,
                                   args.pause)
            plain = gentle if args.no_plain else during_update(daemon("plain", []), args.slice,
                                                                args.pause)
            print(f"load average: {os.getloadavg()}", flush=True)
        finally:
            for d in daemons:
                d.close()
            nginx.stop()
    gib = bundle_size / 2**30
    for name, (rate, base, secs, cpu, peak) in ((f"nice {args.nice}, ionice best-effort 7",
                                                 gentle),
                                                ("no settings", plain)):
        print(f"{name:30} app {rate / 1e6:6.1f} M/s, alone {base / 1e6:6.1f} M/s: "
              f"{rate / base:6.1%}; update {secs:4.0f} s running, daemon CPU {cpu:5.1f} s "
              f"({cpu / gib:.1f} s/GiB), peak RSS {peak / 1024:.0f} MiB")
    rate, base, _, cpu, peak = gentle
    ok = rate / base >= 0.9
    emit("app_rate_during_1gib_update", rate, "iter/s", ">= 0.9 x alone", ok,
         baseline=base, ratio=rate / base)
    emit("app_rate_during_1gib_update_unniced", plain[0], "iter/s", "report", True,
         baseline=plain[1], ratio=plain[0] / plain[1])
    peak_mib = max(peak, plain[4]) / 1024
    emit("patchd_peak_rss_1gib_update", peak_mib, "MiB", "< 256 (MemoryMax)", peak_mib < 256)
    emit("patchd_cpu_seconds_per_gib", cpu / gib, "s/GiB", "report", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
