"""A Debian system booted with systemd as PID 1 in a systemd-nspawn container.

The root file system is made with ``mmdebstrap`` (minbase plus systemd, dbus and
python3, about half a minute) and booted with ``systemd-nspawn -b``. The host need
not run systemd: ``--register=no --keep-unit`` keeps nspawn away from the host's
(absent) system bus. Commands run inside through ``nsenter`` into every namespace of
the container's PID 1, with a clean environment, so what they see is what a shell on
the booted machine sees. Files are written straight into the root directory.

Needs root, ``systemd-nspawn`` (Debian: systemd-container) and ``mmdebstrap``, and a
Debian mirror (``PATCHD_DEBIAN_MIRROR``, default deb.debian.org).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: systemd-nspawn's exit status when the container asked for a reboot.
REBOOT_EXIT = 133


def missing_tools() -> str | None:
    """Why containers cannot run here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    return None


def host_suite() -> str:
    """The host's Debian codename: the .deb built here depends on its python3.X."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return "bookworm"


def build_rootfs(target: Path, log: Path) -> None:
    """Bootstrap a minimal bootable Debian into ``target`` (which must not exist)."""
    mirror = os.environ.get("PATCHD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    command = ["mmdebstrap", "--variant=minbase", f"--include={PACKAGES}", host_suite(),
               str(target), mirror]
    with open(log, "wb") as out:
        # stdin must not be a pipe: mmdebstrap would read a sources.list from it.
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, timeout=600)
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}):\n{tail}")


class Container:
    """One booted container over ``rootfs``; boot, run commands, reboot, stop."""

    def __init__(self, rootfs: Path, console_log: Path, name: str | None = None) -> None:
        self.rootfs = rootfs
        self.console_log = console_log
        # nspawn keeps /run/systemd/nspawn/propagate/NAME on the host while it runs.
        self.name = name or f"patchd-e2e-{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # --- lifecycle ---------------------------------------------------------------------

    def boot(self, timeout: float = 90) -> None:
        """Start the container and wait until systemd says the boot has finished."""
        with open(self.console_log, "ab") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.rootfs), "-b", "--register=no",
                 "--keep-unit", f"--machine={self.name}", "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        self.pid1 = self._wait_for_init(deadline)
        while True:
            # Until PID 1 listens on its private socket, systemctl fails at once; then
            # --wait blocks until the boot has finished.
            result = self.run("systemctl is-system-running --wait", check=False,
                              timeout=max(1, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline or state not in ("", "offline", "initializing",
                                                             "starting"):
                raise AssertionError(f"container did not boot: {state} {result.stderr}\n"
                                     f"{self.console_tail()}")
            time.sleep(0.1)

    def _wait_for_init(self, deadline: float) -> int:
        """nspawn's child that is systemd: the container's PID 1, seen from here."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                     f"{self.console_tail()}")
            for child in _children(self.proc.pid):
                if _comm(child) == "systemd":  # nspawn's child has exec'd the init
                    return child
            if time.monotonic() > deadline:
                raise AssertionError(f"no systemd in the container:\n{self.console_tail()}")
            time.sleep(0.05)

    def reboot(self, timeout: float = 90) -> None:
        """``systemctl reboot`` inside; nspawn exits with 133, and we boot again."""
        self.run("systemctl reboot", check=False)
        code = self.wait_exit(timeout)
        if code != REBOOT_EXIT:
            raise AssertionError(f"reboot: nspawn exited {code}\n{self.console_tail()}")
        self.boot(timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"container did not stop:\n{self.console_tail()}") from None

    def close(self) -> None:
        """Power off (SIGTERM to nspawn is a clean shutdown); kill after a grace time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "".join(text.splitlines(True)[-lines:])

    # --- inside --------------------------------------------------------------------

    def run(self, command: str, *, user: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``sh -c command`` inside the container (as ``user``, else root)."""
        argv = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}",
                "LANG=C.UTF-8", "HOME=/root"]
        if user is not None:
            argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        argv += ["sh", "-c", command]
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container: {command}\nexit {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def out(self, command: str, **kw: Any) -> str:
        return self.run(command, **kw).stdout.strip()

    def path(self, inside: str) -> Path:
        """The host path of a file inside (not under /run or /tmp, which are tmpfs)."""
        return self.rootfs / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        text = self.out(f"systemctl show {shlex.quote(unit)} " +
                        " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_unit(self, unit: str, timeout: float = 60, **want: str) -> dict[str, str]:
        """Wait until the unit's properties have the given values."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, *want)
            if all(props.get(k) == v for k, v in want.items()):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: wanted {want}, have {props}\n"
                                     f"{self.out(f'journalctl -n 30 --no-pager -u {unit}')}")
            time.sleep(0.1)

    def journal(self, cursor: str = "", **fields: str) -> list[dict[str, Any]]:
        """Journal entries after ``cursor`` (all if empty) whose fields have the given
        values. Matching is done here: journalctl 252 with both matches and
        --after-cursor skips the first matching entry after the cursor."""
        args = ["journalctl", "-o", "json", "--no-pager"]
        if cursor:
            args.append(f"--after-cursor={cursor}")
        entries = [json.loads(line) for line in self.out(shlex.join(args)).splitlines()
                   if line.strip()]
        return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]

    def cursor(self) -> str:
        """The journal's current end, for :meth:`journal`."""
        text = self.out("journalctl -o json --no-pager -n 1")
        return str(json.loads(text.splitlines()[-1])["__CURSOR"]) if text else ""

    def errors(self, cursor: str) -> list[str]:
        """MESSAGEs patchd wrote at error priority or worse after ``cursor``."""
        return [str(e.get("MESSAGE", "")) for e in self.journal(cursor, SYSLOG_IDENTIFIER="patchd")
                if int(e.get("PRIORITY", 6)) <= 3]

    @contextmanager
    def expect_errors(self, *expected: str, timeout: float = 10) -> Iterator[None]:
        """patchd's error-priority entries in the block must be exactly ``expected``
        (each a substring of one MESSAGE, in order); none other is allowed."""
        start = self.cursor()
        yield
        deadline = time.monotonic() + timeout
        while True:
            found = self.errors(start)
            if len(found) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ok = len(found) == len(expected) and all(
            want in got for want, got in zip(expected, found, strict=True))
        assert ok, f"patchd errors: expected {list(expected)}, got {found}"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""

