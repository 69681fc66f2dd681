"""The launcher's sections of the config file: ``[health]``, ``[hooks]``, ``[activate]``.

The daemon reads them with the rest of the file (it runs ``hooks.post_install`` and
names the pending activation in GetStatus); ``patchd launch`` reads only these, with
the app's name, its ``release_dir`` and the socket (:func:`read_launch_config`), so
an app's start never loads the trust code nor needs the daemon's CA or key files.
Both go through the same checks here, so ``patchd config check`` refuses exactly what
the launcher would. The window rule (:meth:`ActivateSection.next_window`) is shared
for the same reason: GetStatus and the launcher agree on when a build activates.
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.core.errors import ConfigErrors, ConfigFileError

if TYPE_CHECKING:
    from patchd.config import _Reader

__all__ = ["POLICIES", "SECTIONS", "ActivateSection", "HealthSection", "HooksSection",
           "LaunchConfig", "launch_sections", "parse_window", "read_launch_config"]

POLICIES = ("next-start", "immediate", "idle", "window")

#: The keys of each section, for the config's unknown-key check.
SECTIONS: dict[str, set[str]] = {
    "health": {"required", "wanted", "timeout", "grace", "ready_timeout", "attempts"},
    "hooks": {"timeout", "post_install"},
    "activate": {"policy", "window", "stop_timeout"},
}


@dataclass(frozen=True)
class HealthSection:
    """Host-side health checks, beside those in a build's ``patchd/health/*.d``."""

    #: Command lines (split like a shell does, without a shell) that must pass.
    required: tuple[str, ...] = ()
    #: Command lines whose failure is logged, never fatal.
    wanted: tuple[str, ...] = ()
    #: Seconds each check may run; the required checks run together.
    timeout: float = 30.0
    #: Seconds between the app's start (or its READY=1) and the checks.
    grace: float = 0.0
    #: Seconds ``patchd launch --notify`` waits for the app's READY=1.
    ready_timeout: float = 90.0
    #: Starts in a row the launcher makes when each one fails (falling back each time).
    attempts: int = 3


@dataclass(frozen=True)
class HooksSection:
    #: Seconds each hook (pre-start, on-fallback, post_install) may run.
    timeout: float = 60.0
    #: Command line the daemon runs after it installed a build; "" for none.
    post_install: str = ""


@dataclass(frozen=True)
class ActivateSection:
    """When a newly installed build replaces the running one (docs/host-integration.md)."""

    policy: str = "next-start"
    #: ``"HH:MM-HH:MM"`` in local time, for ``policy = "window"``; may cross midnight.
    window: str = ""
    #: Seconds the app has to exit after SIGTERM before SIGKILL (restarts, fallbacks).
    stop_timeout: float = 30.0

    def next_window(self, now: datetime) -> tuple[datetime, datetime]:
        """The daily window that contains ``now`` or comes next: (opens, closes).

        ``now`` is an aware local time; windows are computed in local wall-clock time,
        so a window keeps its hours across a DST change.
        """
        start, end = parse_window(self.window)
        length = (end - start) % (24 * 60)
        today = now.astimezone().date()
        for offset in (-1, 0, 1):
            opens = _local(today + timedelta(days=offset), start)
            closes = opens + timedelta(minutes=length)
            if closes > now:
                return opens, closes
        raise AssertionError("a window of under a day always has an occurrence ahead")

    def when(self, now: datetime) -> dict[str, str | None]:
        """GetStatus's ``activation`` (without the build): the policy, and for a window
        when it opens and closes next (``opens`` is in the past inside the window)."""
        if self.policy != "window":
            return {"policy": self.policy, "opens": None, "closes": None}
        opens, closes = self.next_window(now)
        return {"policy": self.policy, "opens": opens.isoformat(timespec="seconds"),
                "closes": closes.isoformat(timespec="seconds")}


def _local(day: date, minutes: int) -> datetime:
    return datetime(day.year, day.month, day.day, minutes // 60, minutes % 60).astimezone()


def parse_window(text: object) -> tuple[int, int]:
    """``"02:00-04:00"`` → minutes after midnight of its start and end."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string such as \"02:00-04:00\", got {text!r}")
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"expected a window such as \"02:00-04:00\", got {text!r}")
    minutes = []
    for part in parts:
        hh, sep, mm = part.strip().partition(":")
        if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2
                and int(hh) < 24 and int(mm) < 60):
            raise ValueError(f"expected a window such as \"02:00-04:00\" (24-hour local "
                             f"times), got {text!r}")
        minutes.append(int(hh) * 60 + int(mm))
    if minutes[0] == minutes[1]:
        raise ValueError(f"the window {text!r} is empty (start and end are equal)")
    return minutes[0], minutes[1]


def _command(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a command line, got {value!r}")
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot split {value!r} into words: {exc}") from None
    return value


def _commands(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of command lines, got {value!r}")
    return tuple(_command(v) for v in value)


def _optional_command(value: Any) -> str:
    return "" if value == "" else _command(value)


def _attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise ValueError(f"expected an integer from 1 to 10, got {value!r}")
    return value


def _policy(value: Any) -> str:
    if value not in POLICIES:
        raise ValueError(f"expected one of {', '.join(POLICIES)}, got {value!r}")
    return str(value)


def _window(value: Any) -> str:
    if value != "":
        parse_window(value)
    return str(value)


def launch_sections(r: _Reader) -> tuple[HealthSection, HooksSection, ActivateSection]:
    """The three sections, their problems added to ``r``."""
    from patchd.config import parse_duration

    def positive(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"must be longer than 0, got {value!r}")
        return seconds

    health = HealthSection(
        required=r.get("health", "required", _commands, ()),
        wanted=r.get("health", "wanted", _commands, ()),
        timeout=r.get("health", "timeout", positive, 30.0),
        grace=r.get("health", "grace", parse_duration, 0.0),
        ready_timeout=r.get("health", "ready_timeout", positive, 90.0),
        attempts=r.get("health", "attempts", _attempts, 3),
    )
    hooks = HooksSection(timeout=r.get("hooks", "timeout", positive, 60.0),
                         post_install=r.get("hooks", "post_install", _optional_command, ""))
    policy = r.get("activate", "policy", _policy, "next-start")
    window = r.get("activate", "window", _window, "")
    if policy == "window" and not window:
        r.problems.append(("activate.window", "is required with policy = \"window\" "
                                              "(e.g. \"02:00-04:00\")"))
    elif window and policy != "window":
        r.problems.append(("activate.window", f"is only used with policy = \"window\" "
                                              f"(policy is {policy!r})"))
    activate = ActivateSection(policy=policy, window=window,
                               stop_timeout=r.get("activate", "stop_timeout", positive, 30.0))
    return health, hooks, activate


@dataclass(frozen=True)
class LaunchConfig:
    """What ``patchd launch`` needs of the config file, and nothing else."""

    app: str
    release_dir: Path
    socket: Path
    health: HealthSection
    hooks: HooksSection
    activate: ActivateSection
    source: str


def read_launch_config(path: Path) -> LaunchConfig:
    """Read the launcher's keys of a config file; raises ConfigFileError/ConfigErrors.

    The daemon validates the whole file; the launcher checks only what it uses, so it
    needs neither the daemon's other files nor the trust code.
    """
    from patchd.config import _abs_path, _name, _Reader

    text = str(path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(text, None, "no such file") from None
    except OSError as exc:
        raise ConfigFileError(text, None, f"cannot read: {exc.strerror} (patchd launch "
                                          "reads it as the app's user)") from None
    except UnicodeDecodeError:
        raise ConfigFileError(text, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(text, None, f"TOML syntax error: {exc}") from None
    r = _Reader(doc)
    name = r.get("app", "name", _name, "app", required=True)
    release_dir = r.get("app", "release_dir", _abs_path, Path("/"), required=True)
    socket = r.get("paths", "socket", _abs_path, Path(f"/run/patchd/{name}.sock"))
    health, hooks, activate = launch_sections(r)
    if r.problems:
        raise ConfigErrors(text, r.problems)
    return LaunchConfig(name, release_dir, socket, health, hooks, activate, text)
