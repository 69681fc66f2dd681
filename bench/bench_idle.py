"""Benchmark: what an idle daemon costs (issue 7): CPU % and RSS over a quiet window.

A real ``patchd run`` (tests/support/daemon.py) with ``poll_interval = 1h``, the unit's
``WatchdogSec=30s`` (so watchdog pings run as in production) and logging at info, is
started against a local repository holding one patch; its first check runs at once and
installs the patch, then the window starts. Over ``--seconds`` (default 60) the
daemon's utime+stime (/proc/PID/stat) gives its CPU %, and /proc/PID/status its RSS
(VmRSS at the end, VmHWM the peak since start, the install included).

Targets: < 0.5 % CPU, < 60 MiB RSS.

    .venv/bin/python bench/bench_idle.py               # 60 s window
    .venv/bin/python bench/bench_idle.py --seconds 10  # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from common import cpu_seconds, emit, rss_kib  # noqa: E402

CPU_TARGET = 0.5  # percent of one core
RSS_TARGET = 60.0  # MiB


def start_daemon(work: Path):  # type: ignore[no-untyped-def]
    from support.daemon import DaemonProcess, Publisher, write_tree

    release = write_tree(work / "opt", {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "r\n"},
                         version="1.4.0")
    target = write_tree(work / "t1", {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "p1\n"},
                        version="1.4.0")
    publisher = Publisher(work, work / "repo")
    publisher.publish(publisher.bundle("1.4.0", 1, release, target))
    daemon = DaemonProcess(work / "d", manifest_url=f"file://{work}/repo/manifest.json",
                           keys=[publisher.public], release_dir=release,
                           extra='[log]\nlevel = "info"\n[install]\nmin_free = "0"\n',
                           env={"PATCHD_FIRST_CHECK_DELAY": "0", "WATCHDOG_USEC": "30000000"})
    daemon.start()
    daemon.wait_status(lambda s: s["next_boot"]["patch"] == 1
                       and s["activity"]["phase"] == "idle", "patch 1 installed", 60)
    return daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pd-idle-", dir="/tmp") as tmp:
        daemon = start_daemon(Path(tmp))
        try:
            pid = daemon.proc.pid
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.seconds)  # the measurement window itself
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            rss, hwm = rss_kib(pid)
            alive = daemon.status()["next_boot"]["patch"] == 1
        finally:
            daemon.stop()
            daemon.close()
    cpu_pct = 100 * (cpu1 - cpu0) / (t1 - t0)
    rss_mib, hwm_mib = rss / 1024, hwm / 1024
    print(f"idle daemon over {t1 - t0:.1f} s (poll_interval 1h, watchdog 30 s)")
    print(f"CPU            {cpu_pct:7.3f} %    target < {CPU_TARGET} %   "
          f"{'PASS' if cpu_pct < CPU_TARGET else 'FAIL'}")
    print(f"RSS (VmRSS)    {rss_mib:7.1f} MiB  target < {RSS_TARGET:g} MiB  "
          f"{'PASS' if rss_mib < RSS_TARGET else 'FAIL'}")
    print(f"peak (VmHWM)   {hwm_mib:7.1f} MiB  target < {RSS_TARGET:g} MiB  "
          f"{'PASS' if hwm_mib < RSS_TARGET else 'FAIL'}")
    results = [
        emit("idle.cpu", cpu_pct, "%", f"< {CPU_TARGET} %", cpu_pct < CPU_TARGET),
        emit("idle.rss", rss_mib, "MiB", f"< {RSS_TARGET:g} MiB", rss_mib < RSS_TARGET),
        emit("idle.rss_peak", hwm_mib, "MiB", f"< {RSS_TARGET:g} MiB", hwm_mib < RSS_TARGET),
        emit("idle.still_serving", float(alive), "bool", "1", alive),
    ]
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
