"""Benchmark: patchd's bundle download over TLS against plain HTTP, in the same run.

One nginx serves the same file twice, on a plain and on an HTTPS port (a certificate
made at bench time by trustme, its CA given to patchd as ``server.ca_file`` would be).
patchd's download (``HttpSource.download``: receive, hash, write, fsync) runs in a
child process per transfer, alternating plain and TLS, median of three each. Prints
both throughputs, their ratio (target: TLS within 25 % of plain, issue #21) and each
child's CPU seconds per GiB, with the machine's load. ``--before DIR`` adds patchd from
another source tree (``DIR/daemon``) to the same run.

    bench/bench_tls.py [--size-mb 256] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "tests"))  # support.nginx: the tests' real nginx runner

from bench_download import MiB, make_file  # noqa: E402

sys.path.append(str(HERE))  # importing bench_download took bench/ off the path
from common import emit  # noqa: E402

ROUNDS = 3


def child(url: str, dest: str, size: int, sha: str, ca_file: str) -> None:
    """Download once through patchd, as the daemon would; print seconds and CPU."""
    import anyio
    import structlog

    from patchd.fetch.client import TransportSettings, build_client
    from patchd.fetch.sources import HttpSource

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    async def main() -> tuple[float, float]:
        client = build_client(TransportSettings(timeout=30.0, ca_file=ca_file))
        async with client, HttpSource(url, timeout=30.0, client=client) as src:
            started, cpu = time.perf_counter(), time.process_time()  # all threads
            await src.download(url, Path(dest), size=size, sha256=sha, offset=0,
                               progress=None)
            return time.perf_counter() - started, time.process_time() - cpu

    seconds, cpu = anyio.run(main)
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def run_child(url: str, dest: Path, size: int, sha: str, ca_file: str,
              pythonpath: str | None = None) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--child", url, str(dest), str(size), sha,
                          ca_file], check=True, capture_output=True, text=True,
                         env=env).stdout
    dest.unlink()
    result: dict[str, float] = json.loads(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--before", default="", help="a source tree whose daemon/ is "
                        "patchd before a change, measured in the same run")
    parser.add_argument("--child", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        url, dest, size, sha, ca_file = ns.child
        child(url, dest, int(size), sha, ca_file)
        return 0

    import trustme

    from support.nginx import NginxTls, run_nginx

    size = ns.size_mb * MiB
    before = str(Path(ns.before).resolve() / "daemon") if ns.before else None
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="patchd-bench-tls-") as tmp:
        work = Path(tmp)
        root = work / "repo"
        root.mkdir()
        print(f"making a {ns.size_mb} MiB bundle…", flush=True)
        sha = make_file(root / "b.patchd", size)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        tls = NginxTls(cert_chain=work / "server.pem", key=work / "server.pem")
        figures: dict[str, list[dict[str, float]]] = {"http": [], "https": []}
        if before:
            figures.update({"http (before)": [], "https (before)": []})
        with run_nginx(root, work / "plain") as plain, \
                run_nginx(root, work / "tls", tls=tls) as secure:
            for _ in range(ROUNDS):
                for name in figures:
                    repo = secure if name.startswith("https") else plain
                    path = before if name.endswith("(before)") else None
                    figures[name].append(run_child(repo.url("b.patchd"), work / "out",
                                                   size, sha, str(work / "ca.pem"), path))

    def mib_s(scheme: str) -> float:
        return statistics.median(size / MiB / f["seconds"] for f in figures[scheme])

    def cpu_gib(scheme: str) -> float:
        return statistics.median(f["cpu"] / (size / (1024 * MiB)) for f in figures[scheme])

    plain_mbs, tls_mbs = mib_s("http"), mib_s("https")
    ratio = tls_mbs / plain_mbs
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"size           {ns.size_mb} MiB, median of {ROUNDS}, alternating; "
          f"load {' '.join(load_start)} → {' '.join(load_end)}")
    for name in figures:
        print(f"{name:16s} {mib_s(name):8.1f} MiB/s  {cpu_gib(name):.2f} CPU-s/GiB")
    print(f"TLS / plain    {ratio:8.2f}    target ≥ 0.75")
    if before:
        print(f"TLS / plain (before) {mib_s('https (before)') / mib_s('http (before)'):8.2f}")
    emit("download.tls_throughput", tls_mbs, "MiB/s", ">= 0.75x plain", ratio >= 0.75,
         baseline=plain_mbs, ratio=ratio)
    emit("download.tls_cpu_per_gib", cpu_gib("https"), "CPU-s/GiB", "(figure only)", True,
         baseline=cpu_gib("http"), ratio=cpu_gib("https") / cpu_gib("http"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
