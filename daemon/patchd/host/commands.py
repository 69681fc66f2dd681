"""Running a hook or a health check: a deadline, its output logged and its tail kept.

Shared by ``patchd launch`` (health checks, ``pre-start``, ``on-fallback``) and the
daemon (``hooks.post_install``). A command runs in its own process group; when it
exits or its deadline passes, whatever it left behind in that group is killed, so a
check cannot outlive its verdict. Output (stdout and stderr together) is handed to
``on_line`` a line at a time, bounded in line length and in total, and its last
bytes are kept for the verdict's message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from patchd.core.text import printable

__all__ = ["Outcome", "run_command"]

#: Bytes of output kept for the verdict (a BootFailure's detail, a log field).
TAIL_BYTES = 2048
#: Bytes of one command's output passed to ``on_line`` before the rest is only counted.
LOG_BYTES = 64 * 1024
_LINE_CHARS = 1024
_SERVICE_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS",
                           "LISTEN_PID", "LISTEN_FDNAMES"})


@dataclass(frozen=True)
class Outcome:
    """How one command ended."""

    #: Exit status; negative: killed by that signal; None: it did not start or timed out.
    status: int | None
    timed_out: bool = False
    #: Why it could not start (``No such file or directory``), else None.
    error: str | None = None
    #: The last bytes of its output, made printable.
    tail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0

    def describe(self) -> str:
        """``exit status 1``, ``timed out after 5 s``, ``killed by signal 9``, …"""
        if self.error is not None:
            return f"cannot run: {self.error}"
        if self.timed_out:
            return f"timed out after {self.seconds:.3g} s"
        assert self.status is not None
        if self.status < 0:
            try:
                name = signal.Signals(-self.status).name
            except ValueError:
                name = str(-self.status)
            return f"killed by {name}"
        return f"exit status {self.status}"


class _Output:
    """Splits output into lines for ``on_line`` and keeps the tail; both bounded."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.tail = bytearray()
        self.partial = bytearray()
        self.logged = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-TAIL_BYTES]
        if self.on_line is None:
            return
        self.partial += data
        while (end := self.partial.find(b"\n")) >= 0:
            self._line(bytes(self.partial[:end]))
            del self.partial[: end + 1]
        if len(self.partial) > _LINE_CHARS:
            self._line(bytes(self.partial))
            self.partial.clear()

    def _line(self, raw: bytes) -> None:
        assert self.on_line is not None
        if self.logged >= LOG_BYTES:
            self.dropped += len(raw) + 1
            return
        self.logged += len(raw) + 1
        self.on_line(printable(raw.decode("utf-8", "replace"), _LINE_CHARS))

    def finish(self) -> str:
        if self.partial:
            self._line(bytes(self.partial))
            self.partial.clear()
        if self.dropped and self.on_line is not None:
            self.on_line(f"[{self.dropped} more bytes of output not logged]")
        return printable(bytes(self.tail).decode("utf-8", "replace").strip(), TAIL_BYTES)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_command(argv: Sequence[str], *, deadline: float, cwd: Path | None = None,
                      env: Mapping[str, str] | None = None,
                      on_line: Callable[[str], None] | None = None) -> Outcome:
    """Run ``argv`` (no shell) with stdin from /dev/null, for at most ``deadline`` s.

    ``env`` is added to this process's environment, less what systemd meant for this
    process alone (the notify socket, the watchdog, socket activation): a hook is never
    the service's main process. Never raises for the command's own failure: that is
    the Outcome.
    """
    started = time.monotonic()
    full = {k: v for k, v in os.environ.items() if k not in _SERVICE_ONLY}
    full.update(env or {})
    output = _Output(on_line)
    try:
        proc = await anyio.open_process(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=cwd, env=full,
            start_new_session=True)
    except OSError as exc:
        return Outcome(None, error=exc.strerror or str(exc))
    status: int | None = None
    try:
        with anyio.move_on_after(deadline):
            async with anyio.create_task_group() as tg:
                async def read() -> None:
                    assert proc.stdout is not None
                    async for chunk in proc.stdout:
                        output.feed(chunk)

                tg.start_soon(read)
                status = await proc.wait()
                # Its own exit ends it: what it left running in its group goes too (and
                # with it the last writer of the pipe, so reading reaches the end).
                _kill_group(proc.pid)
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with anyio.CancelScope(shield=True):
                await proc.wait()
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    seconds = time.monotonic() - started
    tail = output.finish()
    if status is None:
        return Outcome(None, timed_out=True, tail=tail, seconds=seconds)
    return Outcome(status, tail=tail, seconds=seconds)
