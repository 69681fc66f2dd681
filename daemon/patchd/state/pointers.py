"""``pointers.json`` and the decisions that need no I/O.

The lifecycle reads the disk, then asks these functions what to do; keeping them pure
lets every case be tested on its own, without a state directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from patchd.core.errors import NoBootInProgress, NotBootTarget
from patchd.core.model import Bad, Build, Downloaded, Installed, State, is_valid_release

__all__ = ["Action", "Decision", "Pointers", "boot_elapsed", "booting_build", "choose_next_boot",
           "decide_download", "protected_builds"]


@dataclass(frozen=True, slots=True)
class Pointers:
    """Contents of ``pointers.json`` (docs/lifecycle.md).

    ``os_release`` is an addition: the ``release_dir/VERSION`` seen at the last start,
    so an OS upgrade of the app is told apart from a full upgrade by patchd (after which
    ``release`` differs from VERSION on purpose).
    """

    release: str
    next_boot: Build
    last_booted: Build | None = None
    currently_booting: Build | None = None
    boot_pid: int | None = None
    boot_pid_start: int | None = None
    boot_started_at: str | None = None
    os_release: str | None = None

    @classmethod
    def initial(cls, release: str) -> Pointers:
        return cls(release=release, next_boot=Build(release, 0), os_release=release)

    def to_json(self) -> dict[str, Any]:
        opt = Build.to_json
        return {
            "release": self.release,
            "next_boot": self.next_boot.to_json(),
            "last_booted": opt(self.last_booted) if self.last_booted else None,
            "currently_booting": opt(self.currently_booting) if self.currently_booting else None,
            "boot_pid": self.boot_pid,
            "boot_pid_start": self.boot_pid_start,
            "boot_started_at": self.boot_started_at,
            "os_release": self.os_release,
        }

    @classmethod
    def from_json(cls, obj: object) -> Pointers:
        """Parse ``pointers.json``; raises ValueError naming what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("pointers must be an object")
        release, os_release = obj.get("release"), obj.get("os_release")
        if not is_valid_release(release):
            raise ValueError(f"bad release {release!r}")
        if os_release is not None and not is_valid_release(os_release):
            raise ValueError(f"bad os_release {os_release!r}")
        pid, start, at = obj.get("boot_pid"), obj.get("boot_pid_start"), obj.get("boot_started_at")
        for key, value in (("boot_pid", pid), ("boot_pid_start", start)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"bad {key} {value!r}")
        if at is not None and not isinstance(at, str):
            raise ValueError(f"bad boot_started_at {at!r}")
        return cls(
            release=release,  # type: ignore[arg-type]
            next_boot=Build.from_json(obj.get("next_boot")),
            last_booted=Build.from_json_opt(obj.get("last_booted")),
            currently_booting=Build.from_json_opt(obj.get("currently_booting")),
            boot_pid=pid, boot_pid_start=start, boot_started_at=at,
            os_release=os_release,
        )

    def without_breadcrumb(self) -> Pointers:
        return replace(self, currently_booting=None, boot_pid=None, boot_pid_start=None,
                       boot_started_at=None)

    def after_boot(self, booted: Build) -> Pointers:
        """``booted`` is last_booted and the breadcrumb goes; a full upgrade that booted
        makes its release the base of patches."""
        return replace(self.without_breadcrumb(), last_booted=booted, release=booted.release)


# --- pure decisions --------------------------------------------------------------------


class Action(Enum):
    """What the downloader should do for a build (see :func:`decide_download`)."""

    FRESH = "fresh"          # start from byte 0 (truncate whatever is there)
    RESUME = "resume"        # Range request from ``offset``
    VERIFY = "verify"        # the partial file is already ``size`` long: hash it, no request
    COMPLETE = "complete"    # downloaded and present: skip the network, go install
    INSTALLED = "installed"  # nothing to do
    BAD = "bad"              # tombstoned: never again


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    offset: int = 0


def decide_download(state: State | None, url: str, sha256: str, size: int,
                    file_size: int | None, tree_present: bool) -> Decision:
    """Pure form of :meth:`Lifecycle.decide_start`; ``file_size`` None means no file.

    The file's size on disk, not a recorded count, is the resume offset (chunked
    responses and crashes between writes make any recorded count stale).
    """
    if isinstance(state, Bad):
        return Decision(Action.BAD) if state.bans(sha256) else Decision(Action.FRESH)
    if isinstance(state, Installed):
        return Decision(Action.INSTALLED) if tree_present else Decision(Action.FRESH)
    if state is None or file_size is None:
        return Decision(Action.FRESH)
    if (state.url, state.sha256, state.size) != (url, sha256, size):
        return Decision(Action.FRESH)
    if isinstance(state, Downloaded):
        return Decision(Action.COMPLETE, size) if file_size == size else Decision(Action.FRESH)
    if file_size > size or file_size == 0:
        return Decision(Action.FRESH)
    if file_size == size:
        return Decision(Action.VERIFY, size)
    return Decision(Action.RESUME, file_size)


def choose_next_boot(pointers: Pointers, bootable: Callable[[Build], bool]) -> Build:
    """docs/lifecycle.md recompute: keep a bootable next_boot, else last_booted, else a base.

    The bases are ``(release, 0)`` (a full upgrade that booted) and, below it, the OS
    release, which is always bootable. Never any other build: a build that was never
    booted here is only ever reached by promotion.
    """
    os_base = Build(pointers.os_release or pointers.release, 0)
    candidates = [pointers.next_boot, pointers.last_booted, Build(pointers.release, 0)]
    for build in candidates:
        if build is not None and bootable(build):
            return build
    return os_base


def protected_builds(pointers: Pointers, os_release: str) -> set[Build]:
    """Builds whose tree must stay: the host may run it, or it is a base."""
    p = pointers
    found = {p.next_boot, Build(p.release, 0), Build(os_release, 0)}
    found.update(b for b in (p.last_booted, p.currently_booting) if b is not None)
    return found


def booting_build(pointers: Pointers, reported: Build | None) -> Build:
    """The build whose boot is in progress, checked against the one the host reports
    (``reported`` None: whichever it is)."""
    current = pointers.currently_booting
    if current is None:
        raise NoBootInProgress("no boot is in progress (call boot start first)")
    if reported is not None and reported != current:
        raise NotBootTarget(current, reported)
    return current


def boot_elapsed(pointers: Pointers, now: datetime) -> float | None:
    """Seconds the recorded boot has been running, or None when none is recorded."""
    if pointers.currently_booting is None or pointers.boot_started_at is None:
        return None
    try:
        started = datetime.strptime(pointers.boot_started_at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return (now - started.replace(tzinfo=UTC)).total_seconds()
