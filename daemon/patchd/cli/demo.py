"""``patchd demo``: the whole flow in a temporary directory, without root.

It plays every part with the real programs: the publisher (keygen, pack, publish into
a local directory repository), the daemon (``patchd run`` as a child process, ready
when it says ``READY=1`` on a notify socket), and the app run by ``patchd launch``
with ``[activate] policy = "immediate"``. Patch 1 installs, the launcher restarts the
app into it and its health check passes; patch 2's required health check fails, so
the launcher reports BootFailure, runs patch 1's ``on-fallback`` hook and starts the
app on patch 1 again.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shlex
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
from pathlib import Path
from typing import Any

from patchd.core.errors import DemoFailed
from patchd.core.text import printable

APP = "demo-app"



class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.py = [sys.executable, "-m", "patchd"]
        self.key = root / "publisher.key"
        self.repo = root / "repo" / "stable"
        self.release_dir = root / "opt" / APP
        self.socket = root / "run" / f"{APP}.sock"
        self.config = root / "etc" / f"{APP}.toml"
        self.log = root / "patchd.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.launcher: subprocess.Popen[str] | None = None
        self.events: list[Any] = []
        self._seen = threading.Condition()
        self.started = time.monotonic()

    # --- narrative -----------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def patchd(self, *args: str) -> str:
        proc = subprocess.run([*self.py, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise DemoFailed(f"patchd {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            self.patchd("status", "--socket", str(self.socket), "--json"))
        return result

    # --- the parts -------------------------------------------------------------------

    def write_tree(self, tree: Path, version: str, message: str,
                   health: str | None = None) -> None:
        """A tree whose app says ``message`` and waits; ``health``: the output of a
        required health check (prefixed ``FAIL:`` to fail)."""
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        (tree / "VERSION").write_text(f"{version}\n")
        (tree / "message.txt").write_text(f"{message}\n")
        _executable(tree / "bin" / "app", (
            '#!/bin/sh\nhere=$(dirname "$0")\necho "  app: $(cat "$here/../message.txt")"\n'
            "trap 'exit 0' TERM\nwhile :; do sleep 1 & wait $!; done\n"))
        if health is not None:
            failing = health.startswith("FAIL:")
            text = health.removeprefix("FAIL:").strip()
            _executable(tree / "patchd" / "health" / "required.d" / "10-http",
                        f"#!/bin/sh\necho {shlex.quote(text)}\nexit {1 if failing else 0}\n")
            _executable(tree / "patchd" / "hooks" / "on-fallback",
                        '#!/bin/sh\necho "undoing the migrations of $PATCHD_FAILED_BUILD"\n')

    def prepare(self) -> None:
        self.say("publisher: generating an Ed25519 signing key")
        public = self.patchd("keygen", "-o", str(self.key))
        self.say(f"publisher: public key {public}")
        self.write_tree(self.release_dir, "1.0", "hello from release 1.0")
        self.say(f"host: release 1.0 of {APP} installed at {self.release_dir}")
        (self.root / "etc").mkdir()
        (self.root / "run").mkdir()
        user = getpass.getuser()
        self.config.write_text(textwrap.dedent(f"""\
            [app]
            name = "{APP}"
            release_dir = "{self.release_dir}"

            [server]
            manifest_url = "{self.repo / 'manifest.json'}"
            poll_interval = "1h"

            [trust]
            keys = ["{public}"]

            [paths]
            state_dir = "{self.root / 'state'}"
            cache_dir = "{self.root / 'cache'}"
            socket = "{self.socket}"

            [api]
            socket_group = "{_group_name()}"
            admins = ["{user}"]

            [boot]
            reporters = ["{user}"]

            [health]
            timeout = "10s"
            grace = "0.5s"

            [activate]
            policy = "immediate"
            stop_timeout = "5s"

            [log]
            format = "console"
        """))

    def publish_patch(self, number: int, message: str, health: str) -> None:
        target = self.root / f"build-{number}"
        shutil.copytree(self.release_dir, target, symlinks=True)
        self.write_tree(target, "1.0", message, health=health)
        bundle = self.root / f"{APP}-1.0+{number}.patchd"
        self.patchd("pack", "--app", APP, "--release", "1.0", "--patch", str(number),
                    "--base", str(self.release_dir), "--target", str(target),
                    "--key", str(self.key), "-o", str(bundle))
        self.patchd("publish", "--repo", str(self.repo), "--app", APP, "--channel", "stable",
                    "--key", str(self.key), str(bundle))
        what = "its health check fails" if health.startswith("FAIL:") else "healthy"
        self.say(f"publisher: packed and published patch {number} ({what})")

    def start_daemon(self) -> None:
        notify_path = self.root / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path),
               "PATCHD_FIRST_CHECK_DELAY": "3600"}
        env.pop("JOURNAL_STREAM", None)
        with open(self.log, "wb") as log:
            self.daemon = subprocess.Popen([*self.py, "run", "--config", str(self.config)],
                                           stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                message = notify.recv(4096).decode()
                if "READY=1" in message.splitlines():
                    break
        except TimeoutError:
            raise DemoFailed(f"the daemon did not become ready; see {self.log}") from None
        finally:
            notify.close()
        self.say(f"daemon: patchd run is ready (pid {self.daemon.pid}, socket {self.socket})")

    def stop_daemon(self) -> None:
        for proc in (self.launcher, self.daemon):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def check(self) -> None:
        """CheckNow; the install goes on in the background, the launcher tells the rest."""
        self.say(f"daemon: {self.patchd('check', '--socket', str(self.socket))}")

    def launch(self) -> None:
        """``patchd launch`` in the background; its log told as the story goes on."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        self.launcher = subprocess.Popen(
            [*self.py, "launch", "--config", str(self.config), "--log-format", "json", APP,
             "--", "bin/app"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=env)
        self.say(f"host: patchd launch {APP} -- bin/app (pid {self.launcher.pid})")
        threading.Thread(target=self._tell, daemon=True).start()

    def _tell(self) -> None:
        assert self.launcher is not None and self.launcher.stderr is not None
        for line in self.launcher.stderr:  # the app's own output goes to our stdout
            try:
                event = json.loads(line)
            except ValueError:
                print(line.rstrip("\n"), flush=True)
                continue
            text = _story(event) if isinstance(event, dict) else None
            if text:
                self.say(f"launcher: {text}")
            with self._seen:
                self.events.append(event)
                self._seen.notify_all()

    def wait_event(self, name: str, build: str, count: int = 1, timeout: float = 20) -> None:
        """Wait until the launcher logged ``name`` for ``build`` ``count`` times."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while sum(1 for e in self.events if isinstance(e, dict) and
                      e.get("event") == name and e.get("build") == build) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.launcher is not None and self.launcher.poll() is not None):
                    raise DemoFailed(f"the launcher never logged {name} for {build}")
                self._seen.wait(min(left, 0.5))

    # --- the story -------------------------------------------------------------------

    def run(self) -> None:
        self.prepare()
        self.start_daemon()
        self.launch()
        self.wait_event("launch.healthy", "1.0+0")

        self.publish_patch(1, "hello from patch 1", health="GET /healthz: 200 OK")
        self.check()
        self.wait_event("launch.healthy", "1.0+1")
        status = self.status()
        if status["last_booted"] != {"release": "1.0", "patch": 1}:
            raise DemoFailed(f"patch 1 should be last_booted: {status}")
        self.say("daemon: patch 1 booted successfully (last_booted = 1.0+1)")

        self.publish_patch(2, "hello from patch 2", health="FAIL: GET /healthz: 503 "
                           "database schema too old")
        self.check()
        self.wait_event("launch.healthy", "1.0+1", count=2)
        status = self.status()
        bad = next((b for b in status["builds"] if b["state"] == "bad"), None)
        if bad is None or bad["build"] != {"release": "1.0", "patch": 2}:
            raise DemoFailed(f"patch 2 should be marked bad: {status}")
        self.say(f"daemon: 1.0+2 marked bad ({bad['reason']}); the app runs "
                 f"{_b(status['last_booted'])} again, and 1.0+2 will never be retried")
        print()
        print(self.patchd("status", "--socket", str(self.socket)))
        print()
        assert self.launcher is not None
        self.launcher.send_signal(signal.SIGTERM)
        code = self.launcher.wait(timeout=20)
        self.say(f"host: stopped the app through its launcher (exit status {code})")
        self.check_journal()

    def check_journal(self) -> None:
        """Nothing in this story is an error an operator must act on: a crashing patch
        is handled (warning), so an error-level line means a patchd bug."""
        errors = [line for line in self.log.read_text(errors="replace").splitlines()
                  if line.split(" ", 2)[1:2] in (["[error"], ["[critical"])]
        if errors:
            raise DemoFailed("the daemon logged at error level in a normal flow:\n"
                             + "\n".join(errors[:5]))


_STORIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "launch.boot_started": lambda e: f"BootStart: booting {e.get('build')}",
    "health.passed": lambda e: f"health check {e.get('check')} passed",
    "health.required_failed": lambda e: (f"health check {e.get('check')} FAILED "
                                         f"({e.get('result')}): {e.get('output')}"),
    "launch.healthy": lambda e: f"{e.get('build')} is healthy: BootSuccess reported",
    "launch.boot_failed": lambda e: (f"BootFailure for {e.get('build')}; stopping the app "
                                     "and falling back"),
    "hook.started": lambda e: f"running the {e.get('hook')} hook",
    "hook.output": lambda e: f"  {e.get('hook')}: {e.get('line')}",
    "launch.activating": lambda e: (f"a new build is installed; restarting the app "
                                    f"(it ran {e.get('running')}; policy immediate)"),
}


def _story(event: dict[str, Any]) -> str | None:
    tell = _STORIES.get(str(event.get("event")))
    return printable(tell(event)) if tell is not None else None


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _b(build: dict[str, Any]) -> str:
    return f"{build['release']}+{build['patch']}"


def _group_name() -> str:
    import grp

    return grp.getgrgid(os.getegid()).gr_name


def demo_command(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="patchd-demo-", dir="/tmp"))
    demo = Demo(root)
    ok = False
    try:
        demo.run()
        ok = True
    finally:
        demo.stop_daemon()
        if not ok and demo.log.exists():
            sys.stderr.write("--- daemon log (last 30 lines) ---\n")
            sys.stderr.write("".join(demo.log.read_text().splitlines(True)[-30:]))
        if args.keep or not ok:
            print(f"(files kept in {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    demo.say(f"demo finished in {time.monotonic() - demo.started:.1f}s")
    return 0
