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

from support.launch import LaunchEnv, R, Reports, bad_detail, install, launch_env, pid_gone


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


HOOK = ('#!/bin/sh\necho "$0 build=$PATCHD_BUILD failed=${PATCHD_FAILED_BUILD:-} cwd=$PWD" '
        '>> "$HOOK_LOG"\necho "hook output on stdout"\n')


def test_pre_start_failing_falls_back_and_on_fallback_runs_from_the_fallback(
        env: LaunchEnv) -> None:
    """pre-start runs before the first start of a build; when it fails the build is
    marked bad (boot_failure naming the hook) without the app starting, and on-fallback
    runs from the tree fallen back to, naming the failed build."""
    hook_log = env.tmp / "hooks.log"
    hooks = {"HOOK_LOG": str(hook_log)}
    d = env.daemon()
    install(d, env.patch(1, executables={"patchd/hooks/pre-start": HOOK,
                                         "patchd/hooks/on-fallback": HOOK}))
    first = env.launch(d, env=hooks)
    first.wait_log("launch.healthy")
    env.reports.wait("started", f"{R}+1")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    tree1 = d.state_dir / "builds" / R / "1" / "tree"
    assert hook_log.read_text().splitlines() == [
        f"{tree1}/patchd/hooks/pre-start build={R}+1 failed= cwd={tree1}"]

    install(d, env.patch(2, executables={
        "patchd/hooks/pre-start": HOOK + "echo 'migration 7 failed' >&2\nexit 4\n"}))
    second = env.launch(d, env=hooks)
    second.wait_log("launch.healthy", where=lambda line: f"{R}+1" in line)
    env.reports.wait("started", f"{R}+1", after=1)
    state = bad_detail(d, R, 2)
    assert state["reason"] == "boot_failure"
    assert "pre-start hook failed (exit status 4)" in state["detail"]
    assert "migration 7 failed" in state["detail"]
    tree2 = d.state_dir / "builds" / R / "2" / "tree"
    assert hook_log.read_text().splitlines()[1:] == [
        f"{tree2}/patchd/hooks/pre-start build={R}+2 failed= cwd={tree2}",
        f"{tree1}/patchd/hooks/on-fallback build={R}+1 failed={R}+2 cwd={tree1}"]
    assert [e.build for e in env.reports.of("started")] == [f"{R}+1", f"{R}+1"]
    assert "hook output on stdout" in second.log()


def test_notify_pass_through(env: LaunchEnv) -> None:
    """Type=notify: with --notify the checks wait for the app's READY=1 (sent a second
    after its start); the app's
    STATUS= reaches systemd's socket from the launcher, and READY=1 goes there only
    once the boot succeeded."""
    upstream = Reports()  # stands in for systemd's NOTIFY_SOCKET
    report = ("#!/usr/bin/env python3\nimport os, socket\n"
              "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto("
              "b'0 - check', os.environ['APP_REPORT'])\n")
    try:
        d = env.daemon()
        install(d, env.patch(1, executables={"patchd/health/required.d/10-report": report}))
        launcher = env.launch(d, "--notify", env={"APP_NOTIFY": "1", "APP_READY_DELAY": "1",
                                                  "NOTIFY_SOCKET": upstream.path})
        ready_at, _ = env.reports.wait("ready", f"{R}+1")
        check_at, _ = env.reports.wait("check")
        assert ready_at < check_at
        launcher.wait_log("launch.healthy")
        upstream.wait_raw("STATUS=warming up")
        upstream.wait_raw("READY=1")
        assert upstream.raw.index("STATUS=warming up") < upstream.raw.index("READY=1")
    finally:
        upstream.close()


def test_usage_and_config_errors_are_one_line(tmp_path: Path) -> None:
    """No COMMAND, a config of another app, or a config that cannot be read: exit 2 and
    one line naming what is wrong; the app is never started."""
    from support.cli import run_patchd

    config = tmp_path / "kiosk.toml"
    config.write_text('[app]\nname = "kiosk"\nrelease_dir = "/opt/kiosk"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[app]\nname = "kiosk"\nrelease_dir = "/opt/kiosk"\n'
                   '[activate]\npolicy = "window"\n')
    cases = [
        (["launch", "--config", str(config), "kiosk"], "give the COMMAND to run"),
        (["launch", "--config", str(config), "other", "--", "bin/app"],
         "configures app 'kiosk', not 'other'"),
        (["launch", "--config", str(tmp_path / "nope.toml"), "kiosk", "bin/app"],
         "nope.toml: no such file"),
        (["launch", "--config", str(bad), "kiosk", "bin/app"],
         "activate.window: is required"),
    ]
    for args, needle in cases:
        proc = run_patchd(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_without_the_daemon_the_release_runs_unprotected(env: LaunchEnv) -> None:
    """No daemon on the socket: the launcher says so and runs the release's own tree,
    still forwarding signals and passing on the exit status."""
    config = env.tmp / "kiosk.toml"
    config.write_text(f'[app]\nname = "kiosk"\nrelease_dir = "{env.release_dir}"\n'
                      f'[paths]\nsocket = "{env.tmp}/none.sock"\n')

    class Nowhere:
        config_path = config
        app = "kiosk"

    launcher = env.launch(Nowhere(), env={"APP_TERM_STATUS": "5"})  # type: ignore[arg-type]
    assert "running the release" in launcher.wait_log("launch.daemon_unreachable")
    _, started = env.reports.wait("started", "-")
    launcher.signal(signal.SIGTERM)
    env.reports.wait("exiting", "-")
    assert launcher.wait() == 5
    assert pid_gone(started.pid)
