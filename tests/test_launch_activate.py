"""When a newly installed build replaces the running app (``[activate] policy``): the
window rule on an injected clock, ``immediate`` and ``window`` under the real launcher
and daemon, and what ``status`` says about a pending build."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.cli.launch_activate import activation_at
from patchd.config import config_from_dict
from patchd.config.launch import ActivateSection
from patchd.core.errors import ConfigErrors
from support.launch import LaunchEnv, R, install, launch_env

WINDOW = ActivateSection(policy="window", window="02:00-04:00")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LaunchEnv]:
    with launch_env(tmp_path) as e:
        yield e


# --- the rule, on an injected clock -------------------------------------------------------


@pytest.mark.parametrize(("now", "opens", "closes"), [
    ("2030-01-01T12:00", "2030-01-02T02:00", "2030-01-02T04:00"),  # after today's window
    ("2030-01-01T01:00", "2030-01-01T02:00", "2030-01-01T04:00"),  # before it
    ("2030-01-01T03:00", "2030-01-01T02:00", "2030-01-01T04:00"),  # inside it
    ("2030-01-01T04:00", "2030-01-02T02:00", "2030-01-02T04:00"),  # the end is outside
])
def test_next_window(now: str, opens: str, closes: str) -> None:
    """The window that contains the time or comes next, in local time."""
    assert WINDOW.next_window(at(now)) == (at(opens), at(closes))


def test_window_across_midnight() -> None:
    """A window may span midnight: "23:30-00:30" contains 00:10 of the next day."""
    w = ActivateSection(policy="window", window="23:30-00:30")
    assert w.next_window(at("2030-01-02T00:10")) == (at("2030-01-01T23:30"),
                                                     at("2030-01-02T00:30"))
    assert w.next_window(at("2030-01-02T12:00")) == (at("2030-01-02T23:30"),
                                                     at("2030-01-03T00:30"))


def test_activation_time_is_spread_inside_the_window() -> None:
    """A restart is put at a random point of what is left of the window, never outside
    it; immediate is now; next-start and idle have no time."""
    rng = random.Random(7)
    for now in ("2030-01-01T12:00", "2030-01-01T03:30", "2030-01-01T01:59"):
        opens, closes = WINDOW.next_window(at(now))
        times = [activation_at(WINDOW, at(now), rng) for _ in range(200)]
        assert all(t is not None and max(opens, at(now)) <= t <= closes for t in times)
        spread = max(t for t in times if t) - min(t for t in times if t)
        assert spread > (closes - max(opens, at(now))) / 2  # spread, not one instant
    assert activation_at(ActivateSection(policy="immediate"), at("2030-01-01T12:00")) \
        == at("2030-01-01T12:00")
    assert activation_at(ActivateSection(), at("2030-01-01T12:00")) is None
    assert activation_at(ActivateSection(policy="idle"), at("2030-01-01T12:00")) is None


@pytest.mark.parametrize(("section", "needle"), [
    ({"activate": {"policy": "sometimes"}}, "activate.policy: expected one of next-start"),
    ({"activate": {"policy": "window"}}, "activate.window: is required"),
    ({"activate": {"policy": "window", "window": "2-4"}}, "expected a window such as"),
    ({"activate": {"policy": "window", "window": "02:00-02:00"}}, "is empty"),
    ({"activate": {"window": "02:00-04:00"}}, "only used with policy"),
    ({"health": {"required": "check"}}, "health.required: expected a list"),
    ({"health": {"wanted": ["check 'unclosed"]}}, "cannot split"),
    ({"health": {"attempts": 0}}, "health.attempts: expected an integer from 1 to 10"),
    ({"hooks": {"timeout": "0"}}, "hooks.timeout: must be longer than 0"),
    ({"hooks": {"post-install": "x"}}, "hooks.post-install: unknown key"),
])
def test_launcher_sections_are_validated(section: dict[str, object], needle: str) -> None:
    """[activate], [health] and [hooks] are checked like every other section."""
    doc: dict[str, object] = {"app": {"name": "kiosk", "release_dir": "/opt/kiosk"},
                              "server": {"manifest_url": "https://u.example/m.json"},
                              "trust": {"keys": [
                                  "ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="]},
                              **section}
    with pytest.raises(ConfigErrors) as err:
        config_from_dict(doc, source="k.toml")
    assert needle in str(err.value)


# --- the real launcher ----------------------------------------------------------------------


def test_immediate_restarts_into_a_new_build_within_2_s(env: LaunchEnv) -> None:
    """policy = "immediate": the launcher learns of the install from WatchActivity and
    the app runs the new build within 2 s of the install."""
    d = env.daemon('[activate]\npolicy = "immediate"\n')
    launcher = env.launch(d)
    env.reports.wait("started", f"{R}+0")
    launcher.wait_log("launch.healthy")
    bundle = env.patch(1)
    install(d, bundle)
    installed = time.monotonic()
    env.reports.wait("exiting", f"{R}+0")
    _, new = env.reports.wait("started", f"{R}+1")
    assert new.at - installed < 2, new.at - installed
    launcher.wait_log("launch.healthy", where=lambda line: f"{R}+1" in line)
    assert d.status()["last_booted"] == {"release": R, "patch": 1}


def test_next_start_leaves_the_app_running(env: LaunchEnv) -> None:
    """The default policy changes nothing while the app runs; status says the build
    activates at the next start."""
    d = env.daemon()
    launcher = env.launch(d)
    env.reports.wait("started", f"{R}+0")
    launcher.wait_log("launch.healthy")
    install(d, env.patch(1))
    launcher.wait_log("activation.pending")
    status = d.status()
    assert status["activation"] == {"build": {"release": R, "patch": 1}, "policy": "next-start",
                                    "opens": None, "closes": None}
    shown = subprocess.run([sys.executable, "-m", "patchd", "status", "--socket",
                            str(d.socket)], capture_output=True, text=True, check=True).stdout
    assert f"  activates:    {R}+1 at the app's next start\n" in shown
    assert [e.build for e in env.reports.of("started")] == [f"{R}+0"]


def test_window_never_restarts_outside_the_window(env: LaunchEnv) -> None:
    """policy = "window" at 12:00 (injected clock) with a 02:00-04:00 window: the
    restart is scheduled inside tomorrow's window and nothing restarts now."""
    d = env.daemon('[activate]\npolicy = "window"\nwindow = "02:00-04:00"\n')
    launcher = env.launch(d, "--log-level", "debug",
                          env={"PATCHD_LAUNCH_NOW": "2030-01-01T12:00:00+00:00"})
    env.reports.wait("started", f"{R}+0")
    launcher.wait_log("launch.healthy")
    bundle = env.patch(1)
    env.publisher.publish(bundle)  # so that the CheckNow below has a manifest to read
    install(d, bundle)
    line = launcher.wait_log("activation.scheduled")
    when = datetime.fromisoformat(line.split("at=")[1].split()[0])
    assert datetime(2030, 1, 2, 2, tzinfo=UTC) <= when < datetime(2030, 1, 2, 4, tzinfo=UTC)
    # A later change, handled while the running app's activation still waits: had the
    # launcher restarted, it would be looking from the new build by now.
    mark = launcher.mark()
    d.call("CheckNow")
    launcher.wait_log("activation.looked", after=mark)
    assert [e.build for e in env.reports.of("started")] == [f"{R}+0"]
    assert "launch.activating" not in launcher.log()
    activation = d.status()["activation"]
    assert activation["policy"] == "window" and activation["build"] == {"release": R,
                                                                         "patch": 1}


def test_window_restarts_inside_the_window(env: LaunchEnv) -> None:
    """The same launcher ten seconds before the window closes restarts into the new
    build, at a random point of the seconds left."""
    d = env.daemon('[activate]\npolicy = "window"\nwindow = "02:00-04:00"\n')
    bundle = env.patch(1)
    launcher = env.launch(d, env={"PATCHD_LAUNCH_NOW": "2030-01-01T03:59:50+00:00"})
    env.reports.wait("started", f"{R}+0")
    launcher.wait_log("launch.healthy")
    install(d, bundle)
    line = launcher.wait_log("activation.scheduled")
    when = datetime.fromisoformat(line.split("at=")[1].split()[0])
    assert when < datetime(2030, 1, 1, 4, tzinfo=UTC), "the test was too slow to be inside"
    env.reports.wait("started", f"{R}+1")
    launcher.wait_log("launch.healthy", where=lambda text: f"{R}+1" in text)


def test_idle_restarts_when_the_app_says_it_is_idle(env: LaunchEnv) -> None:
    """policy = "idle": a new build waits until the app sends PATCHD_IDLE=1 on the
    launcher's notify socket, then the app restarts into it."""
    d = env.daemon('[activate]\npolicy = "idle"\n')
    launcher = env.launch(d, env={"APP_IDLE_ON_USR2": "1"})
    env.reports.wait("started", f"{R}+0")
    launcher.wait_log("launch.healthy")
    install(d, env.patch(1))
    launcher.wait_log("activation.pending")
    assert [e.build for e in env.reports.of("started")] == [f"{R}+0"]
    launcher.signal(signal.SIGUSR2)  # forwarded; the app answers PATCHD_IDLE=1
    env.reports.wait("started", f"{R}+1")
    launcher.wait_log("launch.healthy", where=lambda text: f"{R}+1" in text)
