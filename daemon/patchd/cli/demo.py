"""``patchd demo``: the whole flow in a temporary directory, without root.

It plays every part with the real programs: the publisher (keygen, pack, publish into
a local directory repository), the daemon (``patchd run`` as a child process, ready
when it says ``READY=1`` on a notify socket), and the app's shell launcher using the
boot protocol. Patch 1 installs and boots; patch 2 crashes at start, is detected by
the daemon watching the launcher's pid, tombstoned, and the next start runs patch 1.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchd.core.errors import DemoFailed

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

    def write_tree(self, tree: Path, version: str, message: str, crash: bool = False) -> None:
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        (tree / "VERSION").write_text(f"{version}\n")
        (tree / "message.txt").write_text(f"{message}\n")
        body = ('echo "  app: starting... and crashing (exit 1)"\nexit 1\n' if crash else
                'echo "  app: $(cat "$here/../message.txt")"\n'
                '$PATCHD boot success --socket "$PATCHD_SOCKET" && '
                'echo "  app: reported BootSuccess"\n')
        app = tree / "bin" / "app"
        app.write_text('#!/bin/sh\nhere=$(dirname "$0")\n' + body)
        app.chmod(0o755)

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

            [log]
            format = "console"
        """))
        launcher = self.root / "launch.sh"
        launcher.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            # The app's launcher: ask patchd what to boot, then become the app.
            export PATCHD={shlex.quote(' '.join(shlex.quote(p) for p in self.py))}
            export PATCHD_SOCKET={shlex.quote(str(self.socket))}
            tree=$($PATCHD boot start --socket "$PATCHD_SOCKET" --pid $$) || exit 1
            echo "  launcher: booting $tree"
            exec "$tree/bin/app"
        """))
        launcher.chmod(0o755)

    def publish_patch(self, number: int, message: str, crash: bool = False) -> None:
        target = self.root / f"build-{number}"
        shutil.copytree(self.release_dir, target, symlinks=True)
        self.write_tree(target, "1.0", message, crash=crash)
        bundle = self.root / f"{APP}-1.0+{number}.patchd"
        self.patchd("pack", "--app", APP, "--release", "1.0", "--patch", str(number),
                    "--base", str(self.release_dir), "--target", str(target),
                    "--key", str(self.key), "-o", str(bundle))
        self.patchd("publish", "--repo", str(self.repo), "--app", APP, "--channel", "stable",
                    "--key", str(self.key), str(bundle))
        what = "crashes at start" if crash else "works"
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
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()

    def check(self) -> None:
        out = self.patchd("check", "--socket", str(self.socket), "--wait")
        for line in out.splitlines():
            if not line.startswith("[") and line != "idle":  # progress lines
                self.say(f"daemon: {line}")

    def launch(self) -> int:
        proc = subprocess.run([str(self.root / "launch.sh")], capture_output=True, text=True,
                              timeout=60)
        for line in (proc.stdout + proc.stderr).splitlines():
            print(line, flush=True)
        return proc.returncode

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out waiting until {what}; status: {status}")
            time.sleep(0.05)

    # --- the story -------------------------------------------------------------------

    def run(self) -> None:
        self.prepare()
        self.publish_patch(1, "hello from patch 1")
        self.start_daemon()
        self.check()
        self.say("host: starting the app through its launcher")
        if self.launch() != 0:
            raise DemoFailed("patch 1 should have booted")
        status = self.status()
        if status["last_booted"] != {"release": "1.0", "patch": 1}:
            raise DemoFailed(f"patch 1 should be last_booted: {status}")
        self.say("daemon: patch 1 booted successfully (last_booted = 1.0+1)")

        self.publish_patch(2, "this never shows", crash=True)
        self.check()
        self.say("host: restarting the app; next boot is 1.0+2")
        code = self.launch()
        self.say(f"host: the app exited with status {code} before reporting success")
        status = self.wait_for("patch 2 is marked bad", lambda s: any(
            b["build"] == {"release": "1.0", "patch": 2} and b["state"] == "bad"
            for b in s["builds"]))
        reason = next(b["reason"] for b in status["builds"] if b["state"] == "bad")
        self.say(f"daemon: crash detected from the pid's exit; 1.0+2 marked bad ({reason}); "
                 f"next boot falls back to {_b(status['next_boot'])}")
        self.say("host: starting the app again")
        if self.launch() != 0:
            raise DemoFailed("the fallback to patch 1 should have booted")
        self.say("daemon: patch 1 is running again; patch 2 will never be retried")
        print()
        print(self.patchd("status", "--socket", str(self.socket)))
        self.check_journal()

    def check_journal(self) -> None:
        """Nothing in this story is an error an operator must act on: a crashing patch
        is handled (warning), so an error-level line means a patchd bug."""
        errors = [line for line in self.log.read_text(errors="replace").splitlines()
                  if line.split(" ", 2)[1:2] in (["[error"], ["[critical"])]
        if errors:
            raise DemoFailed("the daemon logged at error level in a normal flow:\n"
                             + "\n".join(errors[:5]))


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
