"""``patchd launch`` on the real daemon with real child processes (docs/host-integration.md):
the boot protocol run for the app, health checks and their fallback, hooks, signals
and exit status, and the launcher killed outright."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.launch import LaunchEnv, R, bad_detail, install, launch_env, pid_gone


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LaunchEnv]:
    with launch_env(tmp_path) as e:
        yield e


FAIL_CHECK = "#!/bin/sh\necho checking the database\necho 'db: connection refused' >&2\nexit 3\n"
HANG_CHECK = "#!/bin/sh\necho waiting for the database\nexec sleep 600\n"


def test_healthy_boot_reports_success_and_passes_the_exit_status(env: LaunchEnv) -> None:
    """The launcher boots next_boot, runs the app from its tree, reports BootSuccess
    once the checks pass, and exits with the app's own status."""
    d = env.daemon()
    install(d, env.patch(1, executables={"patchd/health/required.d/10-ok": "#!/bin/sh\n"}))
    launcher = env.launch(d, env={"APP_TERM_STATUS": "7"})
    _, started = env.reports.wait("started", f"{R}+1")
    launcher.wait_log("launch.healthy")
    status = d.status()
    assert status["last_booted"] == {"release": R, "patch": 1}
    assert status["currently_booting"] is None
    launcher.signal(signal.SIGTERM)
    env.reports.wait("exiting", f"{R}+1")
    assert launcher.wait() == 7
    assert pid_gone(started.pid)


def test_required_check_failing_falls_back_within_deadline(env: LaunchEnv) -> None:
    """A required check that does not finish in [health] timeout marks the build bad,
    naming the check and its output; the app runs on the fallback within the check's
    deadline plus 2 s."""
    d = env.daemon('[health]\ntimeout = "1s"\n')
    install(d, env.patch(1, executables={"patchd/health/required.d/20-db": HANG_CHECK}))
    env.launch(d)
    _, bad = env.reports.wait("started", f"{R}+1")
    _, good = env.reports.wait("started", f"{R}+0")
    assert good.at - bad.at < 1 + 2, good.at - bad.at
    state = bad_detail(d, R, 1)
    assert state["state"] == "bad" and state["reason"] == "boot_failure"
    assert "required.d/20-db" in state["detail"]
    assert "timed out" in state["detail"] and "waiting for the database" in state["detail"]
    assert pid_gone(bad.pid)
    status = d.wait_status(lambda s: s["last_booted"] is not None, "fallback healthy")
    assert status["last_booted"] == {"release": R, "patch": 0}


def test_required_check_exit_status_and_output_tail_name_it(env: LaunchEnv) -> None:
    """A host-configured required check that exits non-zero fails the boot with its
    command, status and output in the tombstone's detail; it runs for every build."""
    check = env.tmp / "check-db"
    check.write_text('#!/bin/sh\n[ "$PATCHD_BUILD" = "1.4.0+0" ] && exit 0\n'
                     + FAIL_CHECK.removeprefix("#!/bin/sh\n"))
    check.chmod(0o755)
    d = env.daemon(f'[health]\nrequired = ["{check} --strict"]\n')
    install(d, env.patch(1))
    launcher = env.launch(d)
    launcher.wait_log("launch.healthy", where=lambda line: f"{R}+0" in line)
    state = bad_detail(d, R, 1)
    assert f"{check} --strict" in state["detail"]
    assert "exit status 3" in state["detail"]
    assert "db: connection refused" in state["detail"]
    assert d.status()["last_booted"] == {"release": R, "patch": 0}


def test_wanted_check_failing_is_an_event_not_a_rollback(env: LaunchEnv) -> None:
    """A wanted check that fails is logged (health.wanted_failed) and the build stays
    good: BootSuccess, no fallback."""
    d = env.daemon()
    install(d, env.patch(1, executables={"patchd/health/wanted.d/10-cache": FAIL_CHECK}))
    launcher = env.launch(d)
    line = launcher.wait_log("health.wanted_failed")
    assert "wanted.d/10-cache" in line and "exit status 3" in line
    launcher.wait_log("launch.healthy")
    env.reports.wait("started", f"{R}+1")
    assert d.status()["last_booted"] == {"release": R, "patch": 1}
    assert [e.build for e in env.reports.of("started")] == [f"{R}+1"]
    assert "launch.boot_failed" not in launcher.log()


def test_signals_are_forwarded(env: LaunchEnv) -> None:
    """HUP, USR1, USR2 and TERM sent to the launcher reach the app; TERM ends both."""
    d = env.daemon()
    launcher = env.launch(d)
    env.reports.wait("started")
    launcher.wait_log("launch.healthy")
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        launcher.signal(sig)
        env.reports.wait(f"signal {sig.name}")
    launcher.signal(signal.SIGTERM)
    env.reports.wait("signal SIGTERM")
    assert launcher.wait() == 0


def test_exit_by_signal_propagates(env: LaunchEnv) -> None:
    """An app killed by a signal after its boot makes the launcher die of the same
    signal (what systemd and a shell see)."""
    d = env.daemon()
    launcher = env.launch(d)
    _, started = env.reports.wait("started")
    launcher.wait_log("launch.healthy")
    os.kill(started.pid, signal.SIGKILL)
    assert launcher.wait() == -signal.SIGKILL


def test_launcher_killed_is_a_boot_crash_and_the_next_launch_falls_back(
        env: LaunchEnv) -> None:
    """The launcher SIGKILLed during a boot: the app dies with it, the daemon judges the
    boot a crash (its pid watch is on the launcher), and the next launch boots the
    fallback."""
    d = env.daemon()
    install(d, env.patch(1, executables={"patchd/health/required.d/20-db": HANG_CHECK}))
    launcher = env.launch(d)
    _, bad = env.reports.wait("started", f"{R}+1")
    launcher.wait_log("health.output")  # the check runs: the boot is in progress
    launcher.proc.kill()
    launcher.wait()
    status = d.wait_status(lambda s: s["next_boot"] == {"release": R, "patch": 0},
                           "boot crash judged")
    assert status["currently_booting"] is None
    assert bad_detail(d, R, 1)["reason"] == "boot_crash"
    deadline = time.monotonic() + 10
    while not pid_gone(bad.pid):  # PR_SET_PDEATHSIG: SIGKILL on the launcher's death
        assert time.monotonic() < deadline, "the app outlived its launcher"
        time.sleep(0.01)
    second = env.launch(d)
    env.reports.wait("started", f"{R}+0")
    second.wait_log("launch.healthy")
    assert d.status()["last_booted"] == {"release": R, "patch": 0}
