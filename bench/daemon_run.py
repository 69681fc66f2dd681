"""A real ``patchd run`` for the benches: a repository published with patchd's own
publisher whose newest build is a patch bundle of random bytes, a daemon configured
against it (tests/support/daemon.py), and waiting on an event of the daemon's JSON log.

Shared by bench_gentle.py (an app's pace during a whole update) and bench_download.py
(the daemon's CPU seconds per GiB downloaded).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from support.daemon import DaemonProcess, Publisher, write_tree  # noqa: E402

#: The release the daemon runs; the bundle is its patch 1.
RELEASE = "1.4.0"


@dataclass(frozen=True)
class PatchRepo:
    """A published channel: its publisher, the release tree the daemon runs (the
    patch's base) and the published bundle (``RELEASE/1-any.patchd`` in the channel)."""

    publisher: Publisher
    release: Path
    bundle: Path


def publish_patch(work: Path, channel: Path, size: int, files: int = 16,
                  seed: int = 4) -> PatchRepo:
    """Pack and publish patch ``RELEASE``+1 into the directory ``channel``: ``files`` new
    files of random bytes, ``size`` in all, which zstd cannot shrink, so the bundle is
    about ``size`` long. The release tree is ``work/opt``; the key is in ``work``."""
    release = write_tree(work / "opt", {"bin/app": "r\n"}, version=RELEASE)
    target = work / "target"
    shutil.copytree(release, target)
    rng = random.Random(seed)
    for i in range(files):
        (target / f"data{i:02d}.bin").write_bytes(rng.randbytes(size // files))
    channel.mkdir(parents=True, exist_ok=True)
    publisher = Publisher(work, channel)
    bundle = publisher.bundle(RELEASE, 1, release, target)
    publisher.publish(bundle)
    bundle.unlink()
    shutil.rmtree(target)
    return PatchRepo(publisher, release, channel / RELEASE / "1-any.patchd")


def start_daemon(work: Path, manifest_url: str, repo: PatchRepo, wrapper: Sequence[str] = (),
                 level: str = "warning") -> DaemonProcess:
    """A ``patchd run`` (under ``wrapper``) with its config and state in ``work``, ready
    (``READY=1``); it checks only when told to (``CheckNow``). Killed if it fails to
    start; the caller closes it otherwise."""
    d = DaemonProcess(work, manifest_url=manifest_url, keys=[repo.publisher.public],
                      release_dir=repo.release, extra=f'[log]\nlevel = "{level}"\n')
    d.wrapper = list(wrapper)
    try:
        d.start()
    except BaseException:
        d.close()
        raise
    return d


class LogTail:
    """The daemon's JSON log from byte ``since`` on, read as the daemon writes it."""

    def __init__(self, daemon: DaemonProcess, since: int) -> None:
        self.daemon = daemon
        self.offset = since
        self.pending = b""

    def wait(self, event: str, timeout: float, interval: float = 0.002) -> dict[str, Any]:
        """The next line whose ``event`` is ``event``, looked for every ``interval``
        seconds (so seen at most that late). Fails at once on an error-level line or the
        daemon's exit, and after ``timeout`` seconds."""
        daemon = self.daemon
        deadline = time.monotonic() + timeout
        with open(daemon.log_path, "rb") as f:
            f.seek(self.offset)
            while True:
                data = f.read()
                self.offset += len(data)
                *lines, self.pending = (self.pending + data).split(b"\n")
                for i, line in enumerate(lines):
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    if entry.get("event") == event:
                        # Later lines wait for the next call.
                        self.pending = b"\n".join([*lines[i + 1:], self.pending])
                        return entry
                    if entry.get("level") in ("error", "critical"):
                        raise RuntimeError(f"daemon logged an error before {event}: {line!r}")
                if daemon.proc is None or daemon.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited before {event}:\n{daemon.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {event} within {timeout} s:\n{daemon.log()}")
                time.sleep(interval)
