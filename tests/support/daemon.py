"""A real ``patchd run`` child process with a publisher and a repository around it.

The daemon's readiness and status come from its own sd_notify datagrams on a real
AF_UNIX socket bound here (``NOTIFY_SOCKET``), so tests wait on ``READY=1`` instead of
sleeping; its socket is called with the project's varlink client.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from patchd.publisher.pack import pack
from patchd.publisher.publish import publish, roll_back
from patchd.service.interface import INTERFACE_NAME
from patchd.trust.signing import generate_key, load_private_key
from patchd.varlink import VarlinkClient

APP = "kiosk"


def write_tree(root: Path, files: dict[str, str], version: str | None = None) -> Path:
    """Create a tree of text files (``{"bin/app": "..."}``), plus VERSION if given."""
    root.mkdir(parents=True, exist_ok=True)
    if version is not None:
        (root / "VERSION").write_text(f"{version}\n")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


class Publisher:
    """Keys, trees and a repository directory, driven through patchd's own publisher."""

    def __init__(self, work: Path, repo: Path, app: str = APP, channel: str = "stable") -> None:
        self.work = work
        self.repo = repo
        self.app = app
        self.channel = channel
        self.key_path = work / "publisher.key"
        self.public = generate_key(self.key_path)
        self.key = load_private_key(self.key_path)

    def bundle(self, release: str, patch: int, base: Path | None, target: Path,
               arch: str = "any", key: Any = None, app: str | None = None) -> Path:
        kind = "patch" if patch else "full"
        out = self.work / f"{release}+{patch}-{arch}-{time.monotonic_ns()}.patchd"
        pack(app=app or self.app, release=release, patch=patch, kind=kind, arch=arch,
             base=base if patch else None, target=target, private_keys=[key or self.key],
             out=out)
        return out

    def publish(self, *bundles: Path, rollout: int | None = None,
                expires: timedelta = timedelta(days=30)) -> None:
        publish(self.repo, self.app, self.channel, [self.key], list(bundles), rollout, expires)

    def roll_back(self, release: str, patch: int) -> None:
        roll_back(self.repo, self.app, self.channel, [self.key], release, patch,
                  timedelta(days=30))


class DaemonProcess:
    """One ``patchd run`` child; config in ``work/etc``, socket in a short /tmp dir."""

    #: Every daemon made and not yet closed: tests/conftest.py's clean-journal check
    #: reads what each logged during a test.
    instances: ClassVar[list[DaemonProcess]] = []

    def __init__(self, work: Path, *, manifest_url: str, keys: list[str], release_dir: Path,
                 extra: str = "", app: str = APP, env: dict[str, str] | None = None) -> None:
        DaemonProcess.instances.append(self)
        #: Events a test provokes on purpose at error level (a tombstoned bundle, a
        #: refused manifest); any other error-level line fails the test.
        self.expected_errors: set[str] = set()
        self.closed = False
        self.work = work
        self.app = app
        self.release_dir = release_dir
        self.state_dir = work / "state"
        self.cache_dir = work / "cache"
        self._sockdir = tempfile.mkdtemp(prefix="pd-", dir="/tmp")
        self.socket = Path(self._sockdir) / f"{app}.sock"
        self.notify_path = Path(self._sockdir) / "notify"
        self.config_path = work / "etc" / f"{app}.toml"
        self.log_path = work / "daemon.log"
        self.extra_env = env or {}
        #: A command the daemon runs under (e.g. ``unshare`` for its own mounts).
        self.wrapper: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._notify_cond = threading.Condition()
        self._notify_sock: socket.socket | None = None
        self.write_config(manifest_url, keys, extra)

    def write_config(self, manifest_url: str, keys: list[str], extra: str = "") -> None:
        user = getpass.getuser()
        group = grp.getgrgid(os.getegid()).gr_name
        keys_toml = ", ".join(f'"{k}"' for k in keys)
        text = textwrap.dedent(f"""\
            [app]
            name = "{self.app}"
            release_dir = "{self.release_dir}"

            [server]
            manifest_url = "{manifest_url}"
            poll_interval = "1h"
            timeout = "5s"

            [trust]
            keys = [{keys_toml}]

            [paths]
            state_dir = "{self.state_dir}"
            cache_dir = "{self.cache_dir}"
            socket = "{self.socket}"

            [api]
            socket_group = "{group}"
            admins = ["{user}"]

            [boot]
            reporters = ["{user}"]

            [log]
            format = "json"
            level = "debug"
        """) + textwrap.dedent(extra)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(_merge_sections(text))
        os.replace(tmp, self.config_path)

    # --- process -------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> None:
        if self._notify_sock is None:
            self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify_sock.bind(str(self.notify_path))
            threading.Thread(target=self._collect, daemon=True).start()
        with self._notify_cond:
            self.notifications.clear()
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM",)}
        env.update({"NOTIFY_SOCKET": str(self.notify_path), "PATCHD_FIRST_CHECK_DELAY": "3600"})
        env.update(self.extra_env)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "patchd", "run", "--config",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait_ready:
            self.wait_notify("READY=1", timeout=30)

    def _collect(self) -> None:
        assert self._notify_sock is not None
        while True:
            try:
                data = self._notify_sock.recv(65536)
            except OSError:
                return
            with self._notify_cond:
                self.notifications.append(data.decode())
                self._notify_cond.notify_all()

    def wait_notify(self, line: str, timeout: float = 10, after: int = 0) -> int:
        """Wait for a datagram containing ``line`` (from index ``after``); its index."""
        deadline = time.monotonic() + timeout
        with self._notify_cond:
            while True:
                for i, msg in enumerate(self.notifications[after:], start=after):
                    if line in msg.splitlines():
                        return i
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before "
                                         f"{line!r}:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {line!r} within {timeout}s; got "
                                         f"{self.notifications}\n{self.log()}")
                self._notify_cond.wait(min(left, 0.2))

    def wait_notify_where(self, predicate: Callable[[str], bool], timeout: float = 10) -> str:
        """Wait for a notify assignment (one line of a datagram) satisfying ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._notify_cond:
            while True:
                for msg in self.notifications:
                    for line in msg.split("\n"):
                        if predicate(line):
                            return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such notification within {timeout}s; got "
                                         f"{self.notifications}\n{self.log()}")
                self._notify_cond.wait(min(left, 0.2))

    def stop(self, timeout: float = 10) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.closed = True
        self.kill()
        if self._notify_sock is not None:
            self._notify_sock.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def unexpected_errors(self, since: int = 0) -> list[str]:
        """Error-level log lines (after byte ``since``) whose event is not expected."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical") \
                    and entry.get("event") not in self.expected_errors:
                out.append(line)
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never logged:\n{self.log()}")
            time.sleep(0.02)

    # --- socket --------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 60) -> dict[str, Any]:
        with VarlinkClient(self.socket, timeout=timeout) as client:
            return client.call(f"{INTERFACE_NAME}.{method}", params or {})

    def status(self) -> dict[str, Any]:
        return self.call("GetStatus")

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = 30) -> dict[str, Any]:
        """Poll GetStatus until ``predicate`` holds (status has no push channel but
        WatchActivity, which does not cover lifecycle changes)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {status}\n{self.log()}")
            time.sleep(0.02)

    def check_and_wait(self, timeout: float = 60) -> dict[str, Any]:
        """CheckNow, then wait until the update it started has finished."""
        reply = self.call("CheckNow")
        if reply["strategy"] != "none":
            self.wait_status(lambda s: s["activity"]["phase"] == "idle", "update finished",
                             timeout)
        return reply


def state_of(status: dict[str, Any], release: str, patch: int) -> str | None:
    for info in status["builds"]:
        if info["build"] == {"release": release, "patch": patch}:
            return str(info["state"])
    return None


def _merge_sections(text: str) -> str:
    """Let ``extra`` override keys of the base config: later tables win, merged."""
    import tomllib

    merged: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for block in _split_tables(text):
        name, body = block
        doc = tomllib.loads(body)
        merged.setdefault(name, {}).update(doc)
        current = merged[name]
    del current
    out = []
    for name, table in merged.items():
        out.append(f"[{name}]")
        for key, value in table.items():
            out.append(f"{key} = {_toml(value)}")
        out.append("")
    return "\n".join(out)


def _split_tables(text: str) -> list[tuple[str, str]]:
    blocks: list[tuple[str, str]] = []
    name, lines = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if name:
                blocks.append((name, "\n".join(lines)))
            name, lines = stripped[1:-1], []
        else:
            lines.append(line)
    if name:
        blocks.append((name, "\n".join(lines)))
    return blocks


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
