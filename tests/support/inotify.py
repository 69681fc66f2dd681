"""Counting the opens of files in one directory with inotify: an outside view, through
the kernel, of how often a process reads a tree's bytes (no cooperation of the daemon).

``IN_OPEN`` is reported for every open of a file in the watched directory; a stat, a
directory fd or a rename is not an open of the file. ctypes, because the standard
library has no inotify.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections import Counter
from pathlib import Path
from types import TracebackType

IN_OPEN = 0x00000020
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class OpenCounter:
    """``with OpenCounter(directory) as c: ...; c.opens()["name"]``: opens so far."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd = fd
        if libc.inotify_add_watch(fd, os.fsencode(directory), IN_OPEN) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch", str(directory))
        self._counts: Counter[str] = Counter()

    def opens(self) -> Counter[str]:
        """Opens of each file (by name) since the watch began."""
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return Counter(self._counts)
                raise
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                offset += _HEADER.size
                name = data[offset:offset + length].rstrip(b"\0").decode()
                offset += length
                if mask & IN_Q_OVERFLOW:
                    raise AssertionError("inotify queue overflowed: opens were lost")
                if mask & IN_OPEN and not mask & IN_ISDIR and name:
                    self._counts[name] += 1

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> OpenCounter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
