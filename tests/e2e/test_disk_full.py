"""Disk-full campaign on a tiny tmpfs (root only): fail cleanly, lose nothing, finish later.

``state_dir`` and ``cache_dir`` live on a 3 MiB tmpfs; the release and the repository
do not. An install that does not fit fails with DiskFull, removes its staging tree,
keeps the download and does not count the attempt; a download that does not fit keeps
its partial file; a state write that hits ENOSPC leaves the old file intact. In every
case the daemon keeps serving, and once the tmpfs grows the update completes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from invariants import (
    build_states,
    check_boot_target,
    check_newest_installed,
    check_no_leftovers,
    check_state_files,
    diff_listings,
    listing,
)

from patchd.core.fsio import TEMP_PREFIX
from patchd.core.model import Build, Downloaded, Downloading, Installed
from patchd.state.layout import STAGING_DIR
from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess

RELEASE = "1.4.0"
EXTRA = """
[install]
min_free = "0"
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                 reason="mounting a tmpfs needs root (run as root in CI)")


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted after the test."""
    mnt = Path(tempfile.mkdtemp(prefix="pd-tmpfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        os.rmdir(mnt)


def resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def used_kib(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def state_of(d: DaemonProcess, patch: int) -> Any:
    return build_states(d.state_dir).get(Build(RELEASE, patch))


def assert_clean_failure(d: DaemonProcess, before: dict[str, Any]) -> None:
    """Still serving, state parses, no staging or temp files, release_dir untouched."""
    status = d.status()
    assert status["activity"]["phase"] == "idle", status
    assert status["last_error"] and "DiskFull" in status["last_error"], status
    check_state_files(d.state_dir, d)
    for dirpath, dirnames, filenames in os.walk(d.state_dir):
        for name in dirnames + filenames:
            assert name != STAGING_DIR and not name.startswith(TEMP_PREFIX), \
                f"leftover {dirpath}/{name}"
    assert not diff_listings(before, listing(d.release_dir))


def test_disk_full_fails_cleanly_and_completes_once_space_returns(
        tiny_world: Any, tiny_fs: Path) -> None:
    """Install and download that do not fit fail cleanly (download/partial kept, attempt
    not counted) with the daemon serving; after the tmpfs grows both complete."""
    world = tiny_world
    d = world.daemon("dfull", extra=EXTRA)
    d.state_dir, d.cache_dir = tiny_fs / "state", tiny_fs / "cache"
    d.write_config(world.manifest_url, [world.publisher.public], EXTRA)
    before = listing(world.release_dir)
    trees = world.trees | {Build(RELEASE, 0): world.release_dir}
    d.start()

    # 1. The 1 MiB download fits, the 2.5 MiB clone of the release does not.
    world.publish(1)
    d.check_and_wait()
    assert_clean_failure(d, before)
    state = state_of(d, 1)
    assert isinstance(state, Downloaded), state
    assert state.attempts == 0, f"a disk-full install counted as an attempt: {state}"
    assert (d.cache_dir / "downloads" / f"{RELEASE}-1.patchd").stat().st_size == state.size
    assert d.status()["next_boot"] == {"release": RELEASE, "patch": 0}
    resize(tiny_fs, "64m")
    assert check_newest_installed(d, world.publisher.repo, RELEASE) == Build(RELEASE, 1)
    check_boot_target(d, trees)
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootSuccess", {})
    check_no_leftovers(d.state_dir, d.cache_dir, d)

    # 2. A 5 MiB download into ~2 MiB of room: DiskFull, partial kept.
    resize(tiny_fs, f"{used_kib(tiny_fs) + 2048}k")
    world.publish(2)
    d.check_and_wait()
    assert_clean_failure(d, before)
    state = state_of(d, 2)
    assert isinstance(state, Downloading), state
    partial = (d.cache_dir / "downloads" / f"{RELEASE}-2.patchd").stat().st_size
    assert 0 < partial < state.size, partial
    resize(tiny_fs, "64m")
    assert check_newest_installed(d, world.publisher.repo, RELEASE) == Build(RELEASE, 2)
    assert "download.started" in d.log()
    check_boot_target(d, trees)
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootSuccess", {})
    check_no_leftovers(d.state_dir, d.cache_dir, d)
    assert isinstance(state_of(d, 2), Installed)
    assert not diff_listings(before, listing(world.release_dir))
    d.stop()


def test_enospc_on_a_state_write_keeps_the_old_file(tiny_world: Any, tiny_fs: Path) -> None:
    """A BootStart whose pointers.json write hits ENOSPC fails, the old pointers stay
    intact and parseable, no temp file remains, and it works once space returns."""
    world = tiny_world
    d = world.daemon("denospc", extra=EXTRA)
    d.state_dir, d.cache_dir = tiny_fs / "state", tiny_fs / "cache"
    d.write_config(world.manifest_url, [world.publisher.public], EXTRA)
    d.start()
    pointers = (d.state_dir / "pointers.json").read_bytes()
    filler = tiny_fs / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(VarlinkError):
        d.call("BootStart", {"pid": os.getpid()})
    assert d.status()["next_boot"] == {"release": RELEASE, "patch": 0}  # still serving
    assert (d.state_dir / "pointers.json").read_bytes() == pointers
    assert not [n for n in os.listdir(d.state_dir) if n.startswith(TEMP_PREFIX)]
    check_state_files(d.state_dir, d)
    filler.unlink()
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootSuccess", {})
    assert d.status()["last_booted"] == {"release": RELEASE, "patch": 0}
    d.stop()
