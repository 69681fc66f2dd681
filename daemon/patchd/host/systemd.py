"""Talking to systemd as a ``Type=notify`` service: readiness, status, watchdog, reload.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op, so the daemon code
never asks whether it runs under systemd.
"""

from __future__ import annotations

import os
import time

import sdnotify

from patchd.core.text import printable


class Notifier:
    """sd_notify messages through the sdnotify package."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status: str | None = None

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        """One-line summary; repeated identical lines are not re-sent.

        Escaped: systemd reads each line of a datagram as an assignment, so an
        unescaped newline from outside text (a key id, a URL) could add its own.
        """
        text = printable(text, 400)
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None when off.

    ``WATCHDOG_PID``, when set, must be ours: the variable may be inherited by a child.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None
