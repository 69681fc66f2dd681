"""Benchmark: patchd's bundle download against python-tuf's ngclient and ``curl | tee | sha256``.

One nginx on loopback serves a repository published with patchd's own publisher whose
newest build is a patch bundle of about ``--size-mb`` of random bytes (zstd cannot
shrink them); the same inode is also served as ``b.patchd`` and as python-tuf's target.
In the same run, alternating, each contender downloads it three times, each time in a
fresh process; the figures are medians of three:

1. patchd: ``HttpSource.download`` (receive, hash, write, fsync, the partial-file
   protocol), timed from the call to its return;
2. python-tuf: ``Updater.download_target`` (tuf's urllib3 fetcher, its temporary file,
   the hash check, the copy to the destination; no fsync), after ``refresh()``;
3. the pipeline ``curl -s URL | tee FILE | python -c 'sha256 over stdin'`` (no fsync);
4. the daemon: a real ``patchd run`` (a fresh state directory each time) told
   ``CheckNow`` over its varlink socket, timed until its JSON log says
   ``lifecycle.download_complete`` (the bundle verified; the log is read every 2 ms).
   It is killed then: the install that follows is not measured;
5. the machine's floors: ``size`` bytes written from memory and fsynced, through the
   page cache and with ``O_DIRECT`` (the faster is the disk's durable-write ceiling: a
   download with fsync cannot beat it), and hashed from memory (the SHA-256 every
   download pays);
6. with ``--before DIR``: patchd from another source tree (``DIR/daemon``), e.g. the
   commit before a change, for a before/after table from the same run.

CPU seconds per GiB: the child's own CPU time (every thread, user + system) over the
timed call; the pipeline's is its processes' (``RUSAGE_CHILDREN``, start-up included);
the daemon's is its utime + stime (/proc/PID/stat, every thread, in 10 ms ticks) from
just before ``CheckNow`` (the manifest's fetch and check included) until the log line.
Peak RSS is the patchd child's VmHWM (the interpreter and its imports included).

Crash resume: a patchd child is stopped (SIGSTOP) once half the file is on disk, the
kernel's count of its connection's bytes read by the process is taken (``ss -ti``:
``bytes_received`` less the receive queue, less the response head), then it is
SIGKILLed and a new child resumes. Bytes fetched again = bytes it had read minus the
length of the partial file the resume starts from.

Targets (issues #19 and #21): patchd ≥ 1.5 × python-tuf's throughput, ≤ 1.5 CPU-s/GiB,
the daemon ≤ 2.0 CPU-s/GiB (#19, beside the pipeline's), peak RSS < 64 MiB, ≤ 4 MiB
fetched again.
The machine's load (``/proc/loadavg``) is printed with the figures.

    bench/bench_download.py                      # 512 MiB
    bench/bench_download.py --size-mb 64         # quick
    bench/bench_download.py --before /tmp/old    # /tmp/old/daemon/patchd: before
"""

from __future__ import annotations

import sys
from pathlib import Path

# A sibling script named like a stdlib module would shadow it when this file runs as a
# script: take bench/ off the import path before anything else.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

if TYPE_CHECKING:
    from daemon_run import PatchRepo

#: The machine's floors, measured beside the contenders (see :func:`child_floor`).
FLOOR_DISK = "disk write+fsync"
FLOOR_DIRECT = "disk O_DIRECT+fsync"
FLOOR_SHA = "sha256 alone"
MiB = 1024 * 1024
GiB = 1024 * MiB
ROUNDS = 3
SHA_SNIPPET = (
    "import hashlib,sys\n"
    "h=hashlib.sha256()\n"
    "r=sys.stdin.buffer.raw\n"
    "for b in iter(lambda: r.read(1<<20), b''): h.update(b)\n"
    "print(h.hexdigest())"
)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _vmhwm_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])


# --- children: the downloaders under test ------------------------------------------------


def child_patchd(url: str, dest: str, size: int, sha: str, offset: int) -> None:
    import anyio
    import structlog

    from patchd.fetch.sources import HttpSource

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    async def main() -> tuple[float, float]:
        async with HttpSource(url, timeout=30.0) as src:
            started, cpu = time.perf_counter(), time.process_time()
            await src.download(url, Path(dest), size=size, sha256=sha, offset=offset,
                               progress=None)
            return time.perf_counter() - started, time.process_time() - cpu

    seconds, cpu = anyio.run(main)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "vmhwm_kb": _vmhwm_kb()}))


def child_tuf(base: str, work: str, dest: str) -> None:
    from tuf.ngclient import Updater

    meta = Path(work) / "tuf-client"
    shutil.rmtree(meta, ignore_errors=True)
    meta.mkdir()
    root = (Path(work) / "repo" / "metadata" / "1.root.json").read_bytes()
    updater = Updater(metadata_dir=str(meta), metadata_base_url=f"{base}/metadata/",
                      target_base_url=f"{base}/targets/", target_dir=str(Path(dest).parent),
                      bootstrap=root)
    updater.refresh()
    info = updater.get_targetinfo("b.patchd")
    assert info is not None
    started, cpu = time.perf_counter(), time.process_time()
    updater.download_target(info, filepath=dest)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "vmhwm_kb": _vmhwm_kb()}))


# --- parent --------------------------------------------------------------------------------


def child_floor(kind: str, dest: str, size: int) -> None:
    """The machine's floors, in a fresh process like the contenders: ``disk`` writes
    ``size`` bytes from a 1 MiB buffer through the page cache and fsyncs them,
    ``direct`` the same with ``O_DIRECT`` from page-aligned memory, one write at a time,
    as patchd writes whole blocks (the faster of the two: no download makes its bytes
    durable faster); ``sha256`` hashes them from memory (the hash every download pays)."""
    block = memoryview(mmap.mmap(-1, MiB))
    block[:] = os.urandom(MiB)
    started, cpu = time.perf_counter(), time.process_time()
    if kind in ("disk", "direct"):
        direct = os.O_DIRECT if kind == "direct" else 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o600)
        try:
            left = size
            while left:
                n = min(left, MiB)
                if direct and n % 4096:  # the tail is not a whole block: as patchd does
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
                left -= os.write(fd, block[:n])
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        digest = hashlib.sha256()
        for left in range(size, 0, -MiB):
            digest.update(block[:min(left, MiB)])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "vmhwm_kb": _vmhwm_kb()}))


def make_file(path: Path, size: int) -> str:
    """``size`` random bytes (no 16 MiB block repeats) at ``path``; their SHA-256. Used by
    bench_tls.py, which serves a plain file rather than a published bundle."""
    digest = hashlib.sha256()
    block = os.urandom(16 * MiB)
    with path.open("wb") as f:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
            block = block[1:] + block[:1] if left else block  # avoid a repeating file
    return digest.hexdigest()


def make_tuf_repo(root: Path, bundle: Path) -> None:
    """A python-tuf repository (one key for every role) whose only target is ``bundle``."""
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import (
        Metadata,
        MetaFile,
        Root,
        Snapshot,
        TargetFile,
        Targets,
        Timestamp,
    )

    signer = CryptoSigner.generate_ed25519()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    top = Root(expires=expires, consistent_snapshot=False)
    for role in ("root", "timestamp", "snapshot", "targets"):
        top.add_key(signer.public_key, role)
    targets = Targets(expires=expires)
    targets.targets["b.patchd"] = TargetFile.from_file("b.patchd", str(bundle), ["sha256"])
    snapshot = Snapshot(expires=expires)
    snapshot.meta["targets.json"] = MetaFile(version=1)
    timestamp = Timestamp(expires=expires, snapshot_meta=MetaFile(version=1))
    (root / "metadata").mkdir()
    (root / "targets").mkdir()
    os.link(bundle, root / "targets" / "b.patchd")  # the same file, the same page cache
    for name, signed in (("1.root", top), ("targets", targets), ("snapshot", snapshot),
                         ("timestamp", timestamp)):
        md = Metadata(signed)
        md.sign(signer)
        md.to_file(str(root / "metadata" / f"{name}.json"))


def run_child(args: list[str], pythonpath: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, __file__, "--child", *args],
                            stdout=subprocess.PIPE, env=env)


def daemon_download(work: Path, manifest_url: str, repo: PatchRepo) -> dict[str, float]:
    """A fresh ``patchd run`` told ``CheckNow``: its seconds and CPU seconds until the
    bundle's download is complete (not its install: it is killed then), and its CPU
    seconds until the download started (the check: manifest, decision, state)."""
    from common import cpu_seconds, rss_kib
    from daemon_run import LogTail, start_daemon

    d = start_daemon(work, manifest_url, repo, level="info")
    try:
        assert d.proc is not None
        pid = d.proc.pid
        log = LogTail(d, d.log_size())
        started, cpu = time.perf_counter(), cpu_seconds(pid)
        reply = d.call("CheckNow")
        assert reply["strategy"] == "patch", reply
        log.wait("lifecycle.download_started", timeout=60)
        check_cpu = cpu_seconds(pid) - cpu
        log.wait("lifecycle.download_complete", timeout=600)
        figures = {"seconds": time.perf_counter() - started, "cpu": cpu_seconds(pid) - cpu,
                   "check_cpu": check_cpu, "vmhwm_kb": rss_kib(pid)[1]}
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def finish(proc: subprocess.Popen[bytes], what: str) -> dict[str, float]:
    out, _ = proc.communicate()
    assert proc.returncode == 0, f"{what} failed"
    figures: dict[str, float] = json.loads(out)
    return figures


def pipeline(url: str, out: Path, sha: str) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    cmd = f"curl -s {url} | tee {out} | {sys.executable} -I -S -c \"{SHA_SNIPPET}\""
    got = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert got.stdout.strip() == sha, "the pipeline's hash differs"
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu": cpu}


def head_length(url: str) -> int:
    """Bytes of the response head nginx sends before the body of ``url``."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port or 80)) as sock:
        sock.sendall(f"HEAD {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.index(b"\r\n\r\n") + 4


def bytes_read_by(pid: int, port: int) -> int:
    """Bytes process ``pid`` has read from its connection to ``port`` (``ss -ti``)."""
    out = subprocess.run(["ss", "-tinpH", "state", "established", "dport", f"= :{port}"],
                         check=True, capture_output=True, text=True).stdout
    total = 0
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if f"pid={pid}," not in line:
            continue
        recv_q = int(line.split()[0])
        info = lines[i + 1] if i + 1 < len(lines) else ""
        found = re.search(r"bytes_received:(\d+)", line + " " + info)
        total += (int(found.group(1)) if found else 0) - recv_q
    return total


def kill_and_resume(url: str, work: Path, size: int, sha: str) -> tuple[int, int, int]:
    """(bytes the killed child had read, resume offset, bytes fetched twice)."""
    dest = work / "killed.patchd"
    port = urlsplit(url).port or 80
    proc = run_child(["patchd", url, str(dest), str(size), sha, "0"])
    deadline = time.monotonic() + 600
    while not dest.exists() or dest.stat().st_size < size // 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the child finished before it could be killed")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    os.waitpid(proc.pid, os.WUNTRACED)
    read = bytes_read_by(proc.pid, port) - head_length(url)
    offset = dest.stat().st_size
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    # The resume verifies the sha256 of the whole file; a mismatch fails it.
    finish(run_child(["patchd", url, str(dest), str(size), sha, str(offset)]), "resume")
    return read, offset, read - offset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--before", default="", help="a source tree whose daemon/ is "
                        "patchd before a change, measured in the same run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        kind, *rest = ns.child
        if kind == "patchd":
            url, dest, size, sha, offset = rest
            child_patchd(url, dest, int(size), sha, int(offset))
        elif kind in ("disk", "direct", "sha256"):
            child_floor(kind, rest[0], int(rest[1]))
        else:
            child_tuf(*rest)
        return 0

    sys.path.append(str(HERE.parent / "tests"))
    sys.path.append(str(HERE))  # appended: never shadows the stdlib
    from common import emit  # RESULT lines for bench/run
    from daemon_run import publish_patch
    from patchd.host.logs import configure_logging
    from support.nginx import run_nginx

    configure_logging("console", "warning", stream=sys.stderr)  # quiet: the publisher

    before_path = str(Path(ns.before).resolve() / "daemon") if ns.before else None
    load_start = loadavg()
    runs: dict[str, list[dict[str, float]]] = {"patchd": [], "python-tuf": [], "pipeline": [],
                                               "patchd run": [], FLOOR_DISK: [],
                                               FLOOR_DIRECT: [], FLOOR_SHA: []}
    if before_path:
        runs["patchd (before)"] = []
    with tempfile.TemporaryDirectory(prefix="patchd-bench-") as tmp:
        work = Path(tmp)
        root = work / "repo"
        root.mkdir()
        print(f"making a {ns.size_mb} MiB bundle, its repository and python-tuf's…",
              flush=True)
        published = publish_patch(work, root / "stable", ns.size_mb * MiB)
        os.link(published.bundle, root / "b.patchd")  # the same file, the same page cache
        size = (root / "b.patchd").stat().st_size
        with (root / "b.patchd").open("rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        make_tuf_repo(root, root / "b.patchd")
        with run_nginx(root, work / "nginx") as repo:
            url = repo.url("b.patchd")
            manifest_url = repo.url("stable/manifest.json")
            base = url.rsplit("/", 1)[0]
            out = work / "out.patchd"
            names = list(runs)
            for rnd in range(ROUNDS):
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    if name == "pipeline":
                        runs[name].append(pipeline(url, out, sha))
                    elif name == "python-tuf":
                        runs[name].append(finish(run_child(["tuf", base, str(work),
                                                            str(out)]), name))
                    elif name in (FLOOR_DISK, FLOOR_DIRECT, FLOOR_SHA):
                        kind = {FLOOR_DISK: "disk", FLOOR_DIRECT: "direct"}.get(name,
                                                                               "sha256")
                        runs[name].append(finish(run_child([kind, str(out), str(size)]),
                                                 name))
                    elif name == "patchd run":
                        runs[name].append(daemon_download(work / f"daemon-{rnd}",
                                                          manifest_url, published))
                    else:
                        path = before_path if name == "patchd (before)" else None
                        runs[name].append(finish(run_child(
                            ["patchd", url, str(out), str(size), sha, "0"], path), name))
                    out.unlink(missing_ok=True)
            read, offset, refetched = kill_and_resume(url, work, size, sha)
    load_end = loadavg()

    def mib_s(name: str) -> float:
        return statistics.median(size / MiB / r["seconds"] for r in runs[name])

    def cpu_gib(name: str) -> float:
        return statistics.median(r["cpu"] / (size / GiB) for r in runs[name])

    print(f"size {size / MiB:.1f} MiB, median of {ROUNDS}, alternating; "
          f"load {load_start} → {load_end}")
    for name in runs:
        print(f"{name:16s} {mib_s(name):8.1f} MiB/s  {cpu_gib(name):6.2f} CPU-s/GiB")
    daemon_cpu, pipe_cpu = cpu_gib("patchd run"), cpu_gib("pipeline")
    daemon_rss = max(r["vmhwm_kb"] for r in runs["patchd run"]) / 1024
    check_cpu = statistics.median(r["check_cpu"] for r in runs["patchd run"])
    print(f"daemon (patchd run), CheckNow → download_complete: {daemon_cpu:.2f} CPU-s/GiB, "
          f"target ≤ 2.00 (#19); pipeline {pipe_cpu:.2f}, ×{daemon_cpu / pipe_cpu:.2f}; "
          f"of it {check_cpu:.2f} CPU-s before download_started; "
          f"daemon peak RSS {daemon_rss:.1f} MiB")
    ratio = mib_s("patchd") / mib_s("python-tuf")
    ceiling = max(mib_s(FLOOR_DISK), mib_s(FLOOR_DIRECT))
    print(f"the machine: its disk makes {ceiling:.0f} MiB/s durable (the faster of write "
          f"+ fsync and O_DIRECT + fsync), so "
          f"patchd can reach at most {ceiling / mib_s('python-tuf'):.2f} × python-tuf "
          f"(which does not fsync); patchd is at {mib_s('patchd') / ceiling:.0%} of that "
          f"ceiling; SHA-256 alone costs {cpu_gib(FLOOR_SHA):.2f} CPU-s/GiB")
    rss_mib = max(r["vmhwm_kb"] for r in runs["patchd"]) / 1024
    print(f"patchd / python-tuf   {ratio:6.2f}       target ≥ 1.50")
    print(f"peak RSS (VmHWM)      {rss_mib:6.1f} MiB   target < 64")
    print(f"SIGKILL at {offset / size:.0%}: read {read}, on disk {offset}, "
          f"fetched again {refetched / MiB:.2f} MiB (target ≤ 4)")
    cpu = cpu_gib("patchd")
    emit("download.vs_python_tuf", mib_s("patchd"), "MiB/s", ">= 1.5x python-tuf",
         ratio >= 1.5, baseline=mib_s("python-tuf"), ratio=ratio)
    emit("download.cpu_per_gib", cpu, "CPU-s/GiB", "<= 1.5 (pipeline as baseline)",
         cpu <= 1.5, baseline=cpu_gib("pipeline"), ratio=cpu / cpu_gib("pipeline"))
    emit("download.daemon_cpu_per_gib", daemon_cpu, "CPU-s/GiB", "<= 2.0 (#19)",
         daemon_cpu <= 2.0, baseline=pipe_cpu, ratio=daemon_cpu / pipe_cpu)
    emit("download.python_tuf_cpu_per_gib", cpu_gib("python-tuf"), "CPU-s/GiB",
         "(figure only)", True, baseline=cpu, ratio=cpu_gib("python-tuf") / cpu)
    emit("download.vs_pipeline", mib_s("patchd"), "MiB/s", "(figure only)", True,
         baseline=mib_s("pipeline"), ratio=mib_s("patchd") / mib_s("pipeline"))
    if before_path:
        emit("download.vs_before", mib_s("patchd"), "MiB/s", "(figure only)", True,
             baseline=mib_s("patchd (before)"),
             ratio=mib_s("patchd") / mib_s("patchd (before)"))
        emit("download.cpu_vs_before", cpu, "CPU-s/GiB", "(figure only)", True,
             baseline=cpu_gib("patchd (before)"), ratio=cpu / cpu_gib("patchd (before)"))
    emit("download.vs_disk_ceiling", mib_s("patchd"), "MiB/s", "(figure: durable-write ceiling)",
         True, baseline=ceiling, ratio=mib_s("patchd") / ceiling)
    emit("download.sha256_cpu_per_gib", cpu_gib(FLOOR_SHA), "CPU-s/GiB",
         "(figure: the hash alone)", True, baseline=cpu, ratio=cpu_gib(FLOOR_SHA) / cpu)
    emit("download.peak_rss", rss_mib, "MiB", "< 64 MiB", rss_mib < 64)
    emit("download.refetched_after_kill", refetched / MiB, "MiB", "<= 4 MiB",
         refetched <= 4 * MiB)
    emit("download.loadavg", float(load_end.split()[0]), "", "(figure: 1-min load)", True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
