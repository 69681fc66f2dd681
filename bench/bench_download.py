"""Benchmark: patchd's download engine vs ``curl | tee | sha256`` from nginx on loopback.

Measures, in one run and against the same nginx and file:

1. baseline: ``curl -s URL | tee FILE | python -c 'sha256 over stdin'`` (wall time);
2. patchd: ``HttpSource.download`` in a child process (download + hash + write +
   fsync), its time and peak RSS (VmHWM from /proc/self/status);
3. crash resume: a child is SIGKILLed at about 50 %, a new child resumes; the bytes
   fetched twice = bytes the killed child had received from the socket (counted by a
   transport wrapper into a shared mmap, which survives SIGKILL) minus the length of
   the partial file the restart resumes from.

Targets (issue 5): throughput ≥ 0.8 × baseline, peak RSS < 64 MiB, re-fetched < 1 MiB.

    .venv/bin/python bench/download.py              # 1 GiB
    .venv/bin/python bench/download.py --size-mb 64 # quick
"""

from __future__ import annotations

import sys
from pathlib import Path

# A sibling script named like a stdlib module would shadow it when this file runs as a
# script: take bench/ off the import path before anything else.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402

import httpx  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests"))

MiB = 1024 * 1024
SHA_SNIPPET = (
    "import hashlib,sys\n"
    "h=hashlib.sha256()\n"
    "r=sys.stdin.buffer.raw\n"
    "for b in iter(lambda: r.read(1<<20), b''): h.update(b)\n"
    "print(h.hexdigest())"
)


# --- child: the downloader under test ---------------------------------------------------


def child(url: str, dest: str, size: int, sha: str, offset: int, counter: str | None) -> None:
    import anyio
    import structlog

    from patchd.fetch.sources import HttpSource

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    transport: httpx.AsyncBaseTransport | None = None
    if counter:
        fd = os.open(counter, os.O_RDWR)
        mm = mmap.mmap(fd, 8)
        transport = _CountingTransport(mm)

    async def main() -> float:
        async with HttpSource(url, timeout=30.0, transport=transport) as src:
            started = time.perf_counter()
            await src.download(url, Path(dest), size=size, sha256=sha, offset=offset,
                               progress=None)
            return time.perf_counter() - started

    seconds = anyio.run(main)
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    print(json.dumps({"seconds": seconds, "vmhwm_kb": hwm_kb}))


class _CountingStream(httpx.AsyncByteStream):
    """Counts the body bytes read off the socket into a shared mmap (survives SIGKILL)."""

    def __init__(self, inner: httpx.AsyncByteStream, mm: mmap.mmap) -> None:
        self.inner = inner
        self.mm = mm

    async def __aiter__(self) -> AsyncIterator[bytes]:
        n = struct.unpack_from("Q", self.mm, 0)[0]
        async for chunk in self.inner:
            n += len(chunk)
            struct.pack_into("Q", self.mm, 0, n)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class _CountingTransport(httpx.AsyncBaseTransport):
    def __init__(self, mm: mmap.mmap) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.mm = mm

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        assert isinstance(resp.stream, httpx.AsyncByteStream)
        return httpx.Response(resp.status_code, headers=resp.headers,
                              stream=_CountingStream(resp.stream, self.mm),
                              extensions=resp.extensions, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- parent --------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> str:
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


def run_child(url: str, dest: Path, size: int, sha: str, offset: int = 0,
              counter: Path | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "--child", url, str(dest), str(size), sha, str(offset),
            str(counter or "")]
    return subprocess.Popen(args, stdout=subprocess.PIPE)


def baseline(url: str, out: Path, sha: str) -> float:
    started = time.perf_counter()
    cmd = f"curl -s {url} | tee {out} | {sys.executable} -c \"{SHA_SNIPPET}\""
    got = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert got.stdout.strip() == sha, "baseline hash differs"
    return seconds


def kill_and_resume(url: str, work: Path, size: int, sha: str) -> tuple[int, int, int]:
    """(received by the killed child, resume offset, bytes fetched twice)."""
    dest = work / "killed.patchd"
    counter = work / "counter"
    counter.write_bytes(b"\0" * 8)
    proc = run_child(url, dest, size, sha, counter=counter)
    deadline = time.monotonic() + 600
    while not dest.exists() or dest.stat().st_size < size // 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("child finished before it could be killed")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    received = struct.unpack("Q", counter.read_bytes())[0]
    offset = dest.stat().st_size
    resume = run_child(url, dest, size, sha, offset=offset)
    resume.communicate()
    # The child verified the sha256 of the whole file; a mismatch would have failed it.
    assert resume.returncode == 0, "resume failed"
    return received, offset, received - offset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--child", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        url, dest, size, sha, offset, counter = ns.child
        child(url, dest, int(size), sha, int(offset), counter or None)
        return 0

    from support.nginx import run_nginx

    size = ns.size_mb * MiB
    with tempfile.TemporaryDirectory(prefix="patchd-bench-") as tmp:
        work = Path(tmp)
        root = work / "repo"
        root.mkdir()
        print(f"making a {ns.size_mb} MiB bundle…", flush=True)
        sha = make_file(root / "b.patchd", size)
        with run_nginx(root, work / "nginx") as repo:
            url = repo.url("b.patchd")
            base_s = baseline(url, work / "curl.out", sha)
            (work / "curl.out").unlink()
            proc = run_child(url, work / "ours.patchd", size, sha)
            out, _ = proc.communicate()
            assert proc.returncode == 0, "download failed"
            ours = json.loads(out)
            (work / "ours.patchd").unlink()
            received, offset, refetched = kill_and_resume(url, work, size, sha)

    ours_mbs = size / MiB / ours["seconds"]
    base_mbs = size / MiB / base_s
    ratio = ours_mbs / base_mbs
    rss_mib = ours["vmhwm_kb"] / 1024
    print(f"size                 {ns.size_mb} MiB")
    print(f"patchd download      {ours_mbs:8.1f} MiB/s  ({ours['seconds']:.2f} s)")
    print(f"baseline curl|tee|py {base_mbs:8.1f} MiB/s  ({base_s:.2f} s)")
    verdict = "OK" if ratio >= 0.8 else "MISS"
    print(f"ratio                {ratio:8.2f}      target ≥ 0.80  {verdict}")
    print(f"peak RSS (VmHWM)     {rss_mib:8.1f} MiB  target < 64    "
          f"{'OK' if rss_mib < 64 else 'MISS'}")
    print(f"SIGKILL at           {offset / size:8.0%}      (received {received}, "
          f"partial {offset})")
    print(f"re-fetched           {refetched / 1024:8.1f} KiB  target < 1024  "
          f"{'OK' if refetched < MiB else 'MISS'}")
    sys.path.append(str(HERE))  # appended: never shadows the stdlib
    from common import emit  # RESULT lines for bench/run

    emit("download.throughput", ours_mbs, "MiB/s", ">= 0.8x baseline", ratio >= 0.8,
         baseline=base_mbs, ratio=ratio)
    emit("download.peak_rss", rss_mib, "MiB", "< 64 MiB", rss_mib < 64)
    emit("download.refetched_after_kill", refetched / 1024, "KiB", "< 1024 KiB",
         refetched < MiB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
