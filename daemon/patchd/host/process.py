"""Facts about other processes (is the host still booting?) and crash failpoints.

A boot breadcrumb records the host's pid *and* its start time (field 22 of
``/proc/PID/stat``), because pids are reused: a pid that runs again but started at
another time is a different process, and the host that booted has gone.

Failpoints let a crash campaign kill patchd at a named instant (``os._exit(86)`` when
the environment variable ``PATCHD_FAILPOINT`` equals the name); in production the
variable is unset and :func:`failpoint` is a comparison against ``None``.
"""

from __future__ import annotations

import os

#: Exit status of a process stopped by a failpoint, so tests can tell it from a bug.
FAILPOINT_EXIT = 86

#: Largest pid Linux can hand out (``PID_MAX_LIMIT`` on 64-bit kernels, 2**22); a bigger
#: number in a request is an error, not a process to watch.
PID_MAX = 4_194_304

# Read once: a failpoint is chosen when the process starts, never changed while it runs.
_ARMED = os.environ.get("PATCHD_FAILPOINT") or None


def failpoint(name: str) -> None:
    """Die at once (no cleanup, no flush) when ``PATCHD_FAILPOINT`` names this point."""
    if _ARMED is not None and name == _ARMED:
        os._exit(FAILPOINT_EXIT)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/PID/stat`` (after the comm field), or None if unreadable.

    The comm field (2) is in parentheses and may itself contain spaces and ``)``, so the
    split happens after the *last* closing parenthesis.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")
    if end < 0:
        return None
    return data[end + 1 :].decode("ascii", "replace").split()


def pid_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (stat field 22), or None if gone."""
    fields = _stat_fields(pid)
    # fields[0] is field 3 (state), so field 22 is fields[19].
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def pid_alive(pid: int, start: int | None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``start`` is given, started then.

    A zombie has exited already (only its parent has not reaped it), so it counts as
    gone: a host that crashed during boot must not be mistaken for one still booting.
    """
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return False
    if fields[0] in ("Z", "X", "x"):
        return False
    if start is None:
        return True
    try:
        return int(fields[19]) == start
    except ValueError:
        return False


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; the (soft, hard) now.

    Every socket client costs a descriptor; the default soft limit (1024) would let a
    flood of idle connections starve the daemon of descriptors for its own files.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard
