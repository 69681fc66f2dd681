"""Benchmark: the fleet model (bench/fleet.py) against 50 real daemons polling one nginx.

A real nginx on 127.0.0.1 (its access log with the time, status, body and response
bytes of each request) serves a repository; 50 real ``patchd run`` daemons poll it
every 15 s (jitter 0.1, first poll spread over 15 s, as the config and the daemon do
it). Once every daemon polled, a 250-second window: a patch goes out at 50 %, then at
100 %, a second patch at 100 %, then a renewal (real publishes, real ~200 KB bundles
that the daemons download and install). The model is given the same inputs (hosts,
interval, jitter, the publishes with the manifest, signature and bundle sizes, the
rollout steps, and the response header sizes nginx sends, measured on two requests
before the run) and predicts the window's requests, per-second rate and bytes.

Targets: the model's request rate and bytes within 10 % of the access log. The p99 of
the per-second counts is reported beside (a 250-second sample is short for a p99).

    .venv/bin/python bench/bench_fleet.py
    .venv/bin/python bench/bench_fleet.py --hosts 20 --window 120
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from common import emit  # noqa: E402
from fleet import Publish, Window, window_model  # noqa: E402
from support.nginx import NGINX, run_nginx  # noqa: E402

#: The access log: when, what was answered and how many bytes went out, per request.
LOG_FORMAT = "'$msec $status $body_bytes_sent $bytes_sent $request_method $uri'"


@dataclass(frozen=True)
class Line:
    at: float
    status: int
    body: int
    sent: int
    path: str


class Nginx:
    """tests/support/nginx.py's ``run_nginx`` with the fleet's access log (times and
    bytes sent), room for a fleet's connections, and a ``prefix`` for bench_gentle's
    ``nice``; started on construction and stopped by :meth:`stop`, as the benches use it.
    """

    def __init__(self, root: Path, work: Path, prefix: list[str] | None = None) -> None:
        self.root, self.work = root, work
        self._stack = contextlib.ExitStack()
        self._repo = self._stack.enter_context(run_nginx(
            root, work, prefix=prefix, log_format=LOG_FORMAT, worker_connections=1024))
        self.port = self._repo.port

    def url(self, name: str) -> str:
        return self._repo.url(name)

    def lines(self) -> list[Line]:
        out = []
        for text in (self.work / "access.log").read_text().splitlines():
            at, status, body, sent, _method, path = text.split(" ", 5)
            out.append(Line(float(at), int(status), int(body), int(sent), path))
        return out

    def barrier(self) -> list[Line]:
        """Every request made so far, once nginx logged a marker request after them."""
        marker = f"/.barrier-{time.monotonic_ns()}"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(self.url(marker[1:]), timeout=5)  # 404, logged
        while True:
            lines = self.lines()
            if any(line.path == marker for line in lines):
                return [line for line in lines if not line.path.startswith("/.barrier")]
            time.sleep(0.02)

    def stop(self) -> None:
        self._stack.close()


def header_sizes(nginx: Nginx) -> tuple[int, int]:
    """Response bytes besides the body nginx sends for a 200 and a 304 of the manifest."""
    with urllib.request.urlopen(nginx.url("stable/manifest.json"), timeout=5) as r:
        etag = r.headers["ETag"]
    request = urllib.request.Request(nginx.url("stable/manifest.json"),
                                     headers={"If-None-Match": etag})
    with contextlib.suppress(urllib.error.HTTPError):  # 304 raises
        urllib.request.urlopen(request, timeout=5)
    lines = nginx.barrier()[-2:]
    full, not_modified = lines
    assert (full.status, not_modified.status) == (200, 304), lines
    return full.sent - full.body, not_modified.sent - not_modified.body


@contextlib.contextmanager
def fleet(args: argparse.Namespace, work: Path) -> Iterator[tuple[Nginx, object, list[object]]]:
    from support.daemon import DaemonProcess, Publisher, write_tree

    release = write_tree(work / "opt", {"bin/app": "r\n"}, version="1.4.0")
    repo = work / "www" / "stable"
    repo.mkdir(parents=True)
    publisher = Publisher(work, repo)
    nginx = Nginx(work / "www", work / "nginx")
    rng = random.Random(19)
    daemons: list[DaemonProcess] = []
    try:
        publisher.publish(patch_bundle(publisher, release, work, 1), rollout=0)
        extra = (f'[server]\npoll_interval = {args.interval}\npoll_jitter = {args.jitter}\n'
                 'timeout = "30s"\n[log]\nlevel = "warning"\n')
        for i in range(args.hosts):
            d = DaemonProcess(work / f"d{i:03d}", manifest_url=nginx.url("stable/manifest.json"),
                              keys=[publisher.public], release_dir=release, extra=extra,
                              env={"PATCHD_FIRST_CHECK_DELAY": str(rng.uniform(0, args.spread))})
            daemons.append(d)
            d.start(wait_ready=False)
        for d in daemons:
            d.wait_notify("READY=1", timeout=300)
        yield nginx, publisher, daemons  # type: ignore[misc]
    finally:
        for d in daemons:
            d.close()
        nginx.stop()


def patch_bundle(publisher: object, release: Path, work: Path, number: int) -> Path:
    target = work / f"t{number}"
    shutil.copytree(release, target)
    (target / "bin" / "data").write_bytes(random.Random(number).randbytes(200_000))
    return publisher.bundle("1.4.0", number, release, target)  # type: ignore[attr-defined, no-any-return]


def per_second(lines: list[Line], start: float, end: float) -> list[int]:
    counts = Counter(int(line.at - start) for line in lines)
    return [counts.get(i, 0) for i in range(int(end - start))]


def p99(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--spread", type=float, default=15.0, help="first-poll spread, s")
    parser.add_argument("--window", type=float, default=250.0, help="seconds measured")
    args = parser.parse_args()
    if shutil.which(NGINX) is None:
        print(f"nginx not found at {NGINX}")
        return 1
    from patchd.host.logs import configure_logging

    configure_logging("console", "warning", stream=sys.stderr)
    print(f"load average before: {os.getloadavg()}")
    gap = args.window / 4
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        with fleet(args, work) as (nginx, publisher, _daemons):
            h200, h304 = header_sizes(nginx)
            repo = work / "www" / "stable"
            # Every daemon has made its first (unconditional) poll and polls steadily.
            time.sleep(args.spread + args.interval * (1 + args.jitter) + 2)
            start = time.time()
            steps: list[tuple[str, int, float]] = [("patch 1 at 50 %", 50, 0.5),
                                                   ("patch 1 at 100 %", 100, 0.5),
                                                   ("patch 2 at 100 %", 100, 1.0),
                                                   ("renewal", 0, 0.0)]
            publishes = []
            release = work / "opt"
            for i, (what, rollout, newly) in enumerate(steps):
                time.sleep(max(0.0, start + 10 + i * gap - time.time()))
                at = time.time()
                bundle_size = 0
                if what.startswith("patch 1"):
                    bundle = repo / "1.4.0" / "1-any.patchd"
                    publisher.publish(bundle, rollout=rollout)  # type: ignore[attr-defined]
                    bundle_size = bundle.stat().st_size
                elif what.startswith("patch 2"):
                    publisher.publish(patch_bundle(publisher, release, work, 2),  # type: ignore[attr-defined]
                                      rollout=rollout)
                    bundle_size = (repo / "1.4.0" / "2-any.patchd").stat().st_size
                else:
                    publisher.publish()  # type: ignore[attr-defined]
                publishes.append(Publish(at - start, (repo / "manifest.json").stat().st_size,
                                         (repo / "manifest.json.sig").stat().st_size,
                                         bundle_size, newly))
                print(f"t={at - start:5.1f} s  {what}: manifest "
                      f"{publishes[-1].manifest} B, bundle {bundle_size} B", flush=True)
            time.sleep(max(0.0, start + args.window - time.time()))
            end = time.time()
            lines = [line for line in nginx.barrier() if start <= line.at < end]
        load = os.getloadavg()
    measured_requests = len(lines)
    measured_body = sum(line.body for line in lines)
    measured_sent = sum(line.sent for line in lines)
    seconds = per_second(lines, start, end)
    kinds = Counter((line.status, line.path.rsplit("/", 1)[-1]) for line in lines)
    predicted = window_model(Window(hosts=args.hosts, interval=args.interval,
                                    jitter=args.jitter, start=0.0, end=end - start,
                                    publishes=tuple(publishes), header_200=h200,
                                    header_304=h304))
    print(f"window {end - start:.0f} s, {args.hosts} daemons, interval {args.interval:g} s; "
          f"headers 200: {h200} B, 304: {h304} B")
    print("access log: " + ", ".join(f"{n}× {status} {name}"
                                     for (status, name), n in sorted(kinds.items())))
    print(f"{'':14} {'model':>12} {'nginx':>12} {'ratio':>7}")
    rows = [("requests", predicted.requests, measured_requests),
            ("requests/s", predicted.mean_rps, measured_requests / (end - start)),
            ("p99 per s", predicted.p99_rps, p99(seconds)),
            ("body bytes", predicted.body, measured_body),
            ("bytes sent", predicted.egress, measured_sent)]
    for name, model_value, real in rows:
        print(f"{name:14} {model_value:12,.1f} {real:12,.1f} {model_value / real:7.3f}")
    print(f"load average after: {load}")
    ok = True
    for name, unit, model_value, real, check in (
            ("fleet_model_requests_per_s", "req/s", predicted.mean_rps,
             measured_requests / (end - start), True),
            ("fleet_model_body_bytes", "B", predicted.body, measured_body, True),
            ("fleet_model_bytes_sent", "B", predicted.egress, measured_sent, True),
            ("fleet_model_p99_per_s", "req/s", predicted.p99_rps, p99(seconds), False)):
        ratio = model_value / real
        good = abs(ratio - 1) <= 0.10
        emit(name, model_value, unit, "within 10 % of nginx's log" if check else "report",
             good or not check, baseline=real, ratio=ratio)
        ok &= good or not check
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
