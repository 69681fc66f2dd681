"""journald's native protocol: one datagram of ``KEY=value`` fields per log entry.

Structured fields (``PATCHD_EVENT``, ``PATCHD_RELEASE`` …) are what let an operator run
``journalctl -u patchd@kiosk PATCHD_EVENT=boot_crash``; stderr lines would lose them.
Values with a newline use the binary-safe form (name, newline, 64-bit little-endian
length, bytes, newline); entries too large for one datagram travel in a sealed memfd,
as systemd's own client does.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any

DEFAULT_SOCKET = "/run/systemd/journal/socket"

PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
              "exception": 3}

_FIELD_BAD_CHARS = re.compile(r"[^A-Z0-9_]")
# Keys structlog or we add that are not event fields.
_INTERNAL_KEYS = {"event", "level", "timestamp", "logger", "exc_info", "stack_info"}


def field_name(key: str) -> str:
    """``release`` → ``PATCHD_RELEASE``; journald allows only A–Z, 0–9 and ``_``."""
    name = _FIELD_BAD_CHARS.sub("_", key.upper()).lstrip("_")
    return f"PATCHD_{name}"[:64]


def encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """Serialise fields in journald's native format."""
    out = bytearray()
    for key, value in fields.items():
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        name = key.encode("ascii")
        if b"\n" in raw:
            out += name + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += name + b"=" + raw + b"\n"
    return bytes(out)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, bytes) else str(value)


def entry_fields(event_dict: Mapping[str, Any], identifier: str = "patchd") -> dict[str, str]:
    """Map a structlog event dict to journal fields."""
    event = _text(event_dict.get("event", ""))
    level = str(event_dict.get("level", "info")).lower()
    extras = {k: v for k, v in event_dict.items() if k not in _INTERNAL_KEYS}
    message = event + "".join(f" {k}={_text(v)}" for k, v in extras.items())
    fields: dict[str, str] = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": identifier,
        "PATCHD_EVENT": event,
    }
    if event_dict.get("exception"):
        fields["PATCHD_EXCEPTION"] = _text(event_dict["exception"])
    for key, value in extras.items():
        if key != "exception":
            fields[field_name(key)] = _text(value)
    return fields


class JournalWriter:
    """Sends encoded entries to journald; never raises into the caller's code path."""

    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @staticmethod
    def available(path: str = DEFAULT_SOCKET) -> bool:
        """True when something listens on the journal socket (it is a socket file)."""
        import stat

        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            return False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno in (errno.EMSGSIZE, errno.ENOBUFS):
                self._send_memfd(data)
            # Anything else (journald restarting) drops this entry: logging must not
            # take the daemon down.

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("patchd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            import fcntl

            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = array.array("i", [fd])
            with contextlib.suppress(OSError):
                self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()


class JournalLogger:
    """The structlog logger at the end of the chain: receives encoded bytes and sends them."""

    def __init__(self, writer: JournalWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.send(message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class JournalRenderer:
    """structlog processor turning the event dict into a native journal datagram."""

    def __init__(self, identifier: str = "patchd") -> None:
        self.identifier = identifier

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> bytes:
        event_dict.setdefault("level", method_name)
        return encode_entry(entry_fields(event_dict, self.identifier))


def decode_entry(data: bytes) -> dict[str, bytes]:
    """Parse a native datagram back into fields (used by tests and tools)."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode("ascii")] = value
            pos = newline + 1
        else:
            (length,) = struct.unpack("<Q", data[newline + 1:newline + 9])
            start = newline + 9
            fields[line.decode("ascii")] = data[start:start + length]
            pos = start + length + 1
    return fields
