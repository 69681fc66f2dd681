"""Benchmark of the varlink socket: throughput, tail latency, and the cost of idle clients.

Run from the repository root: ``.venv/bin/python bench/bench_socket.py`` (``--seconds``
and ``--idle-seconds`` shorten or lengthen the phases). By default the server is the
REAL daemon (``patchd run`` started with tests/support/daemon.py, a patch installed,
logging at warning); ``--protocol`` benches the protocol layer alone: a bare server
process with a trivial ``GetBootTarget``. Either way the server is its own process, so
its CPU is measured on its own and the clients do not share its interpreter lock.

1. 50 concurrent connections (one call in flight each, driven by one selector loop)
   call GetBootTarget as fast as they can for ``--seconds``: requests/s (and p99,
   which in a closed loop is bound by Little's law: 50 in flight / rate).
2. The same 50 clients paced to 5,000 calls/s in total: p99 latency at that load.
3. 1,000 connections are opened and left idle; the server's CPU time (utime+stime
   from /proc) is measured over ``--idle-seconds``.

Targets (issue 8): ≥ 5,000 requests/s, p99 < 5 ms, idle CPU ~0.
"""

# This file is named socket.py; when run as a script its directory would come first on
# sys.path and shadow the standard library's socket module for every import below.
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import heapq
import json
import logging
import selectors
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENTS = 50
PACED_RATE = 5000.0
IDLE_CONNECTIONS = 1000
REQUEST = b'{"method":"io.patchd.Updater.GetBootTarget"}\0'


def serve(path: Path) -> None:
    """The server process: io.patchd.Updater with only GetBootTarget, until killed."""
    import anyio
    import structlog

    from patchd.service.interface import INTERFACE_NAME, INTERFACE_TEXT
    from patchd.varlink import Call, VarlinkServer, VarlinkService

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    async def get_boot_target(call: Call) -> dict[str, Any]:
        return {"build": {"release": "1.4.0", "patch": 2}, "path": "/var/lib/app/1.4.0/2"}

    async def main() -> None:
        service = VarlinkService(vendor="patchd", product="bench", version="0", url="")
        service.add_interface(INTERFACE_NAME, INTERFACE_TEXT, {"GetBootTarget": get_boot_target})
        server = VarlinkServer(service, path)
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: server.serve(task_status=task_status))
            print("ready", flush=True)

    anyio.run(main)


def load(path: Path, seconds: float, total_rate: float | None) -> tuple[float, float]:
    """(requests/s, p99 seconds) for CLIENTS connections with one call in flight each.

    One process drives all 50 connections with a selector: 50 client processes on a
    2-core machine measure the scheduler more than the server. ``total_rate`` None
    calls as fast as replies come; otherwise each connection is paced to its share
    and latency is measured from the scheduled send time, so a server that falls
    behind is charged for the queueing too (no coordinated omission).
    """
    selector = selectors.DefaultSelector()
    conns = []
    for i in range(CLIENTS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
        conns.append(sock)
    interval = None if total_rate is None else CLIENTS / total_rate
    start = time.perf_counter()
    deadline = start + seconds
    begun = [0.0] * CLIENTS
    buffers = [b""] * CLIENTS
    due: list[tuple[float, int]] = []  # (scheduled send time, connection)
    for i in range(CLIENTS):
        heapq.heappush(due, (start + (0 if interval is None else i * interval / CLIENTS), i))
    latencies: list[float] = []
    try:
        while True:
            now = time.perf_counter()
            while due and due[0][0] <= now:
                scheduled, i = heapq.heappop(due)
                if scheduled >= deadline:
                    continue
                begun[i] = scheduled if interval is not None else now
                conns[i].sendall(REQUEST)
            if not due and all(b == 0.0 for b in begun):
                break
            timeout = max(0.0, due[0][0] - now) if due else 0.05
            for key, _ in selector.select(timeout):
                i = key.data
                buffers[i] += conns[i].recv(65536)
                if not buffers[i].endswith(b"\0"):
                    continue
                end = time.perf_counter()
                if b'"error"' in buffers[i]:
                    raise RuntimeError(f"error reply: {buffers[i]!r}")
                latencies.append(end - begun[i])
                buffers[i], sent_at, begun[i] = b"", begun[i], 0.0
                next_time = end if interval is None else sent_at + interval
                heapq.heappush(due, (max(next_time, end) if interval is None else next_time, i))
    finally:
        for sock in conns:
            sock.close()
    latencies.sort()
    return len(latencies) / seconds, latencies[int(len(latencies) * 0.99)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(path: Path, pid: int, seconds: float) -> tuple[float, bool]:
    """(server CPU seconds over ``seconds`` with 1,000 idle connections, still serving)."""
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            idle.append(sock)
        # one round trip on the last one: every connection before it has been accepted
        idle[-1].sendall(REQUEST)
        idle[-1].recv(65536)
        before = cpu_seconds(pid)
        time.sleep(seconds)  # the measurement window itself, not a wait for an event
        used = cpu_seconds(pid) - before
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
            probe.sendall(REQUEST)
            alive = b'"build"' in probe.recv(65536)
        return used, alive
    finally:
        for sock in idle:
            sock.close()


def report(name: str, figure: str, target: str, ok: bool) -> bool:
    print(f"{name:<34} {figure:<28} target {target:<22} {'PASS' if ok else 'FAIL'}")
    return ok


def start_real_daemon(work: Path) -> Any:
    """A real ``patchd run`` (tests/support/daemon.py) with an installed patch, so
    GetBootTarget answers for 1.4.0+1 as a host would see it. Logging at warning: the
    daemon's per-call debug lines are not what is measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.daemon import DaemonProcess, Publisher, write_tree

    release = write_tree(work / "opt", {"bin/kiosk": "#!/bin/sh\n"}, version="1.4.0")
    target = write_tree(work / "t1", {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "p1\n"},
                        version="1.4.0")
    publisher = Publisher(work, work / "repo")
    daemon = DaemonProcess(work / "d", manifest_url=f"file://{work}/repo/manifest.json",
                           keys=[publisher.public], release_dir=release,
                           extra='[log]\nlevel = "warning"\n')
    daemon.start()
    bundle = publisher.bundle("1.4.0", 1, release, target)
    daemon.call("Install", {"path": str(bundle)})
    return daemon


def raise_fd_limit() -> None:
    """Room for 1,000 idle connections, in this process and the server it starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def measure(path: Path, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    cpu_before = cpu_seconds(pid)
    rate, p99_saturated = load(path, args.seconds, None)
    cpu_per_request = (cpu_seconds(pid) - cpu_before) / (rate * args.seconds)
    paced_rate, p99 = load(path, args.seconds, PACED_RATE)
    used, alive = idle_cpu(path, pid, args.idle_seconds)
    return {"rate": rate, "p99_saturated": p99_saturated, "cpu_per_request": cpu_per_request,
            "paced_rate": paced_rate, "p99": p99, "idle_cpu": used, "alive": alive}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load phase length")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle phase length")
    parser.add_argument("--protocol", action="store_true",
                        help="bench the protocol layer alone (a trivial handler in a bare "
                             "server) instead of the real daemon")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    raise_fd_limit()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vlb") as tmp:
        if args.protocol:
            what = "bare varlink server, trivial handler"
            path = Path(tmp) / "patchd.sock"
            server = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", str(path)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout is not None
                if server.stdout.readline().strip() != "ready":
                    raise SystemExit("the bench server did not start")
                m = measure(path, server.pid, args)
            finally:
                server.terminate()
                server.wait(10)
        else:
            what = "the real daemon (patchd run)"
            daemon = start_real_daemon(Path(tmp))
            try:
                m = measure(daemon.socket, daemon.proc.pid, args)
            finally:
                daemon.stop()
                daemon.close()
    rate, p99, used = m["rate"], m["p99"], m["idle_cpu"]
    print(f"GetBootTarget over the varlink socket of {what}: {CLIENTS} connections, "
          f"{args.seconds:g} s per phase")
    results = [
        report("throughput (saturating)", f"{rate:,.0f} req/s",
               f">= 5,000 ({rate / 5000:.2f}x)", rate >= 5000),
        report("server CPU per request", f"{m['cpu_per_request'] * 1e6:.0f} µs",
               "(figure only)", True),
        report("p99 latency (saturating)", f"{m['p99_saturated'] * 1000:.2f} ms",
               "(figure only)", True),
        report(
            f"p99 latency at {PACED_RATE:,.0f} req/s",
            f"{p99 * 1000:.2f} ms ({m['paced_rate']:,.0f} req/s)",
            f"< 5 ms ({p99 / 0.005:.2f}x)",
            p99 < 0.005,
        ),
        report(
            f"server CPU, {IDLE_CONNECTIONS} idle conns",
            f"{used:.2f} s in {args.idle_seconds:g} s",
            "~0 (< 1% of a core)",
            used < 0.01 * args.idle_seconds,
        ),
        report("served after the idle phase", str(m["alive"]), "True", m["alive"]),
    ]
    figures = {
        "server": "protocol" if args.protocol else "daemon",
        "req_per_s": round(rate),
        "server_cpu_us_per_req": round(m["cpu_per_request"] * 1e6, 1),
        "p99_saturated_ms": round(m["p99_saturated"] * 1000, 3),
        "p99_at_5000_ms": round(p99 * 1000, 3),
        "idle_cpu_s": used,
    }
    print(json.dumps(figures))
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # appended: no shadowing
    from common import emit  # RESULT lines for bench/run

    emit("socket.throughput", rate, "req/s", ">= 5000 req/s", rate >= 5000, ratio=rate / 5000)
    emit("socket.p99_at_5000", p99 * 1000, "ms", "< 5 ms", p99 < 0.005)
    emit("socket.cpu_per_request", m["cpu_per_request"] * 1e6, "us", "(figure only)", True)
    emit(f"socket.idle_cpu_{IDLE_CONNECTIONS}_conns", 100 * used / args.idle_seconds, "%",
         "< 1 % of a core", used < 0.01 * args.idle_seconds)
    emit("socket.served_after_idle", float(m["alive"]), "bool", "1", bool(m["alive"]))
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
