"""The build lifecycle store (docs/lifecycle.md): every transition, every branch, the scenarios."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from patchd.core.errors import (
    BadInputError,
    ConfigError,
    IllegalTransition,
    InstallLoop,
    NoBootInProgress,
    NotBootTarget,
    PatchdError,
    RollbackRefused,
    StateLocked,
)
from patchd.core.model import Bad, BadReason, Build, Downloaded, Downloading, Installed
from patchd.host import process
from patchd.state import (
    FAILPOINTS,
    MAX_INSTALL_ATTEMPTS,
    Action,
    Decision,
    Lifecycle,
    Pointers,
    choose_next_boot,
    decide_download,
)
from support.lifecycle_child import (
    check_invariants,
    download,
    install,
    make_release,
    ready,
    receive,
    sha_of,
    size_of,
    start_download,
    url_of,
)

R = "1.0.0"
B0, B1, B2, B3 = (Build(R, n) for n in range(4))
SHA = "a" * 64


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_release(tmp_path, R)


@pytest.fixture
def lc(dirs: tuple[Path, Path, Path]) -> Iterator[Lifecycle]:
    with Lifecycle.open(*dirs) as store:
        yield store


def reopen(lc: Lifecycle) -> Lifecycle:
    lc.close()
    return Lifecycle.open(lc.state_dir, lc.cache_dir, lc.release_dir)


def current(lc: Lifecycle) -> Path:
    return (lc.state_dir / os.readlink(lc.state_dir / "current")).resolve()


def booted(lc: Lifecycle, build: Build) -> None:
    """Install ``build``, boot it and report success."""
    ready(lc, build)
    lc.record_boot_start(build, None, None)
    lc.record_boot_success(build)


# --- process.py ------------------------------------------------------------------------


def test_pid_start_time_of_self_matches_proc() -> None:
    """Field 22 of /proc/self/stat is read as the start time of our own pid."""
    raw = Path("/proc/self/stat").read_text()
    expected = int(raw[raw.rindex(")") + 2 :].split()[19])
    assert process.pid_start_time(os.getpid()) == expected


def test_pid_start_time_handles_spaces_and_parens_in_comm(tmp_path: Path) -> None:
    """A comm like ``a) b (c`` does not shift the fields."""
    exe = tmp_path / "a) b (c"
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        start = process.pid_start_time(child.pid)
        assert start is not None and start >= (process.pid_start_time(os.getpid()) or 0)
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c"
        assert process.pid_alive(child.pid, start)
        assert not process.pid_alive(child.pid, start + 1)
    finally:
        child.kill()
        child.wait()


def test_pid_alive_false_for_zombie_and_reaped_and_nonsense() -> None:
    """An exited child (zombie, then reaped) and pid 0 or -1 are not alive."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process.pid_start_time(child.pid)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert not process.pid_alive(child.pid, start)
    child.wait()
    assert not process.pid_alive(child.pid, None)
    assert process.pid_start_time(child.pid) is None
    assert not process.pid_alive(0, None) and not process.pid_alive(-1, None)


def test_failpoint_exits_86_only_for_the_armed_name() -> None:
    """``PATCHD_FAILPOINT`` makes that failpoint (and no other) exit with 86."""
    code = ("from patchd.host.process import failpoint\n"
            "failpoint('other')\nprint('passed', flush=True)\nfailpoint('here')\nprint('no')")
    env = {**os.environ, "PATCHD_FAILPOINT": "here"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == process.FAILPOINT_EXIT and proc.stdout == "passed\n"


def test_failpoint_names_cover_before_and_after() -> None:
    """FAILPOINTS lists a before and an after point for every write site, uniquely."""
    assert len(FAILPOINTS) == len(set(FAILPOINTS))
    assert "boot_failure.tombstone.after" in FAILPOINTS
    assert all(n.endswith((".before", ".after")) for n in FAILPOINTS)


# --- open, lock, release, sweep ---------------------------------------------------------


def test_open_fresh_points_at_release(lc: Lifecycle, dirs: tuple[Path, Path, Path]) -> None:
    """A first start writes pointers (R, 0) in the documented shape, current -> release_dir."""
    data = json.loads((lc.state_dir / "pointers.json").read_text())
    assert data == {"release": R, "next_boot": {"release": R, "patch": 0}, "last_booted": None,
                    "currently_booting": None, "boot_pid": None, "boot_pid_start": None,
                    "boot_started_at": None, "os_release": R}
    assert current(lc) == dirs[2].resolve()
    assert lc.boot_target() == (B0, dirs[2])
    assert lc.release == R and lc.tree_path(B0) == dirs[2]
    check_invariants(lc)


def test_second_open_is_refused_until_close(lc: Lifecycle, dirs: tuple[Path, Path, Path]) -> None:
    """Two stores on one state dir: the second gets StateLocked naming the dir."""
    with pytest.raises(StateLocked, match=str(dirs[0])):
        Lifecycle.open(*dirs)
    lc.close()
    Lifecycle.open(*dirs).close()


def test_version_missing_or_empty_is_config_error(tmp_path: Path) -> None:
    """A missing or empty VERSION is a ConfigError naming the file, and the lock is released."""
    state, cache, rel = make_release(tmp_path)
    (rel / "VERSION").unlink()
    with pytest.raises(ConfigError, match="VERSION"):
        Lifecycle.open(state, cache, rel)
    (rel / "VERSION").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        Lifecycle.open(state, cache, rel)
    (rel / "VERSION").write_text("../x\n")
    with pytest.raises(ConfigError, match="not a valid release"):
        Lifecycle.open(state, cache, rel)
    (rel / "VERSION").write_text("2.0\n")
    with Lifecycle.open(state, cache, rel) as lc:
        assert lc.release == "2.0"


def test_version_is_read_as_the_head_of_a_regular_file_only(tmp_path: Path) -> None:
    """VERSION is read up to 256 bytes: a long tail after the first line is fine, a first
    line that does not end within them is a ConfigError, and so is anything that is not
    a regular file (named, without reading it)."""
    state, cache, rel = make_release(tmp_path)
    (rel / "VERSION").write_text("2.0\n" + "changelog\n" * 100_000)
    with Lifecycle.open(state, cache, rel) as lc:
        assert lc.release == "2.0"
    (rel / "VERSION").write_text("2" * 300 + "\n")
    with pytest.raises(ConfigError, match="first line is longer than 256 bytes"):
        Lifecycle.open(state, cache, rel)
    (rel / "VERSION").unlink()
    os.mkfifo(rel / "VERSION")
    with pytest.raises(ConfigError, match=r"VERSION: .*a FIFO, not a regular file"):
        Lifecycle.open(state, cache, rel)


def test_corrupt_pointers_are_treated_as_absent(lc: Lifecycle) -> None:
    """pointers.json that fails to parse resets to (R, 0); installed builds stay."""
    ready(lc, B1)
    (lc.state_dir / "pointers.json").write_text('{"release": "1.0.0", "next_boot": ')
    lc = reopen(lc)
    assert lc.pointers.next_boot == B0 and isinstance(lc.state(B1), Installed)
    check_invariants(lc)
    lc.close()


def test_corrupt_state_is_absent_and_swept(lc: Lifecycle) -> None:
    """A state.json that fails to parse reads as None, and start-up forgets that build."""
    ready(lc, B1, promote=False)
    (lc.state_dir / "builds" / R / "1" / "state.json").write_text("{not json")
    assert lc.state(B1) is None
    lc = reopen(lc)
    assert not (lc.state_dir / "builds" / R / "1").exists()
    lc.close()


def test_release_change_wipes_state_and_cache_not_release_dir(lc: Lifecycle) -> None:
    """An OS upgrade removes older builds and all downloads, resets pointers, spares release_dir."""
    booted(lc, B1)
    ready(lc, B2)
    start_download(lc, B3)
    newer = Build("3.0", 0)
    (lc.state_dir / "builds" / "3.0" / "0" / "tree").mkdir(parents=True)
    lc.record_install_complete(newer, 1, {})
    before = sorted(p.name for p in lc.release_dir.rglob("*"))
    (lc.release_dir / "VERSION").write_text("2.0.0\n")
    lc = reopen(lc)
    assert lc.release == "2.0.0"
    assert lc.pointers == Pointers.initial("2.0.0")
    assert not (lc.state_dir / "builds" / R).exists()
    assert list((lc.cache_dir / "downloads").iterdir()) == []
    assert isinstance(lc.state(newer), Installed)  # newer releases are kept
    assert sorted(p.name for p in lc.release_dir.rglob("*")) == before
    assert current(lc) == lc.release_dir.resolve()
    check_invariants(lc)
    lc.close()


def test_same_release_restart_keeps_everything(lc: Lifecycle) -> None:
    """Reopening with the same VERSION keeps pointers, builds and downloads."""
    booted(lc, B1)
    start_download(lc, B2)
    receive(lc, B2, 5)
    pointers = lc.pointers
    lc = reopen(lc)
    assert lc.pointers == pointers
    assert lc.decide_start(B2, url_of(B2), sha_of(B2), size_of(B2)) == Decision(Action.RESUME, 5)
    lc.close()


def test_startup_sweeps_leftovers(lc: Lifecycle) -> None:
    """Temp files, staging trees, trees of uninstalled builds, orphans and junk go at start."""
    ready(lc, B1)
    download(lc, B2)
    lc.staging_path(B2).mkdir()
    (lc.state_dir / "builds" / R / "2" / "tree").mkdir()  # renamed, never recorded
    (lc.staging_path(B1)).mkdir()
    (lc.state_dir / ".patchd-tmp-pointers.json.1234").write_text("x")
    (lc.state_dir / "builds" / R / "junk").mkdir()
    (lc.state_dir / "builds" / R / "07").mkdir()
    (lc.state_dir / "builds" / "not a release!").mkdir()
    (lc.state_dir / "builds" / R / "3").mkdir()
    orphan = lc.cache_dir / "downloads" / f"{R}-9.patchd"
    orphan.write_bytes(b"x")
    (lc.cache_dir / "downloads" / "random.file").write_bytes(b"x")
    (lc.state_dir / "client.json").write_text("{}")
    lc = reopen(lc)
    builds = lc.state_dir / "builds"
    assert sorted(p.name for p in (builds / R).iterdir()) == ["1", "2"]
    assert sorted(p.name for p in (builds / R / "2").iterdir()) == ["state.json"]
    assert sorted(p.name for p in (builds / R / "1").iterdir()) == ["state.json", "tree"]
    assert [p.name for p in builds.iterdir()] == [R]
    assert [p.name for p in (lc.cache_dir / "downloads").iterdir()] == [f"{R}-2.patchd"]
    assert not list(lc.state_dir.glob(".patchd-tmp-*"))
    assert (lc.state_dir / "client.json").exists()
    check_invariants(lc)
    lc.close()


def test_open_repairs_stale_current(lc: Lifecycle) -> None:
    """A `current` left pointing elsewhere (crash before the link swap) is fixed at open."""
    ready(lc, B1)
    os.unlink(lc.state_dir / "current")
    os.symlink("builds/nowhere", lc.state_dir / "current")
    lc = reopen(lc)
    assert current(lc) == lc.tree_path(B1).resolve()
    lc.close()


def test_open_replaces_next_boot_whose_tree_vanished(lc: Lifecycle) -> None:
    """An installed next_boot whose tree was deleted behind our back is not booted."""
    ready(lc, B1)
    shutil.rmtree(lc.tree_path(B1))
    lc = reopen(lc)
    assert lc.pointers.next_boot == B0
    lc.close()


# --- decide_start ----------------------------------------------------------------------


@pytest.mark.parametrize(("state", "file_size", "tree", "expected"), [
    (None, None, False, Decision(Action.FRESH)),
    (None, 10, False, Decision(Action.FRESH)),
    (Downloading("u", SHA, 100), 40, False, Decision(Action.RESUME, 40)),
    (Downloading("u", SHA, 100), 100, False, Decision(Action.VERIFY, 100)),
    (Downloading("u", SHA, 100), 101, False, Decision(Action.FRESH)),
    (Downloading("u", SHA, 100), 0, False, Decision(Action.FRESH)),
    (Downloading("u", SHA, 100), None, False, Decision(Action.FRESH)),
    (Downloading("other", SHA, 100), 40, False, Decision(Action.FRESH)),
    (Downloading("u", "b" * 64, 100), 40, False, Decision(Action.FRESH)),
    (Downloading("u", SHA, 99), 40, False, Decision(Action.FRESH)),
    (Downloaded("u", SHA, 100), 100, False, Decision(Action.COMPLETE, 100)),
    (Downloaded("u", SHA, 100), None, False, Decision(Action.FRESH)),
    (Downloaded("u", SHA, 100), 50, False, Decision(Action.FRESH)),
    (Downloaded("other", SHA, 100), 100, False, Decision(Action.FRESH)),
    (Installed(1, {}), None, True, Decision(Action.INSTALLED)),
    (Installed(1, {}), None, False, Decision(Action.FRESH)),
    (Bad(BadReason.HASH_MISMATCH, "", ""), 100, False, Decision(Action.BAD)),
])
def test_decide_download_table(state: object, file_size: int | None, tree: bool,
                               expected: Decision) -> None:
    """Each (state, file on disk) pair maps to the docs/lifecycle.md decision."""
    assert decide_download(state, "u", SHA, 100, file_size, tree) == expected  # type: ignore[arg-type]


def test_evicted_download_restarts_fresh(lc: Lifecycle) -> None:
    """A downloading build whose cache file the OS evicted starts again from zero."""
    start_download(lc, B1)
    receive(lc, B1, 10)
    lc.download_path(B1).unlink()
    assert lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1)) == Decision(Action.FRESH)


def test_complete_file_in_downloading_state_is_verified(lc: Lifecycle) -> None:
    """A downloading state whose file already has all bytes asks to verify, not a Range at EOF."""
    start_download(lc, B1)
    receive(lc, B1, size_of(B1))
    d = lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1))
    assert d == Decision(Action.VERIFY, size_of(B1))


def test_downloaded_installed_and_bad_decisions(lc: Lifecycle) -> None:
    """Downloaded+file skips the network, installed needs nothing, bad is skipped."""
    download(lc, B1)
    assert lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1)).action is Action.COMPLETE
    install(lc, B1)
    assert lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1)).action is Action.INSTALLED
    lc.mark_bad(B2, BadReason.HASH_MISMATCH, "x")
    assert lc.decide_start(B2, url_of(B2), sha_of(B2), size_of(B2)).action is Action.BAD


# --- download and install transitions ---------------------------------------------------


def test_download_started_and_complete_write_spec_json(lc: Lifecycle) -> None:
    """state.json goes downloading → downloaded with url, sha256, size."""
    start_download(lc, B1)
    path = lc.state_dir / "builds" / R / "1" / "state.json"
    assert json.loads(path.read_text()) == {"state": "downloading", "url": url_of(B1),
                                            "sha256": sha_of(B1), "size": size_of(B1),
                                            "attempts": 0}
    receive(lc, B1, size_of(B1))
    lc.record_download_complete(B1)
    assert json.loads(path.read_text())["state"] == "downloaded"


def test_download_transitions_refuse_wrong_states(lc: Lifecycle) -> None:
    """Starting a bad build, or completing one not downloading or without a file, is refused."""
    lc.mark_bad(B1, BadReason.SIGNATURE_INVALID, "x")
    with pytest.raises(IllegalTransition, match="bad"):
        lc.record_download_started(B1, "u", SHA, 1)
    with pytest.raises(IllegalTransition, match="none"):
        lc.record_download_complete(B2)
    lc.record_download_started(B2, "u", SHA, 10)
    with pytest.raises(IllegalTransition, match="no file"):
        lc.record_download_complete(B2)
    ready(lc, B3)
    with pytest.raises(IllegalTransition, match="installed"):
        lc.record_download_started(B3, "u", SHA, 1)


def test_install_complete_removes_download_and_staging(lc: Lifecycle) -> None:
    """Installing records size and files and deletes the now-useless download, and the
    validators a crash left beside it (found by the e2e crash campaign)."""
    download(lc, B1)
    meta = lc.download_path(B1).with_name(lc.download_path(B1).name + ".meta")
    meta.write_text("{}")
    install(lc, B1, promote=False)
    state = lc.state(B1)
    assert isinstance(state, Installed) and list(state.files) == ["bin/app"]
    assert not lc.download_path(B1).exists() and not lc.staging_path(B1).exists()
    assert not meta.exists()
    assert lc.pointers.next_boot == B0  # not promoted yet


def test_install_complete_needs_tree_and_good_build(lc: Lifecycle) -> None:
    """No tree in place, or a tombstoned build, refuses record_install_complete."""
    download(lc, B1)
    with pytest.raises(IllegalTransition, match="missing"):
        lc.record_install_complete(B1, 1, {})
    lc.mark_bad(B2, BadReason.INVALID_BUNDLE, "x")
    with pytest.raises(IllegalTransition):
        lc.record_install_complete(B2, 1, {})
    with pytest.raises(IllegalTransition):
        lc.record_install_started(B2)


def test_install_loop_guard_marks_bad_after_five(lc: Lifecycle) -> None:
    """Five installs started without completing: the sixth start marks install_loop."""
    download(lc, B1)
    for n in range(1, MAX_INSTALL_ATTEMPTS + 1):
        lc.record_install_started(B1)
        lc = reopen(lc)  # the daemon died mid-install
        assert lc.state(B1) == Downloaded(url_of(B1), sha_of(B1), size_of(B1), n)
    with pytest.raises(InstallLoop) as info:
        lc.record_install_started(B1)
    assert isinstance(info.value, BadInputError) and info.value.bad_reason == "install_loop"
    state = lc.state(B1)
    assert isinstance(state, Bad) and state.reason is BadReason.INSTALL_LOOP
    assert not lc.download_path(B1).exists()
    lc.close()


def test_install_aborted_does_not_count(lc: Lifecycle) -> None:
    """A transient failure that ended cleanly gives the attempt back."""
    download(lc, B1)
    for _ in range(MAX_INSTALL_ATTEMPTS * 2):
        lc.record_install_started(B1)
        lc.record_install_aborted(B1)
    state = lc.state(B1)
    assert isinstance(state, Downloaded) and state.attempts == 0
    install(lc, B1)


def test_attempts_survive_a_fresh_redownload_of_same_bytes(lc: Lifecycle) -> None:
    """An evicted download re-fetched does not reset the loop guard."""
    download(lc, B1)
    lc.record_install_started(B1)
    lc.download_path(B1).unlink()
    download(lc, B1)
    state = lc.state(B1)
    assert isinstance(state, Downloaded) and state.attempts == 1


def test_install_without_state_is_allowed(lc: Lifecycle) -> None:
    """A local bundle (no download state) installs; there is nothing to count."""
    install(lc, B1)
    assert lc.pointers.next_boot == B1


# --- promote and the current link -------------------------------------------------------


def test_promote_replaces_current(lc: Lifecycle) -> None:
    """A promoted build becomes next_boot and `current` points at its tree."""
    ready(lc, B1)
    assert lc.pointers.next_boot == B1
    assert os.readlink(lc.state_dir / "current") == f"builds/{R}/1/tree"
    assert lc.boot_target() == (B1, lc.tree_path(B1))
    check_invariants(lc)


def test_promote_refuses_uninstalled_or_bad(lc: Lifecycle) -> None:
    """Only an installed, good build can be promoted."""
    download(lc, B1)
    with pytest.raises(IllegalTransition):
        lc.promote_to_next_boot(B1)
    ready(lc, B2, )
    lc.mark_bad(B2, BadReason.MANUAL, "x")
    with pytest.raises(IllegalTransition):
        lc.promote_to_next_boot(B2)


def test_promote_retires_unbooted_predecessor(lc: Lifecycle) -> None:
    """The previous next_boot that never booted is forgotten; a booted one is kept."""
    booted(lc, B1)
    ready(lc, B2)
    ready(lc, B3)
    assert lc.state(B2) is None and not (lc.state_dir / "builds" / R / "2").exists()
    assert isinstance(lc.state(B1), Installed)  # last_booted survives


# --- boot protocol ----------------------------------------------------------------------


def test_boot_start_takes_next_boot_and_records_breadcrumb(lc: Lifecycle) -> None:
    """BootStart(None, pid) takes next_boot and records pid, its start time and the time."""
    ready(lc, B1)
    build, path = lc.record_boot_start(None, os.getpid(), None)
    assert (build, path) == (B1, lc.tree_path(B1))
    p = lc.pointers
    assert p.currently_booting == B1 and p.boot_pid == os.getpid()
    assert p.boot_pid_start == process.pid_start_time(os.getpid())
    assert p.boot_started_at is not None


def test_boot_start_of_other_build_is_not_boot_target(lc: Lifecycle) -> None:
    """BootStart with a build other than next_boot raises NotBootTarget(expected, got)."""
    ready(lc, B1)
    with pytest.raises(NotBootTarget) as info:
        lc.record_boot_start(B2, None, None)
    assert (info.value.expected, info.value.got) == (B1, B2)
    assert isinstance(info.value, PatchdError) and lc.pointers.currently_booting is None


def test_boot_start_detects_previous_crash_first(lc: Lifecycle) -> None:
    """A stale breadcrumb without pid at BootStart is a boot crash; the fallback is booted."""
    booted(lc, B1)
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    build, _ = lc.record_boot_start(None, None, None)
    state = lc.state(B2)
    assert isinstance(state, Bad) and state.reason is BadReason.BOOT_CRASH
    assert build == B1


def test_boot_success_records_and_cleans_older(lc: Lifecycle) -> None:
    """Success: last_booted set, breadcrumb cleared, older builds gone, tombstones kept."""
    events: list[tuple[str, Build, str]] = []
    lc.on_event = lambda *e: events.append(e)
    booted(lc, B1)
    lc.mark_bad(Build(R, 4), BadReason.HASH_MISMATCH, "x")
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    assert lc.record_boot_success(B2) == B2
    p = lc.pointers
    assert p.last_booted == B2 and p.currently_booting is None and p.boot_started_at is None
    assert lc.state(B1) is None and not (lc.state_dir / "builds" / R / "1").exists()
    assert isinstance(lc.state(Build(R, 4)), Bad)
    assert [e[0] for e in events] == ["boot_success", "boot_success"]
    check_invariants(lc)


def test_boot_success_keeps_newer_download_and_next_boot(lc: Lifecycle) -> None:
    """A newer build being downloaded, and a newer next_boot, survive a boot success."""
    ready(lc, B1)
    lc.record_boot_start(None, None, None)
    ready(lc, B2)  # promoted while B1 boots
    start_download(lc, B3)
    receive(lc, B3, 3)
    lc.record_boot_success(None)
    assert lc.pointers.next_boot == B2 and isinstance(lc.state(B2), Installed)
    assert isinstance(lc.state(B3), Downloading) and lc.download_path(B3).stat().st_size == 3


def test_boot_success_leaves_an_install_in_progress_alone(lc: Lifecycle) -> None:
    """A boot success between the installer's rename of the staging tree and
    record_install_complete keeps the new tree (found by the crash campaign: the tree
    of a build still ``downloaded`` was swept, and the install then failed with
    IllegalTransition "tree missing")."""
    ready(lc, B1)
    lc.record_boot_start(None, None, None)
    download(lc, B2)
    lc.record_install_started(B2)
    staging = lc.staging_path(B2)
    (staging / "bin").mkdir(parents=True)
    (staging / "bin" / "app").write_bytes(b"2")
    os.rename(staging, lc.tree_path(B2))
    lc.record_boot_success(None)  # the app reports in while the install finishes
    assert (lc.tree_path(B2) / "bin" / "app").read_bytes() == b"2"
    lc.record_install_complete(B2, 1, {"bin/app": sha_of(B2)})
    lc.end_install(B2)
    lc.promote_to_next_boot(B2)
    assert lc.pointers.next_boot == B2 and lc.pointers.last_booted == B1


def test_boot_success_requires_boot_in_progress(lc: Lifecycle) -> None:
    """Without BootStart: NoBootInProgress; with another build: NotBootTarget."""
    with pytest.raises(NoBootInProgress):
        lc.record_boot_success(None)
    with pytest.raises(NoBootInProgress):
        lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "x")
    ready(lc, B1)
    lc.record_boot_start(None, None, None)
    with pytest.raises(NotBootTarget):
        lc.record_boot_success(B2)
    with pytest.raises(NotBootTarget):
        lc.record_boot_failure(B2, BadReason.BOOT_FAILURE, "x")


def test_full_upgrade_becomes_release_only_after_booting(lc: Lifecycle) -> None:
    """A full bundle's (R', 0) is the base of patches once it booted; older builds go."""
    booted(lc, B1)
    full = Build("2.0.0", 0)
    install(lc, full)
    assert lc.release == R and lc.tree_path(full) == lc.state_dir / "builds/2.0.0/0/tree"
    lc.record_boot_start(full, None, None)
    lc.record_boot_success(full)
    assert lc.release == "2.0.0" and lc.state(B1) is None
    patch = Build("2.0.0", 1)
    booted(lc, patch)
    assert isinstance(lc.state(full), Installed)  # the base of patches is never cleaned
    lc.forget_rolled_back(patch)
    assert lc.pointers.next_boot == full
    with pytest.raises(RollbackRefused):
        lc.manual_rollback()
    lc = reopen(lc)  # VERSION still says 1.0.0: not a release change
    assert lc.release == "2.0.0" and lc.pointers.next_boot == full
    lc.close()


def test_failed_full_upgrade_falls_back_to_old_release(lc: Lifecycle) -> None:
    """(R', 0) failing before it ever booted leaves release and last_booted as they were."""
    booted(lc, B1)
    full = Build("2.0.0", 0)
    install(lc, full)
    lc.record_boot_start(None, None, None)
    lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "exit 1")
    assert lc.release == R and lc.pointers.next_boot == B1


def test_boot_failure_tombstones_and_falls_back(lc: Lifecycle) -> None:
    """Failure: bad boot_failure, breadcrumb cleared, next_boot := last_booted, tree kept."""
    events: list[tuple[str, Build, str]] = []
    lc.on_event = lambda *e: events.append(e)
    booted(lc, B1)
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    assert lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "exit 3") == B2
    state = lc.state(B2)
    assert isinstance(state, Bad) and state.reason is BadReason.BOOT_FAILURE
    assert state.detail == "exit 3"
    assert lc.pointers.currently_booting is None and lc.pointers.next_boot == B1
    assert lc.tree_path(B2).is_dir()  # the failed host may still run it
    assert events[-1] == ("boot_failure", B2, "boot_failure: exit 3")
    booted_again = lc.record_boot_start(None, None, None)[0]
    lc.record_boot_success(booted_again)
    assert not lc.tree_path(B2).exists() and isinstance(lc.state(B2), Bad)
    check_invariants(lc)


def test_boot_failure_of_release_itself_keeps_no_tombstone(lc: Lifecycle) -> None:
    """The OS release cannot be tombstoned: nothing lies below it; the breadcrumb still clears."""
    lc.record_boot_start(None, None, None)
    lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "x")
    assert lc.state(B0) is None and lc.pointers.next_boot == B0
    assert lc.pointers.currently_booting is None


def test_detect_boot_crash_branches(lc: Lifecycle) -> None:
    """No breadcrumb or a live host: nothing; a dead host: boot_crash on that build."""
    assert lc.detect_boot_crash() is None
    booted(lc, B1)
    ready(lc, B2)
    lc.record_boot_start(None, os.getpid(), None)
    assert lc.detect_boot_crash() is None  # we are alive, same start time
    assert lc.detect_boot_crash(lambda pid, start: True) is None
    seen: list[tuple[int, int | None]] = []

    def dead(pid: int, start: int | None) -> bool:
        seen.append((pid, start))
        return False

    assert lc.detect_boot_crash(dead) == B2
    assert seen == [(os.getpid(), process.pid_start_time(os.getpid()))]
    state = lc.state(B2)
    assert isinstance(state, Bad) and state.reason is BadReason.BOOT_CRASH
    assert lc.pointers.next_boot == B1 and lc.pointers.currently_booting is None


def test_detect_boot_crash_with_reused_pid(lc: Lifecycle) -> None:
    """A breadcrumb whose pid now belongs to a process with another start time is a crash."""
    ready(lc, B1)
    lc.record_boot_start(None, os.getpid(), 1)  # start time 1: not us
    assert lc.detect_boot_crash() == B1


def test_boot_elapsed(lc: Lifecycle) -> None:
    """boot_elapsed counts from the breadcrumb's start time, and is None without one."""
    now = datetime.now(UTC)
    assert lc.boot_elapsed(now) is None
    lc.record_boot_start(None, None, None)
    elapsed = lc.boot_elapsed(now + timedelta(seconds=11))
    assert elapsed is not None and 10 <= elapsed <= 12  # whole seconds in the breadcrumb
    lc.record_boot_success(None)
    assert lc.boot_elapsed(now) is None


# --- validation, recompute, mark_bad, cleanup -------------------------------------------


def test_validate_next_boot_ok_and_failed(lc: Lifecycle) -> None:
    """A passing check keeps next_boot; a problem marks it validation_failed and falls back."""
    booted(lc, B1)
    ready(lc, B2)
    calls: list[Build] = []

    def ok(build: Build, state: Installed, tree: Path) -> None:
        calls.append(build)
        assert state.files and (tree / "bin" / "app").is_file()

    lc.validate_next_boot(ok)
    assert calls == [B2] and lc.pointers.next_boot == B2
    lc.validate_next_boot(lambda b, s, t: "bin/app hash differs" if b == B2 else None)
    state = lc.state(B2)
    assert isinstance(state, Bad) and state.reason is BadReason.VALIDATION_FAILED
    assert state.detail == "bin/app hash differs" and lc.pointers.next_boot == B1


def test_validate_catches_corrupted_fallback_too(lc: Lifecycle) -> None:
    """When next_boot and last_booted both fail validation, the release is booted."""
    booted(lc, B1)
    ready(lc, B2)
    lc.validate_next_boot(lambda b, s, t: "corrupt")
    assert lc.bad_builds() == {B1, B2} and lc.pointers.next_boot == B0
    lc.validate_next_boot(lambda b, s, t: pytest.fail("the release tree is not checked"))


def test_recompute_never_replaces_valid_newer_next_boot(lc: Lifecycle) -> None:
    """A valid installed next_boot newer than last_booted is kept by recompute."""
    booted(lc, B1)
    ready(lc, B2)
    assert lc.recompute_next_boot() == B2
    lc.forget_rolled_back(B3)  # an unrelated rollback recomputes too
    assert lc.pointers.next_boot == B2


def test_recompute_falls_back_to_last_booted_then_release(lc: Lifecycle) -> None:
    """choose_next_boot: next_boot, else last_booted, else (release, 0), else the OS release."""
    p = Pointers(release="2.0", next_boot=B2, last_booted=B1, os_release=R)
    assert choose_next_boot(p, lambda b: True) == B2
    assert choose_next_boot(p, lambda b: b == B1) == B1
    assert choose_next_boot(p, lambda b: b == Build("2.0", 0)) == Build("2.0", 0)
    assert choose_next_boot(p, lambda b: False) == B0


def test_bad_last_booted_is_kept_but_never_promoted(lc: Lifecycle) -> None:
    """A bad last_booted stays as a pointer (breadcrumb), but next_boot falls to the release."""
    booted(lc, B1)
    lc.mark_bad(B1, BadReason.MANUAL, "operator")
    assert lc.pointers.last_booted == B1 and lc.pointers.next_boot == B0
    assert lc.tree_path(B1).is_dir()  # the host may be running it
    lc = reopen(lc)
    assert lc.pointers.next_boot == B0 and lc.tree_path(B1).is_dir()
    with pytest.raises(IllegalTransition):
        lc.promote_to_next_boot(B1)
    lc.close()


def test_mark_bad_keeps_first_reason(lc: Lifecycle) -> None:
    """A second mark_bad does not overwrite the tombstone's original reason."""
    lc.mark_bad(B1, BadReason.HASH_MISMATCH, "first")
    lc.mark_bad(B1, BadReason.MANUAL, "second")
    state = lc.state(B1)
    assert isinstance(state, Bad) and (state.reason, state.detail) == (BadReason.HASH_MISMATCH,
                                                                       "first")


def test_mark_bad_logs_reason_as_event(lc: Lifecycle) -> None:
    """The reason is the log event name, so `journalctl PATCHD_EVENT=boot_crash` finds it."""
    with structlog.testing.capture_logs() as logs:
        lc.mark_bad(B1, BadReason.SIGNATURE_INVALID, "untrusted key")
    assert any(e["event"] == "signature_invalid" and e["log_level"] == "warning" for e in logs)


def test_mark_bad_json_is_spec_shape(lc: Lifecycle) -> None:
    """A tombstone is {"state": "bad", "reason", "detail", "at"}."""
    lc.mark_bad(B1, BadReason.HASH_MISMATCH, "sha differs")
    data = json.loads((lc.state_dir / "builds" / R / "1" / "state.json").read_text())
    assert set(data) == {"state", "reason", "detail", "at"}
    assert (data["state"], data["reason"], data["detail"]) == ("bad", "hash_mismatch",
                                                               "sha differs")


def test_cleanup_is_state_aware(lc: Lifecycle) -> None:
    """cleanup: a bad build keeps only state.json; another build is forgotten entirely."""
    download(lc, B1)
    lc.mark_bad(B1, BadReason.HASH_MISMATCH, "x")
    assert [p.name for p in (lc.state_dir / "builds" / R / "1").iterdir()] == ["state.json"]
    assert not lc.download_path(B1).exists()
    ready(lc, B2, promote=False)
    lc.cleanup(B2)
    assert not (lc.state_dir / "builds" / R / "2").exists()
    lc.cleanup(B1)
    assert isinstance(lc.state(B1), Bad)


def test_cleanup_keeps_tree_of_last_booted(lc: Lifecycle) -> None:
    """A rolled-back last_booted loses its state at once but keeps its tree until a boot."""
    booted(lc, B1)
    lc.forget_rolled_back(B1)
    assert lc.state(B1) is None and lc.tree_path(B1).is_dir()
    assert lc.pointers.next_boot == B0
    lc = reopen(lc)
    assert lc.tree_path(B1).is_dir()
    lc.record_boot_start(None, None, None)
    lc.record_boot_success(None)
    assert not (lc.state_dir / "builds" / R / "1").exists()
    lc.close()


# --- rollback scenarios -----------------------------------------------------------------


def test_server_rollback_then_rollforward_installs_again(lc: Lifecycle) -> None:
    """After a server rollback the same patch, rolled forward, downloads and installs again."""
    events: list[tuple[str, Build, str]] = []
    lc.on_event = lambda *e: events.append(e)
    ready(lc, B1)
    lc.forget_rolled_back(B1)
    assert lc.state(B1) is None and lc.pointers.next_boot == B0
    assert events == [("rollback", B1, "rolled back by the server")]
    assert lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1)).action is Action.FRESH
    ready(lc, B1)
    assert lc.pointers.next_boot == B1
    check_invariants(lc)


def test_rolled_back_patch_not_resurrected_when_replacement_fails(lc: Lifecycle) -> None:
    """B1 booted then rolled back; B2 fails to boot: next_boot is the release, not B1."""
    booted(lc, B1)
    lc.forget_rolled_back(B1)
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "x")
    assert lc.pointers.next_boot == B0


def test_local_tombstone_survives_server_unrollback(lc: Lifecycle) -> None:
    """A boot-crash tombstone is not lifted by a server rollback or a later roll-forward."""
    ready(lc, B1)
    lc.record_boot_start(None, None, None)
    lc.detect_boot_crash()
    lc.forget_rolled_back(B1)
    state = lc.state(B1)
    assert isinstance(state, Bad) and state.reason is BadReason.BOOT_CRASH
    assert lc.decide_start(B1, url_of(B1), sha_of(B1), size_of(B1)).action is Action.BAD


def test_manual_rollback(lc: Lifecycle) -> None:
    """Rollback marks next_boot bad (manual) and returns the new next_boot; refused at (R, 0)."""
    events: list[tuple[str, Build, str]] = []
    lc.on_event = lambda *e: events.append(e)
    with pytest.raises(RollbackRefused, match="release itself"):
        lc.manual_rollback()
    booted(lc, B1)
    ready(lc, B2)
    assert lc.manual_rollback() == B1
    state = lc.state(B2)
    assert isinstance(state, Bad) and state.reason is BadReason.MANUAL
    assert ("rollback", B2, "rolled back by an operator") in events
    assert lc.manual_rollback() == B0


def test_event_hook_failure_does_not_break_transition(lc: Lifecycle) -> None:
    """An exception in on_event is logged; the transition is already durable."""
    def broken(kind: str, build: Build, message: str) -> None:
        raise RuntimeError("queue full")

    lc.on_event = broken
    ready(lc, B1)
    lc.record_boot_start(None, None, None)
    assert lc.record_boot_success(None) == B1
    assert lc.pointers.last_booted == B1


def test_crash_between_tombstone_and_breadcrumb_still_bad(lc: Lifecycle) -> None:
    """Killed right after the tombstone write, the build is bad and never booted again."""
    booted(lc, B1)
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    lc.close()
    child = Path(__file__).parent / "support" / "lifecycle_child.py"
    env = {**os.environ, "PATCHD_FAILPOINT": "boot_failure.tombstone.after"}
    proc = subprocess.run([sys.executable, str(child), str(lc.state_dir), str(lc.cache_dir),
                           str(lc.release_dir), "0", "0", "boot_failure"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == process.FAILPOINT_EXIT, proc.stderr
    lc = Lifecycle.open(lc.state_dir, lc.cache_dir, lc.release_dir)
    assert isinstance(lc.state(B2), Bad)
    assert lc.pointers.currently_booting == B2  # the breadcrumb was not cleared
    assert lc.pointers.next_boot == B1  # but it is never the boot target again
    assert lc.detect_boot_crash() == B2
    assert lc.state(B2) == Bad(BadReason.BOOT_FAILURE, "failpoint test",
                               lc.state(B2).at)  # type: ignore[union-attr]
    check_invariants(lc)
    lc.close()


def test_repr_shows_state(lc: Lifecycle) -> None:
    """repr names next_boot, last_booted, a boot in progress and each build's state."""
    ready(lc, B1)
    lc.record_boot_start(None, 123, 4)
    text = repr(lc)
    assert "next_boot=1.0.0+1" in text and "booting=1.0.0+1 pid=123" in text
    assert "1.0.0+1:installed" in text


def test_boot_success_sweeps_kept_tree_of_rolled_back_build_downloading_again(
        lc: Lifecycle) -> None:
    """A host's tree kept after a rollback goes at the next boot even if the build is
    being downloaded again (found by the random driver)."""
    booted(lc, B2)
    lc.forget_rolled_back(B2)
    start_download(lc, B2)
    assert lc.tree_path(B2).is_dir()
    lc.record_boot_start(None, None, None)  # the release itself
    lc.record_boot_success(None)
    assert isinstance(lc.state(B2), Downloading) and not lc.tree_path(B2).exists()
    check_invariants(lc)


def test_failed_tree_survives_cleanup_until_next_boot(lc: Lifecycle) -> None:
    """A build that failed to boot keeps its tree through a server rollback until a boot."""
    booted(lc, B1)
    ready(lc, B2)
    lc.record_boot_start(None, None, None)
    lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "x")
    lc.forget_rolled_back(B2)
    assert lc.tree_path(B2).is_dir() and isinstance(lc.state(B2), Bad)
    lc.record_boot_start(None, None, None)
    lc.record_boot_success(None)
    assert sorted(p.name for p in lc.tree_path(B2).parent.iterdir()) == ["state.json"]
