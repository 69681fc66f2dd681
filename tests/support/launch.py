"""``patchd launch`` against a real daemon: a release whose app reports what it does,
patches of it, and the launcher as a real child process.

The app (``bin/app`` in every tree) sends one datagram per event to a socket bound
here (``APP_REPORT``): ``started``, each signal it gets, ``exiting``. Tests wait on
those datagrams and on the launcher's log lines (its stderr), never on a sleep.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.daemon import DaemonProcess, Publisher, write_tree

R = "1.4.0"

#: The app: reports start, signals and exit; SIGTERM exits with $APP_TERM_STATUS (0);
#: with $APP_NOTIFY it sends READY=1 once started (after $APP_READY_DELAY s); with
#: $APP_IDLE_ON_USR2, SIGUSR2 makes it tell the launcher it is idle (PATCHD_IDLE=1).
APP = """\
#!/usr/bin/env python3
import os, signal, socket, sys
out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def report(what):
    msg = f"{os.getpid()} {os.environ.get('PATCHD_BUILD', '-')} {what}"
    out.sendto(msg.encode(), os.environ["APP_REPORT"])
def on(sig, frame):
    report("signal " + signal.Signals(sig).name)
    if sig == signal.SIGUSR2 and os.environ.get("APP_IDLE_ON_USR2"):
        n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        n.sendto(b"PATCHD_IDLE=1", os.environ["NOTIFY_SOCKET"])
    if sig == signal.SIGTERM:
        report("exiting")
        sys.exit(int(os.environ.get("APP_TERM_STATUS", "0")))
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, on)
report("started")
if os.environ.get("APP_NOTIFY"):
    import time
    time.sleep(float(os.environ.get("APP_READY_DELAY", "0")))  # a slow start
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.sendto(b"STATUS=warming up\\nREADY=1", os.environ["NOTIFY_SOCKET"])
    report("ready")
while True:
    signal.pause()
"""


@dataclass
class Event:
    pid: int
    build: str
    what: str
    at: float


class Reports:
    """The app's datagrams, collected by a thread; tests wait for one."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pl-", dir="/tmp")
        self.path = os.path.join(self.dir, "report")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self.events: list[Event] = []
        #: Every datagram as it came (systemd's side of a notify socket).
        self.raw: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                return
            with self._cond:
                self.raw.append(data.decode())
                parts = data.decode().split(" ", 2)
                if len(parts) == 3 and parts[0].isdigit():
                    self.events.append(Event(int(parts[0]), parts[1], parts[2],
                                             time.monotonic()))
                self._cond.notify_all()

    def wait(self, what: str, build: str | None = None, timeout: float = 30,
             after: int = 0) -> tuple[int, Event]:
        """The first event ``what`` (of ``build``) from index ``after``: (index, event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, e in enumerate(self.events[after:], start=after):
                    if e.what == what and build in (None, e.build):
                        return i, e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what!r} of {build} within {timeout}s: "
                                         f"{self.events}")
                self._cond.wait(min(left, 0.5))

    def wait_raw(self, text: str, timeout: float = 30) -> None:
        """Wait for a datagram that is exactly ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in self.raw:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no datagram {text!r} within {timeout}s: {self.raw}")
                self._cond.wait(min(left, 0.5))

    def of(self, what: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.what == what]

    def close(self) -> None:
        self._sock.close()


class Launcher:
    """``python -m patchd launch`` as a child; its stderr collected line by line."""

    def __init__(self, daemon: DaemonProcess, reports: Reports, *options: str,
                 env: dict[str, str] | None = None, command: tuple[str, ...] = ("bin/app",)
                 ) -> None:
        full = {k: v for k, v in os.environ.items()
                if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        full.update({"APP_REPORT": reports.path, "TZ": "UTC"})
        full.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchd", "launch", "--config", str(daemon.config_path),
             *options, daemon.app, "--", *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=full, text=True)
        self.lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """How many lines were logged so far (for ``wait_log(after=...)``)."""
        with self._cond:
            return len(self.lines)

    def wait_log(self, needle: str, timeout: float = 30,
                 where: Callable[[str], bool] = lambda line: True, after: int = 0) -> str:
        """The first line from index ``after`` containing ``needle`` (and ``where``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if needle in line and where(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"launcher never logged {needle!r} "
                                         f"(exit {self.proc.poll()}):\n{self.log()}")
                self._cond.wait(min(left, 0.5))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


class LaunchEnv:
    """A release with ``bin/app``, its publisher, a daemon, and launchers to start."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.release_dir = write_tree(tmp / "opt" / "kiosk", {"bin/app": APP}, version=R)
        (self.release_dir / "bin" / "app").chmod(0o755)
        repo = tmp / "repo" / "stable"
        repo.mkdir(parents=True)
        self.publisher = Publisher(tmp, repo)
        self.manifest_url = f"file://{repo}/manifest.json"
        self.reports = Reports()
        self.daemons: list[DaemonProcess] = []
        self.launchers: list[Launcher] = []

    def daemon(self, extra: str = "") -> DaemonProcess:
        d = DaemonProcess(self.tmp / f"d{len(self.daemons)}", manifest_url=self.manifest_url,
                          keys=[self.publisher.public], release_dir=self.release_dir,
                          extra=extra)
        self.daemons.append(d)
        d.start()
        return d

    def patch(self, number: int, files: dict[str, str] | None = None,
              executables: dict[str, str] | None = None) -> Path:
        """A signed patch bundle: the release plus ``files`` and ``executables`` (0755)."""
        target = self.tmp / "trees" / f"p{number}-{time.monotonic_ns()}"
        write_tree(target, {"bin/app": APP, **(files or {}), **(executables or {})},
                   version=R)
        for rel in ("bin/app", *(executables or {})):
            (target / rel).chmod(0o755)
        return self.publisher.bundle(R, number, self.release_dir, target)

    def launch(self, d: DaemonProcess, *options: str, env: dict[str, str] | None = None,
               command: tuple[str, ...] = ("bin/app",)) -> Launcher:
        launcher = Launcher(d, self.reports, *options, env=env, command=command)
        self.launchers.append(launcher)
        return launcher

    def error_lines(self) -> list[str]:
        """Error-level lines of every daemon and launcher: a normal flow has none."""
        import json

        found = []
        for d in self.daemons:
            for line in d.log().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                    found.append(line)
        for launcher in self.launchers:
            found += [line for line in launcher.log().splitlines()
                      if "[error" in line or "[critical" in line or "Traceback" in line]
        return found

    def close(self) -> None:
        for i, launcher in enumerate(self.launchers):
            launcher.close()
            print(f"--- launcher {i} (exit {launcher.proc.returncode}):\n{launcher.log()}")
        for d in self.daemons:
            d.close()
        self.reports.close()


@contextmanager
def launch_env(tmp: Path) -> Iterator[LaunchEnv]:
    env = LaunchEnv(tmp)
    try:
        yield env
        for launcher in env.launchers:
            launcher.close()  # its whole log, before it is read
        assert env.error_lines() == []
    finally:
        env.close()


def install(d: DaemonProcess, bundle: Path) -> dict[str, Any]:
    return d.call("Install", {"path": str(bundle)})


def bad_detail(d: DaemonProcess, release: str, patch: int) -> dict[str, Any]:
    """The build's state.json (a tombstone has ``reason`` and ``detail``)."""
    import json

    return dict(json.loads((d.state_dir / "builds" / release / str(patch) / "state.json")
                           .read_text()))


def pid_gone(pid: int) -> bool:
    """Exited (a zombie no one reaped yet counts as gone)."""
    from patchd.host.process import pid_alive

    return not pid_alive(pid, None)

