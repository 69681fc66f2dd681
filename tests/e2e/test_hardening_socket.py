"""Hardening of the socket against local users, on the real daemon (issue #15).

Clients run as real local users (children that setuid()); the daemon runs as root with
``nogroup`` as its socket group, so ``nobody`` may read (GetStatus, GetBootTarget) and
nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon import DaemonProcess
from support.flood import HostileFlood, call_as
from support.hostile import HostileRepo, hostile_world, start_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")
SHARED = '[api]\nsocket_group = "nogroup"\n'


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    """A repository on the misbehaving server (unused by the socket, needed by the daemon)."""
    yield from hostile_world(tmp_path)


def shared(tmp_path: Path, repo: HostileRepo, extra: str = "") -> DaemonProcess:
    """A daemon whose socket ``nobody`` may reach (its directory 0755, group nogroup)."""
    d = start_daemon(tmp_path, repo, SHARED + extra)
    os.chmod(d.socket.parent, 0o755)
    return d


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def timed(d: DaemonProcess, method: str) -> float:
    start = time.monotonic()
    d.call(method, timeout=10)
    return time.monotonic() - start


@needs_root
def test_a_read_only_users_flood_never_keeps_out_a_boot_report(
        tmp_path: Path, repo: HostileRepo) -> None:
    """1,100 idle and 1,000 half-sent 1 MiB messages by nobody: boot reports still go
    through at once and the daemon's memory stays bounded."""
    d = shared(tmp_path, repo)
    assert d.proc is not None
    with HostileFlood(d.socket, "nobody", idle=1100, heavy=1000) as flood:
        assert flood.report["held"] == 2100
        took = [timed(d, "BootStart"), timed(d, "BootSuccess")]
        assert max(took) < 1.0, took
        assert d.status()["last_booted"] == {"release": "1.4.0", "patch": 0}
        assert rss_kib(d.proc.pid) < 150 * 1024
    refused = [line for line in d.log().splitlines() if "varlink.connection_refused" in line]
    assert 0 < len(refused) < 50, len(refused)  # counted, not one line per connection


@needs_root
def test_a_read_only_boot_target_never_changes_boot_state(
        tmp_path: Path, repo: HostileRepo) -> None:
    """After a BootStart without a pid, nobody's GetBootTarget leaves the boot in progress."""
    d = shared(tmp_path, repo)
    d.call("BootStart")
    before = (d.state_dir / "pointers.json").read_bytes()
    for _ in range(3):
        reply = call_as("nobody", d.socket, "GetBootTarget")
        assert reply["parameters"] == {"build": {"release": "1.4.0", "patch": 0},
                                       "path": str(d.release_dir)}, reply
    assert (d.state_dir / "pointers.json").read_bytes() == before
    assert d.status()["currently_booting"] == {"release": "1.4.0", "patch": 0}
