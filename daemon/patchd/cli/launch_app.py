"""``patchd launch``'s child: the app process, and the notify socket it talks to.

The launcher stays the app's parent rather than ``exec``-ing it, because it must keep
running: it runs the health checks, reports the verdict, falls back and restarts the
app when a build is activated. So the pid it gives BootStart is its own, and the
app's death must be the launcher's death too, in both directions:

- the app exits → the launcher sees it at once (a pidfd) and reports it (BootFailure
  before BootSuccess; its exit status after);
- the launcher dies, even by SIGKILL → the kernel sends the app SIGKILL
  (``PR_SET_PDEATHSIG``, set in the child between fork and exec), and the daemon's
  pidfd on the launcher judges the boot a ``boot_crash``. An app never runs on without
  the launcher that watches it.

The app's ``NOTIFY_SOCKET`` is the launcher's own (:class:`NotifyProxy`): READY=1 and
``PATCHD_IDLE=1`` come to the launcher, and what systemd should hear (STATUS=,
WATCHDOG=1, …) is passed on from the launcher's pid, which is the unit's main pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio

__all__ = ["App", "NotifyProxy", "command_in_tree"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
#: What the app's notify messages may tell systemd through the launcher. READY=1 is the
#: launcher's to send (after the health checks); MAINPID= would name another main pid;
#: descriptors (FDSTORE=) are not carried.
_FORWARDED = frozenset({"STATUS", "WATCHDOG", "WATCHDOG_USEC", "EXTEND_TIMEOUT_USEC",
                        "ERRNO", "BUSERROR", "RELOADING", "STOPPING", "MONOTONIC_USEC"})
_DATAGRAM = 4096


def command_in_tree(command: Sequence[str], tree: Path) -> list[str]:
    """COMMAND with a relative program path (``bin/kiosk``) resolved inside ``tree``;
    an absolute path or a bare name (looked up in PATH) is left as it is."""
    program = command[0]
    if "/" in program and not program.startswith("/"):
        program = str(tree / program)
    return [program, *command[1:]]


class App:
    """The running app: started as a child, watched through a pidfd.

    :meth:`watch` (one task) reaps it; everyone else waits on :meth:`wait`.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._pidfd = os.pidfd_open(proc.pid)
        self.returncode: int | None = None
        self._exited = anyio.Event()

    def __repr__(self) -> str:
        return f"<App pid={self.pid} returncode={self.returncode}>"

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str]) -> App:
        """Fork and exec ``argv``; OSError when it cannot be run."""
        parent = os.getpid()

        def in_child() -> None:
            # Between fork and exec: die with the launcher, even when it is SIGKILLed.
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the launcher died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)

        proc = subprocess.Popen(list(argv), env=dict(env), close_fds=True,
                                preexec_fn=in_child)
        return cls(proc)

    async def watch(self) -> None:
        """Reap the app the moment it exits (its pidfd becomes readable)."""
        try:
            await anyio.wait_readable(self._pidfd)
            self.returncode = self.proc.wait()
        finally:
            if self.returncode is None:  # cancelled: the launcher is going down
                self.signal(signal.SIGKILL)
                self.returncode = self.proc.wait()
            os.close(self._pidfd)
            self._exited.set()

    @property
    def running(self) -> bool:
        return self.returncode is None

    async def wait(self) -> int:
        """The exit status (negative: the signal that killed it), once it exited."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int) -> None:
        """Send ``sig`` unless it was reaped (through the pidfd: never a recycled pid)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
        self.signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            return await self.wait()
        self.signal(signal.SIGKILL)
        return await self.wait()


def _runtime_dir() -> str:
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(name, "").split(":")[0]
        if value and os.path.isdir(value) and len(value) < 60:
            return value
    return tempfile.gettempdir()


class NotifyProxy:
    """The datagram socket the app gets as NOTIFY_SOCKET, in a private 0700 directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="patchd-launch-", dir=_runtime_dir())
        self.path = os.path.join(self.dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        upstream = os.environ.get("NOTIFY_SOCKET", "")
        if upstream.startswith("@"):
            upstream = "\0" + upstream[1:]
        self._upstream = upstream or None

    def __repr__(self) -> str:
        return f"<NotifyProxy {self.path} upstream={self._upstream is not None}>"

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, message: str) -> None:
        """One message to systemd, from our pid; a no-op outside systemd."""
        if self._upstream is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as out, \
                contextlib.suppress(OSError):
            out.sendto(message.encode(), self._upstream)

    async def serve(self, on_assignment: Callable[[str, str], None]) -> None:
        """Hand each ``KEY=value`` line the app sends to ``on_assignment``, forwarding
        the lines systemd should hear."""
        while True:
            await anyio.wait_readable(self._sock)
            try:
                data = self._sock.recv(_DATAGRAM)
            except BlockingIOError:
                continue
            forward = []
            for line in data.decode("utf-8", "replace").split("\n"):
                key, sep, value = line.partition("=")
                if not sep:
                    continue
                on_assignment(key, value)
                if key in _FORWARDED:
                    forward.append(line)
            if forward:
                self.send("\n".join(forward))
