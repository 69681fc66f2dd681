"""What the daemon does for systemd, without systemd (issue #16, item 9).

- A start-up error reaches the journal at error priority: on stderr it carries
  journald's ``<3>`` prefix when fd 2 is the journal stream, and only then.
- A config error exits 2, and the unit does not restart on 2 (RestartPreventExitStatus).
- One config change is one reload, whether the file watcher or SIGHUP
  (``systemctl reload``) sees it first.
- An unusable socket group is named first in STATUS=.

The same behaviour under a real systemd is tests/e2e/test_systemd_container.py.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from patchd.config import load_config
from patchd.trust.signing import generate_key
from support.daemon import DaemonProcess, write_tree
from test_systemd_unit import one


def run_with_stderr_in(path: Path, journal_stream: str | None, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with open(path, "wb") as err:
        result = subprocess.run([sys.executable, "-m", "patchd", *args], stderr=err,
                                stdout=subprocess.DEVNULL, env=env, timeout=60)
    assert result.returncode == 2
    return path.read_text()


def test_start_error_on_the_journal_stream_has_error_priority(tmp_path: Path) -> None:
    """fd 2 is the stream JOURNAL_STREAM names: every error line starts with <3>."""
    err = tmp_path / "stderr"
    err.touch()
    st = err.stat()
    config = tmp_path / "bad.toml"
    config.write_text("[app]\nname = 'Kiosk'\n[bogus]\n")
    text = run_with_stderr_in(err, f"{st.st_dev}:{st.st_ino}", "run", "--config", str(config))
    lines = text.splitlines()
    assert len(lines) >= 2, text
    assert all(line.startswith("<3>patchd: ") for line in lines), text


def test_start_error_elsewhere_has_no_prefix(tmp_path: Path) -> None:
    """A terminal, a file, or an inherited JOURNAL_STREAM naming another stream: no <3>."""
    err = tmp_path / "stderr"
    missing = str(tmp_path / "missing.toml")
    for stream in (None, "1:2"):
        text = run_with_stderr_in(err, stream, "run", "--config", missing)
        assert text.startswith("patchd: ") and "<3>" not in text, text


def test_usage_error_on_the_journal_stream_has_error_priority(tmp_path: Path) -> None:
    """A wrong ExecStart= (an unknown option) is an error line too."""
    err = tmp_path / "stderr"
    err.touch()
    st = err.stat()
    text = run_with_stderr_in(err, f"{st.st_dev}:{st.st_ino}", "run", "--bogus")
    assert text.startswith("<3>patchd: "), text


def test_config_error_exit_status_is_not_restarted() -> None:
    """The exit status of a config error (2) is the one the unit does not restart on."""
    from patchd.core.errors import ConfigError, SocketInUse, StateLocked

    assert one("RestartPreventExitStatus") == "2"
    assert ConfigError.exit_code == SocketInUse.exit_code == StateLocked.exit_code == 2


# --- one reload per change ----------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    release = write_tree(tmp_path / "opt" / "kiosk", {"bin/kiosk": "#!/bin/sh\n"},
                         version="1.4.0")
    public = generate_key(tmp_path / "publisher.key")
    d = DaemonProcess(tmp_path / "d", manifest_url=str(tmp_path / "repo" / "manifest.json"),
                      keys=[public], release_dir=release)
    # No repository here: the check a reload asks for is refused (RepositoryError).
    d.expected_errors.add("check.failed")
    try:
        d.start()
        # The watcher's own look a second after start (trigger "start", logged at
        # debug): the watch runs from here on, so an edit is seen by it too.
        d.wait_log('"trigger": "start"')
        yield d
    finally:
        d.close()


RELOAD_EVENTS = ("config.reloaded", "config.unchanged", "config.reload_failed",
                 "config.still_invalid")


def events(d: DaemonProcess) -> list[dict[str, Any]]:
    out = []
    for line in d.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def outcomes(d: DaemonProcess, mark: int) -> list[tuple[str, str]]:
    """(event, trigger) of every reload outcome logged after event number ``mark``."""
    return [(e["event"], e.get("trigger", "?")) for e in events(d)[mark:]
            if e.get("event") in RELOAD_EVENTS]


def wait_both_triggers(d: DaemonProcess, mark: int, timeout: float = 10) -> list[str]:
    """Wait until the SIGHUP and the file watcher have each handled the change (or,
    as before the fix, the change was applied twice); the events, in order."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        seen = outcomes(d, mark)
        triggers = {trigger for _event, trigger in seen}
        names = [event for event, _trigger in seen]
        if {"signal", "watch"} <= triggers or names.count("config.reloaded") >= 2 \
                or names.count("config.reload_failed") >= 2:
            return names
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; reload outcomes: {seen}\n{d.log()}")
        time.sleep(0.02)


def edit(d: DaemonProcess, poll_interval: str) -> None:
    text = d.config_path.read_text()
    lines = [f'poll_interval = "{poll_interval}"' if line.startswith("poll_interval")
             else line for line in text.splitlines()]
    tmp = d.config_path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, d.config_path)


def sighup(d: DaemonProcess) -> None:
    """SIGHUP, as ``systemctl reload`` sends it, and wait for RELOADING=1 … READY=1."""
    notes = len(d.notifications)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("READY=1", after=d.wait_notify("RELOADING=1", after=notes))


def test_edit_then_sighup_reloads_once(daemon: DaemonProcess) -> None:
    """`vi` + `systemctl reload` at once: one config.reloaded; the other trigger finds
    the file already read (watcher) or the config unchanged (SIGHUP)."""
    mark = len(events(daemon))
    edit(daemon, "2h")
    sighup(daemon)
    names = wait_both_triggers(daemon, mark)
    assert names.count("config.reloaded") == 1, names
    assert set(names) == {"config.reloaded", "config.unchanged"}, names


def test_watcher_then_sighup_reloads_once(daemon: DaemonProcess) -> None:
    """The watcher reloaded the edit; a later `systemctl reload` changes nothing more."""
    mark = len(events(daemon))
    edit(daemon, "3h")
    daemon.wait_log('"config.reloaded"')
    sighup(daemon)
    names = wait_both_triggers(daemon, mark)
    assert outcomes(daemon, mark)[-1] == ("config.unchanged", "signal")
    assert names.count("config.reloaded") == 1, names


def test_invalid_edit_is_one_error(daemon: DaemonProcess) -> None:
    """An invalid edit plus SIGHUP is one error line; asking again is a warning."""
    daemon.expected_errors.add("config.reload_failed")  # once: asserted below
    mark = len(events(daemon))
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[bogus]\nx = 1\n")
    sighup(daemon)
    wait_both_triggers(daemon, mark)
    sighup(daemon)
    assert outcomes(daemon, mark)[-1] == ("config.still_invalid", "signal")
    errors = [e for e in events(daemon)[mark:] if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["config.reload_failed"], errors
    assert "unknown section" in errors[0]["error"]


# --- STATUS= names an unusable socket group --------------------------------------------


def test_socket_problems_name_a_group_the_socket_did_not_get(tmp_path: Path) -> None:
    """The socket's group is what counts: another group, or a missing one, is named."""
    from patchd.service.daemon import _socket_problems

    sock_path = tmp_path / "kiosk.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    try:
        own = grp.getgrgid(os.stat(sock_path).st_gid).gr_name
        other = next(g.gr_name for g in grp.getgrall() if g.gr_name != own)
        base = tmp_path / "kiosk.toml"
        release = write_tree(tmp_path / "opt", {"bin/k": ""}, version="1.0")
        public = generate_key(tmp_path / "k.key")
        for group, expected in ((own, []),
                                (other, [f"socket group {other} unusable, "
                                         "apps get permission denied"]),
                                ("no-such-group-x", ["socket group no-such-group-x unusable, "
                                                     "apps get permission denied"])):
            base.write_text(f"[app]\nname = 'kiosk'\nrelease_dir = '{release}'\n"
                            f"[server]\nmanifest_url = '{tmp_path}/m.json'\n"
                            f"[trust]\nkeys = ['{public}']\n"
                            f"[paths]\nsocket = '{sock_path}'\n"
                            f"[api]\nsocket_group = '{group}'\n")
            assert _socket_problems(load_config(base)) == expected, group
    finally:
        sock.close()
