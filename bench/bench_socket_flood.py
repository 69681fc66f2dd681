"""Boot reports under a socket flood: one local user holds 1,000 hostile connections.

The real daemon (``patchd run``, as root, socket group ``nogroup``) is flooded by
``nobody`` (a setuid child, tests/support/flood.py): 500 idle connections and 500 that
each sent 1 MiB of a message that never ends. Meanwhile root, a boot reporter, runs
BootStart/BootSuccess cycles. Figures: BootStart p99, the daemon's peak RSS, and the
longest gap between two WATCHDOG=1 pings (WATCHDOG_USEC=1 s: a ping every 0.5 s).
Root only (it switches uids).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.append(str(HERE))

from common import emit, rss_kib  # noqa: E402
from support.daemon import DaemonProcess, Publisher, write_tree  # noqa: E402
from support.flood import HostileFlood  # noqa: E402


class TimedList(list[str]):
    """The daemon's notifications, with the arrival time of each WATCHDOG=1."""

    def __init__(self) -> None:
        super().__init__()
        self.pings: list[float] = []

    def append(self, item: str) -> None:
        if "WATCHDOG=1" in item.splitlines():
            self.pings.append(time.monotonic())
        super().append(item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300, help="BootStart/BootSuccess pairs")
    parser.add_argument("--connections", type=int, default=1000, help="hostile connections")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_socket_flood needs root (it runs the flood as nobody)")
        return 0
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vlf") as tmp:
        work = Path(tmp)
        release = write_tree(work / "opt", {"bin/kiosk": "#!/bin/sh\n"}, version="1.4.0")
        d = DaemonProcess(work / "d", manifest_url=f"file://{work}/repo/manifest.json",
                          keys=[Publisher(work, work / "repo").public], release_dir=release,
                          extra='[api]\nsocket_group = "nogroup"\n[log]\nlevel = "warning"\n',
                          env={"WATCHDOG_USEC": "1000000"})
        d.notifications = TimedList()
        d.start()
        os.chmod(d.socket.parent, 0o755)
        assert d.proc is not None
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss_kib(d.proc.pid)[0])  # type: ignore[union-attr]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        latencies: list[float] = []
        half = args.connections // 2
        try:
            with HostileFlood(d.socket, "nobody", idle=half, heavy=args.connections - half):
                started = time.monotonic()
                for _ in range(args.cycles):
                    t = time.monotonic()
                    d.call("BootStart", timeout=10)
                    latencies.append(time.monotonic() - t)
                    d.call("BootSuccess", timeout=10)
                window = (started, time.monotonic())
        finally:
            stop.set()
            sampler.join()
            d.stop()
            d.close()
        pings: list[Any] = [p for p in d.notifications.pings  # type: ignore[attr-defined]
                            if window[0] - 1 <= p <= window[1] + 1]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        gap = max(gaps) if gaps else float("inf")
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"{args.connections} hostile connections by nobody; {args.cycles} boot cycles by root")
    ok = [
        emit("flood.bootstart_p99", p99 * 1000, "ms", "<= 50 ms", p99 <= 0.050),
        emit("flood.daemon_peak_rss", peak[0] / 1024, "MiB", "<= 100 MiB",
             peak[0] <= 100 * 1024),
        emit("flood.max_watchdog_gap", gap, "s", "<= 2 s", gap <= 2.0),
    ]
    return 0 if all(r.ok for r in ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
