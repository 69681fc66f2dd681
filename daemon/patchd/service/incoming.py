"""A bundle handed over as an open file descriptor (``patchd install``, SCM_RIGHTS).

The CLI opens the file as its caller and passes the descriptor, so any file the caller
can read installs, whatever the service's private ``/tmp`` or the daemon user's
permissions. The daemon copies it into a private file in its cache directory before
anything reads it: the caller keeps write access to its own file, and a bundle that
changes between verification and extraction must be impossible. Only a regular file
is accepted (a FIFO, socket or device could block a worker or never end), and only the
bytes its size announced when it arrived are read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from patchd.core.errors import BundleInvalid, DiskFull

__all__ = ["INCOMING_PREFIX", "receive_bundle"]

#: Copies in the cache directory start with this; start-up may remove leftovers.
INCOMING_PREFIX = "incoming-"
_CHUNK = 1 << 20


def receive_bundle(fd: int, directory: Path, min_free: int) -> Path:
    """Copy the regular file open at ``fd`` into a new private file in ``directory``.

    Runs in a worker thread. The caller removes the copy when the install is done.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise BundleInvalid("the file passed to Install is not a regular file")
    size = info.st_size
    fs = os.statvfs(directory)
    free = fs.f_bavail * fs.f_frsize
    if free - size < min_free:
        raise DiskFull(f"{directory}: {free} bytes free; a copy of the {size}-byte bundle "
                       f"would leave less than install.min_free ({min_free})")
    path = directory / f"{INCOMING_PREFIX}{secrets.token_hex(8)}.patchd"
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _copy(fd, out, size)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(out)
    return path


def _copy(src: int, dst: int, size: int) -> None:
    """``size`` bytes from offset 0 of ``src`` (pread: the caller's offset is shared)."""
    done = 0
    while done < size:
        try:
            chunk = os.pread(src, min(_CHUNK, size - done), done)
        except OSError as exc:
            raise BundleInvalid(f"the file passed to Install cannot be read: "
                                f"{exc.strerror}") from None
        if not chunk:
            raise BundleInvalid(f"the file passed to Install shrank while it was read "
                                f"({done} of {size} bytes)")
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left for a copy of the bundle ({size} bytes)") from exc
            raise
        done += len(chunk)
