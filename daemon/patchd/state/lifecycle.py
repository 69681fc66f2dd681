"""The one owner of ``state.json``, ``pointers.json`` and the ``current`` link (SPEC §3.1–3.3).

Every change to what is on disk about builds goes through a named transition of
:class:`Lifecycle`; async code asks it what to do (``decide_start``) and reports what it
did (``record_*``). Decisions that need no I/O are small pure functions at the top of
the module so they can be tested on their own.

Layout under ``state_dir``::

    .lock                                  flock: one process per state directory
    pointers.json                          Pointers (SPEC §3.3, plus "os_release")
    current -> builds/R/N/tree             next_boot's tree (absolute path for release_dir)
    builds/R/N/state.json                  one build's state (SPEC §3.2)
    builds/R/N/tree/                       its installed tree
    builds/R/N/.staging-tree               the installer's work in progress
    cache_dir/downloads/R-N.patchd         partial or complete download

Crash safety: each write is atomic and durable (``patchd.core.fsio``), and the order of the
writes inside a transition is chosen so that any prefix of them is a state that
:meth:`Lifecycle.open` repairs (start-up sweep, recompute, re-pointing ``current``).
Two bases exist: the OS release ``(os_release, 0)`` whose tree is ``release_dir`` and
which can never be tombstoned (nothing lies below it), and ``(pointers.release, 0)``
which differs only after a full upgrade booted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import structlog

from patchd.core import fsio
from patchd.core.durable import make_dirs
from patchd.core.errors import (
    ConfigError,
    IllegalTransition,
    InstallLoop,
    NoBootInProgress,
    NotBootTarget,
    RollbackRefused,
    StateLocked,
)
from patchd.core.model import (
    Bad,
    BadReason,
    Build,
    Downloaded,
    Downloading,
    Installed,
    State,
    is_valid_release,
    release_key,
    state_from_json,
    utc_now_text,
)
from patchd.host import process
from patchd.host.process import failpoint

log = structlog.get_logger("patchd.state.lifecycle")

#: Install attempts that may start without completing before the build is ``install_loop``.
MAX_INSTALL_ATTEMPTS = 5

STATE_FILE = "state.json"
TREE_DIR = "tree"
STAGING_DIR = ".staging-tree"
#: A build's tree moved aside by a reinstall while a host may still run it.
OLD_TREE_PREFIX = fsio.TEMP_PREFIX + "old-tree-"
POINTERS_FILE = "pointers.json"
CURRENT_LINK = "current"
LOCK_FILE = ".lock"
DOWNLOAD_META_SUFFIX = ".meta"
DOWNLOAD_SUFFIX = ".patchd"

#: Every place a state file, the pointers or the link is written; a failpoint fires
#: just before (``SITE.before``) and just after (``SITE.after``) each write.
WRITE_SITES = (
    "release_change.pointers",
    "open.pointers",
    "download_started",
    "download_complete",
    "install_started",
    "install_aborted",
    "install_complete",
    "promote.pointers",
    "current_link",
    "boot_start",
    "boot_success",
    "boot_failure.tombstone",
    "boot_failure.pointers",
    "mark_bad",
    "forget",
    "recompute",
)
FAILPOINTS: tuple[str, ...] = tuple(f"{s}.{w}" for s in WRITE_SITES for w in ("before", "after"))

EventHook = Callable[[str, Build, str], None]
AliveCheck = Callable[[int, int | None], bool]
ValidityCheck = Callable[[Build, Installed, Path], str | None]


# --- errors ----------------------------------------------------------------------------








# --- pointers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pointers:
    """Contents of ``pointers.json`` (SPEC §3.3).

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
        return Decision(Action.BAD)
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
    """SPEC §3.3 recompute: keep a bootable next_boot, else last_booted, else a base.

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


def _is_patch_name(name: str) -> bool:
    return name.isascii() and name.isdigit() and str(int(name)) == name


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


# --- the store -------------------------------------------------------------------------


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run a transition under the store's lock (see ``Lifecycle.lock``)."""

    @functools.wraps(method)
    def wrapper(self: Lifecycle, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(_F, wrapper)


class Lifecycle:
    """State of every build and the boot pointers of one app; see the module docstring.

    Synchronous and quick; one instance per process, guarded by an flock on the state
    directory. Not thread-safe: callers serialise access (one task at a time).
    """

    def __init__(self, state_dir: Path, cache_dir: Path, release_dir: Path, os_release: str,
                 pointers: Pointers, lock_fd: int) -> None:
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.release_dir = release_dir
        self.os_release = os_release
        self._pointers = pointers
        self._lock_fd: int | None = lock_fd
        self.on_event: EventHook | None = None
        #: Transitions run from the event loop and from the installer's worker thread;
        #: each takes this (reentrant) lock so read-modify-write of pointers never races.
        self.lock = threading.RLock()

    # --- opening and closing ---

    @classmethod
    def open(cls, state_dir: Path, cache_dir: Path, release_dir: Path) -> Lifecycle:
        """Lock the state directory, load it and repair whatever a crash left behind."""
        make_dirs(state_dir)
        lock_fd = _take_lock(state_dir)
        try:
            os_release = read_release(release_dir)
            make_dirs(state_dir / "builds")
            make_dirs(cache_dir / "downloads")
            pointers = _load_pointers(state_dir / POINTERS_FILE)
            self = cls(state_dir, cache_dir, release_dir, os_release,
                       pointers or Pointers.initial(os_release), lock_fd)
            self._startup(pointers)
        except BaseException:
            os.close(lock_fd)
            raise
        return self

    def close(self) -> None:
        """Release the lock; the object must not be used afterwards."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Lifecycle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self._pointers
        builds = ", ".join(f"{b}:{s.name}" for b, s in self.builds())
        booting = f" booting={p.currently_booting} pid={p.boot_pid}" if p.currently_booting else ""
        return (f"<Lifecycle {self.state_dir} release={p.release} os_release={self.os_release} "
                f"next_boot={p.next_boot} last_booted={p.last_booted}{booting} [{builds}]>")

    def _startup(self, loaded: Pointers | None) -> None:
        last_seen = (loaded.os_release or loaded.release) if loaded else None
        fresh = loaded is None or last_seen != self.os_release
        if fresh:
            self._release_change(last_seen)
        elif self._pointers.os_release != self.os_release:
            self._write_pointers(replace(self._pointers, os_release=self.os_release),
                                 "open.pointers")
        self._sweep()
        self.recompute_next_boot()
        if not fresh:  # after a reset nothing was being promoted
            self._finish_interrupted_promotion()
        self._sync_current()

    def _finish_interrupted_promotion(self) -> None:
        """Promote an installed build the daemon died before promoting.

        ``record_install_complete`` and ``promote_to_next_boot`` are two writes; a crash
        between them leaves a good, newer installed build that nothing points at (an
        earlier next_boot that never booted is retired by every promotion, and rolled
        back or failed builds are no longer ``Installed``), so it is exactly that case.
        """
        p = self._pointers
        newer = [b for b, s in self.builds()
                 if isinstance(s, Installed) and self._bootable(b)
                 and b.sort_key() > p.next_boot.sort_key()
                 and (b.release == p.release or (b.patch == 0 and b.release != p.release))]
        if newer:
            build = max(newer, key=Build.sort_key)
            log.warning("lifecycle.promotion_resumed", build=str(build))
            self.promote_to_next_boot(build)

    def _release_change(self, last_seen: str | None) -> None:
        """The OS installed another release (or this is the first start): start over.

        Builds of older releases and every cached download go; ``release_dir`` is never
        touched. Builds of the same or newer releases (a full upgrade's tree) are kept:
        they are valid and the strategy may pick them again.
        """
        base = release_key(self.os_release)
        builds_dir = self.state_dir / "builds"
        for entry in _listdir(builds_dir):
            if not is_valid_release(entry) or release_key(entry) < base:
                fsio.remove_tree(builds_dir / entry)
        if last_seen is not None:
            fsio.remove_tree(self.cache_dir / "downloads")
            make_dirs(self.cache_dir / "downloads")
            log.warning("lifecycle.release_changed", old=last_seen, new=self.os_release)
        self._write_pointers(Pointers.initial(self.os_release), "release_change.pointers")

    def _sweep(self) -> None:
        """Remove what an interrupted transition left: temp files, staging trees, trees
        of builds that are not installed, state-less build directories, orphan
        downloads and anything not named like ours under ``builds/`` and ``downloads/``.
        """
        for entry in _listdir(self.state_dir):
            if entry.startswith(fsio.TEMP_PREFIX):
                fsio.remove_tree(self.state_dir / entry)
        builds_dir = self.state_dir / "builds"
        for rel in _listdir(builds_dir):
            rel_dir = builds_dir / rel
            if not is_valid_release(rel) or not rel_dir.is_dir() or rel_dir.is_symlink():
                fsio.remove_tree(rel_dir)
                continue
            for patch in _listdir(rel_dir):
                bdir = rel_dir / patch
                if not _is_patch_name(patch) or not bdir.is_dir() or bdir.is_symlink():
                    fsio.remove_tree(bdir)
                    continue
                self._sweep_build(Build(rel, int(patch)))
            if not _listdir(rel_dir):
                fsio.remove_tree(rel_dir)
        wanted = {path for b, s in self.builds() if isinstance(s, Downloading | Downloaded)
                  for path in self._download_files(b)}
        downloads = self.cache_dir / "downloads"
        for entry in _listdir(downloads):
            if downloads / entry not in wanted:
                log.info("lifecycle.orphan_removed", path=str(downloads / entry))
                fsio.remove_tree(downloads / entry)

    def _sweep_build(self, build: Build) -> None:
        bdir = self._build_dir(build)
        raw = fsio.read_json(bdir / STATE_FILE)
        state = _parse_state(raw, bdir / STATE_FILE)
        keep = {STATE_FILE} if state is not None else set()
        if isinstance(state, Installed | Bad) or build in self._protected():
            keep.add(TREE_DIR)
        for entry in _listdir(bdir):
            if entry not in keep:
                log.info("lifecycle.leftover_removed", path=str(bdir / entry))
                fsio.remove_tree(bdir / entry)
        if not _listdir(bdir):
            fsio.remove_tree(bdir)

    # --- queries ---

    @property
    def release(self) -> str:
        """The last release that booted successfully: the base of patches."""
        return self._pointers.release

    @property
    def pointers(self) -> Pointers:
        return self._pointers

    def state(self, build: Build) -> State | None:
        """The build's state, or None when unknown (never seen, forgotten or corrupt)."""
        path = self._build_dir(build) / STATE_FILE
        return _parse_state(fsio.read_json(path), path)

    def builds(self) -> list[tuple[Build, State]]:
        """Every build with a readable state, oldest first."""
        found: list[tuple[Build, State]] = []
        builds_dir = self.state_dir / "builds"
        for rel in _listdir(builds_dir):
            if not is_valid_release(rel):
                continue
            for patch in _listdir(builds_dir / rel):
                if _is_patch_name(patch):
                    build = Build(rel, int(patch))
                    state = self.state(build)
                    if state is not None:
                        found.append((build, state))
        return sorted(found, key=lambda item: item[0].sort_key())

    def bad_builds(self) -> set[Build]:
        return {b for b, s in self.builds() if isinstance(s, Bad)}

    def tree_path(self, build: Build) -> Path:
        """Where the build's tree is: release_dir for the OS release unless a full
        bundle installed that release under ``builds/R/0/tree``."""
        if build == self._os_base() and not isinstance(self.state(build), Installed):
            return self.release_dir
        return self._build_dir(build) / TREE_DIR

    def download_path(self, build: Build) -> Path:
        return self.cache_dir / "downloads" / f"{build.release}-{build.patch}{DOWNLOAD_SUFFIX}"

    @_locked
    def staging_path(self, build: Build) -> Path:
        """Where the installer builds the tree before renaming it to :meth:`tree_path`.

        Creates ``builds/R/N/`` so the rename stays inside one directory; start-up
        removes any staging tree it finds.
        """
        bdir = self._build_dir(build)
        make_dirs(bdir)  # durable: the tree renamed into it must not vanish with it
        return bdir / STAGING_DIR

    @_locked
    def boot_target(self) -> tuple[Build, Path]:
        """What the host should boot now: next_boot and its tree."""
        build = self._pointers.next_boot
        return build, self.tree_path(build)

    def boot_elapsed(self, now: datetime) -> float | None:
        """Seconds the recorded boot has been running, or None when none is recorded.

        The supervisor's boot timeout counts from here after a restart, so a host
        that hangs across a daemon restart still times out on schedule.
        """
        p = self._pointers
        if p.currently_booting is None or p.boot_started_at is None:
            return None
        started = _parse_time(p.boot_started_at)
        return None if started is None else (now - started).total_seconds()

    # --- download ---

    @_locked
    def decide_start(self, build: Build, url: str, sha256: str, size: int) -> Decision:
        """Before a download: fresh, resume, verify, skip the network, or skip the build.

        A downloading file that is already ``size`` long is verified, never resumed with
        a Range at its end (servers answer 416); a file longer than ``size`` or evicted
        by the OS restarts fresh.
        """
        path = self.download_path(build)
        try:
            file_size: int | None = path.stat().st_size
        except FileNotFoundError:
            file_size = None
        tree = self._build_dir(build) / TREE_DIR
        decision = decide_download(self.state(build), url, sha256, size, file_size,
                                   tree.is_dir())
        log.debug("lifecycle.decided", build=str(build), action=decision.action.value,
                  offset=decision.offset)
        return decision

    @_locked
    def record_download_started(self, build: Build, url: str, sha256: str, size: int) -> None:
        """Remember what is being downloaded before the first byte lands, so a restart
        can resume it; install attempts carry over when the bytes are the same."""
        state = self.state(build)
        if isinstance(state, Bad) or (
                isinstance(state, Installed) and (self._build_dir(build) / TREE_DIR).is_dir()):
            raise IllegalTransition(build, state, "start downloading")
        attempts = 0
        if isinstance(state, Downloading | Downloaded) and state.sha256 == sha256:
            attempts = state.attempts
        self._write_state(build, Downloading(url, sha256, size, attempts), "download_started")
        log.info("lifecycle.download_started", build=str(build), url=url, size=size)

    @_locked
    def record_download_complete(self, build: Build) -> None:
        """The downloader verified the whole file: installs may now skip the network."""
        state = self.state(build)
        if not isinstance(state, Downloading):
            raise IllegalTransition(build, state, "complete a download of")
        if not self.download_path(build).is_file():
            raise IllegalTransition(build, state, "complete a download of", "no file")
        done = Downloaded(state.url, state.sha256, state.size, state.attempts)
        self._write_state(build, done, "download_complete")
        log.info("lifecycle.download_complete", build=str(build), size=state.size)

    # --- install ---

    @_locked
    def record_install_started(self, build: Build) -> None:
        """Count an install attempt before it can crash the daemon (loop guard, §3.2).

        A build that already started ``MAX_INSTALL_ATTEMPTS`` installs without finishing
        is marked bad (``install_loop``) and :class:`InstallLoop` is raised. A build with
        no state (a local bundle) has nothing to count on.
        """
        state = self.state(build)
        if isinstance(state, Bad | Installed):
            raise IllegalTransition(build, state, "install")
        if state is None:
            log.info("lifecycle.install_started", build=str(build), attempts=None)
            return
        if state.attempts >= MAX_INSTALL_ATTEMPTS:
            detail = f"install started {state.attempts} times without completing"
            self.mark_bad(build, BadReason.INSTALL_LOOP, detail)
            raise InstallLoop(f"build {build}: {detail}; marked bad")
        self._write_state(build, replace(state, attempts=state.attempts + 1), "install_started")
        log.info("lifecycle.install_started", build=str(build), attempts=state.attempts + 1)

    @_locked
    def record_install_aborted(self, build: Build) -> None:
        """A transient failure ended the install cleanly: that attempt does not count."""
        state = self.state(build)
        if isinstance(state, Downloading | Downloaded) and state.attempts > 0:
            self._write_state(build, replace(state, attempts=state.attempts - 1),
                              "install_aborted")
        log.info("lifecycle.install_aborted", build=str(build))

    @_locked
    def record_install_complete(self, build: Build, size: int, files: dict[str, str]) -> None:
        """The tree is in place at ``builds/R/N/tree``: the build is installed and its
        download is no longer needed."""
        state = self.state(build)
        if isinstance(state, Bad):
            raise IllegalTransition(build, state, "complete an install of")
        tree = self._build_dir(build) / TREE_DIR
        if not tree.is_dir():
            raise IllegalTransition(build, state, "complete an install of", f"{tree} missing")
        self._write_state(build, Installed(size, dict(files)), "install_complete")
        self._remove_download(build)
        fsio.remove_tree(self._build_dir(build) / STAGING_DIR)
        log.info("lifecycle.installed", build=str(build), size=size, files=len(files))

    @_locked
    def promote_to_next_boot(self, build: Build) -> None:
        """Make an installed build the one the host boots next (``current`` follows).

        The previous next_boot, if it never booted and nothing protects it, is retired:
        it can never be chosen again by a recompute, so its tree is dead weight.
        """
        if not self._bootable(build):
            raise IllegalTransition(build, self.state(build), "promote",
                                    "only an installed, good build can boot")
        old = self._pointers.next_boot
        if old == build:
            self._sync_current()
            return
        self._write_pointers(replace(self._pointers, next_boot=build), "promote.pointers")
        self._sync_current()
        log.info("lifecycle.promoted", build=str(build), previous=str(old))
        if not isinstance(self.state(old), Bad) and old not in self._protected():
            self._forget(old)

    # --- boot protocol ---

    @_locked
    def record_boot_start(self, build: Build | None, pid: int | None,
                          pid_start: int | None) -> tuple[Build, Path]:
        """The host is about to boot: leave a breadcrumb so a crash is noticed.

        A breadcrumb from an earlier boot whose host has gone is a boot crash first.
        ``build`` None means next_boot, taken atomically with the breadcrumb, so a shell
        launcher never boots one tree and reports another.
        """
        self.detect_boot_crash()
        target = self._pointers.next_boot
        if build is not None and build != target:
            raise NotBootTarget(target, build)
        if pid is not None and pid_start is None:
            pid_start = process.pid_start_time(pid)
        p = replace(self._pointers, currently_booting=target, boot_pid=pid,
                    boot_pid_start=pid_start, boot_started_at=utc_now_text())
        self._write_pointers(p, "boot_start")
        log.info("lifecycle.boot_started", build=str(target), pid=pid)
        return target, self.tree_path(target)

    def _booting(self, build: Build | None) -> Build:
        current = self._pointers.currently_booting
        if current is None:
            raise NoBootInProgress("no boot is in progress (call boot start first)")
        if build is not None and build != current:
            raise NotBootTarget(current, build)
        return current

    @_locked
    def record_boot_success(self, build: Build | None) -> Build:
        """The host booted: it becomes last_booted and older builds are cleaned up.

        A full upgrade that booted makes its release the base of patches. Older builds
        go (never next_boot or the base, and tombstones keep their state.json); files of
        bad builds that were protected while the host might run them go now. Newer
        downloads are kept.
        """
        booted = self._booting(build)
        previous = self._pointers.last_booted
        p = replace(self._pointers.without_breadcrumb(), last_booted=booted)
        if booted.release != p.release:
            p = replace(p, release=booted.release)
        self._write_pointers(p, "boot_success")
        log.info("lifecycle.boot_success", build=str(booted), previous=str(previous))
        self._emit("boot_success", booted, "booted successfully")
        for other, state in self.builds():
            if other == booted or other in self._protected():
                continue
            if isinstance(state, Bad) or other.sort_key() < booted.sort_key():
                self.cleanup(other)
        self._sweep_unprotected_trees()
        return booted

    @_locked
    def record_boot_failure(self, build: Build | None, reason: BadReason, detail: str) -> Build:
        """The host failed to boot: tombstone first, then clear the breadcrumb, then
        recompute — a crash between the two writes still leaves the build bad.

        The failed tree stays until another build boots (the host may still run it).
        """
        failed = self._booting(build)
        self._tombstone(failed, reason, detail, "boot_failure.tombstone")
        self._write_pointers(self._pointers.without_breadcrumb(), "boot_failure.pointers")
        self.recompute_next_boot()
        self._emit("boot_failure", failed, f"{reason.value}: {detail}")
        self._remove_files(failed, keep_tree=True)
        return failed

    @_locked
    def detect_boot_crash(self, is_alive: AliveCheck = process.pid_alive) -> Build | None:
        """A breadcrumb whose host is gone (or was never named) is a boot crash.

        Returns the build marked bad, or None when no boot is recorded or its host still
        runs (the caller then watches the pid).
        """
        p = self._pointers
        if p.currently_booting is None:
            return None
        if p.boot_pid is not None and is_alive(p.boot_pid, p.boot_pid_start):
            return None
        detail = (f"host pid {p.boot_pid} exited before reporting success"
                  if p.boot_pid is not None else "boot started without a pid and never finished")
        log.warning("boot.crash_detected", build=str(p.currently_booting), pid=p.boot_pid)
        return self.record_boot_failure(None, BadReason.BOOT_CRASH, detail)

    # --- validation, recompute, bad builds ---

    @_locked
    def validate_next_boot(self, check: ValidityCheck) -> None:
        """Strict mode: re-check next_boot's tree before a boot; a problem marks it bad
        (``validation_failed``) and the fallback is checked in turn."""
        while True:
            build = self._pointers.next_boot
            if build == self._os_base() and not isinstance(self.state(build), Installed):
                return
            state = self.state(build)
            if not isinstance(state, Installed):
                problem: str | None = f"next_boot is {state.name if state else 'unknown'}"
            else:
                problem = check(build, state, self.tree_path(build))
            if problem is None:
                return
            self.mark_bad(build, BadReason.VALIDATION_FAILED, problem)

    @_locked
    def recompute_next_boot(self) -> Build:
        """Keep a valid next_boot; else last_booted if installed and good; else a base."""
        chosen = choose_next_boot(self._pointers, self._bootable)
        if chosen != self._pointers.next_boot:
            old = self._pointers.next_boot
            self._write_pointers(replace(self._pointers, next_boot=chosen), "recompute")
            log.info("lifecycle.next_boot_recomputed", build=str(chosen), previous=str(old))
        self._sync_current()
        return chosen

    @_locked
    def mark_bad(self, build: Build, reason: BadReason, detail: str) -> None:
        """Tombstone a build so it is never downloaded, installed or booted again, then
        drop its files (except a tree the host may be running).

        An existing tombstone keeps its first reason: that is the cause worth keeping.
        The OS release itself cannot be tombstoned (nothing lies below it); that is
        logged and ignored.
        """
        self._tombstone(build, reason, detail, "mark_bad")
        self.recompute_next_boot()
        self._remove_files(build, keep_tree=build in self._protected())

    @_locked
    def cleanup(self, build: Build) -> None:
        """State-aware retirement: a bad build keeps only its tombstone, any other build
        is forgotten entirely — but a tree the host may run (last_booted,
        currently_booting, next_boot, or a bad build's tree kept when it failed) stays
        until another build has booted (:meth:`record_boot_success` sweeps it)."""
        if not isinstance(self.state(build), Bad):
            self._forget(build)
        else:  # a tombstone's tree, if any, was kept for a host: it goes at the next boot
            self._remove_files(build, keep_tree=True)

    @_locked
    def forget_rolled_back(self, build: Build) -> None:
        """Server rollback: forget the build so a later roll-forward installs again, but
        never lift a local tombstone."""
        log.info("lifecycle.rolled_back", build=str(build))
        was_next = build == self._pointers.next_boot
        self.cleanup(build)
        self.recompute_next_boot()
        if was_next:
            self._emit("rollback", build, "rolled back by the server")

    @_locked
    def manual_rollback(self) -> Build:
        """Operator rollback: next_boot is marked bad (``manual``); returns the new one."""
        build = self._pointers.next_boot
        if build in (self._os_base(), Build(self._pointers.release, 0)):
            raise RollbackRefused(f"next_boot is {build}, the release itself; "
                                  "there is nothing older to roll back to")
        self.mark_bad(build, BadReason.MANUAL, "rolled back by an operator")
        self._emit("rollback", build, "rolled back by an operator")
        return self._pointers.next_boot

    # --- internals ---

    def _build_dir(self, build: Build) -> Path:
        return self.state_dir / "builds" / build.release / str(build.patch)

    def _os_base(self) -> Build:
        return Build(self.os_release, 0)

    def _protected(self) -> set[Build]:
        """Builds whose tree must stay: the host may run it, or it is a base."""
        p = self._pointers
        found = {p.next_boot, Build(p.release, 0), self._os_base()}
        found.update(b for b in (p.last_booted, p.currently_booting) if b is not None)
        return found

    def _bootable(self, build: Build) -> bool:
        state = self.state(build)
        if isinstance(state, Bad):
            return False
        if isinstance(state, Installed):
            return (self._build_dir(build) / TREE_DIR).is_dir()
        return build == self._os_base()

    def _tombstone(self, build: Build, reason: BadReason, detail: str, site: str) -> None:
        state = self.state(build)
        if isinstance(state, Bad):
            log.info("lifecycle.already_bad", build=str(build), reason=state.reason.value,
                     new_reason=reason.value)
            return
        if build == self._os_base() and not isinstance(state, Installed):
            log.warning("lifecycle.base_not_marked", build=str(build), reason=reason.value,
                      detail=detail)
            return
        self._write_state(build, Bad(reason, detail, utc_now_text()), site)
        log.warning(reason.value, build=str(build), detail=detail)

    def _forget(self, build: Build) -> None:
        """Drop the state, recompute if it was next_boot, then the unprotected files."""
        path = self._build_dir(build) / STATE_FILE
        if path.exists():
            failpoint("forget.before")
            path.unlink()
            fsio.fsync_dir(path.parent)
            failpoint("forget.after")
        if build == self._pointers.next_boot:
            self.recompute_next_boot()
        keep = build in self._protected()
        self._remove_files(build, keep_tree=keep)
        if not keep:
            fsio.remove_tree(self._build_dir(build))
            self._remove_empty_release(build.release)
        log.info("lifecycle.forgotten", build=str(build), tree_kept=keep)

    def _download_files(self, build: Build) -> tuple[Path, Path]:
        """The download and the origin's validators the downloader keeps beside it (for
        If-Range); they live and go together."""
        path = self.download_path(build)
        return path, path.with_name(path.name + DOWNLOAD_META_SUFFIX)

    def _remove_download(self, build: Build) -> None:
        """Both files: the meta outlives the download when a crash came between the
        downloader's last two steps."""
        for path in self._download_files(build):
            fsio.remove_tree(path)

    def _remove_files(self, build: Build, *, keep_tree: bool) -> None:
        self._remove_download(build)
        bdir = self._build_dir(build)
        for entry in _listdir(bdir):
            if entry == STATE_FILE or (keep_tree and entry == TREE_DIR):
                continue
            fsio.remove_tree(bdir / entry)

    def _sweep_unprotected_trees(self) -> None:
        """After a boot, trees kept only because a host might run them can go: those of
        builds no longer protected that are not installed (forgotten, bad, or being
        downloaded again after a rollback), and old trees a reinstall moved aside (the
        host has just booted the tree that replaced them)."""
        builds_dir = self.state_dir / "builds"
        protected = self._protected()
        for rel in _listdir(builds_dir):
            for patch in _listdir(builds_dir / rel):
                if not _is_patch_name(patch) or not is_valid_release(rel):
                    continue
                for entry in _listdir(builds_dir / rel / patch):
                    if entry.startswith(OLD_TREE_PREFIX):
                        fsio.remove_tree(builds_dir / rel / patch / entry)
                build = Build(rel, int(patch))
                state = self.state(build)
                if build in protected or isinstance(state, Installed):
                    continue
                if state is None:
                    fsio.remove_tree(builds_dir / rel / patch)
                else:
                    fsio.remove_tree(builds_dir / rel / patch / TREE_DIR)
            self._remove_empty_release(rel)

    def _remove_empty_release(self, release: str) -> None:
        rel_dir = self.state_dir / "builds" / release
        if rel_dir.is_dir() and not _listdir(rel_dir):
            with contextlib.suppress(OSError):
                rel_dir.rmdir()

    def _emit(self, kind: str, build: Build, message: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, build, message)
        except Exception:  # the hook must never break a transition already on disk
            log.exception("lifecycle.event_hook_failed", type=kind, build=str(build))

    def _write_state(self, build: Build, state: State, site: str) -> None:
        path = self._build_dir(build) / STATE_FILE
        make_dirs(path.parent)  # a state file is durable only if its directory is
        failpoint(f"{site}.before")
        fsio.atomic_write_json(path, state.to_json())
        failpoint(f"{site}.after")

    def _write_pointers(self, pointers: Pointers, site: str) -> None:
        failpoint(f"{site}.before")
        fsio.atomic_write_json(self.state_dir / POINTERS_FILE, pointers.to_json())
        self._pointers = pointers
        failpoint(f"{site}.after")

    def _sync_current(self) -> None:
        """Point ``current`` at next_boot's tree if it does not already."""
        build = self._pointers.next_boot
        tree = self.tree_path(build)
        target = str(tree) if tree == self.release_dir else os.path.relpath(tree, self.state_dir)
        link = self.state_dir / CURRENT_LINK
        try:
            if os.readlink(link) == target:
                return
        except OSError:
            pass
        if link.is_dir() and not link.is_symlink():
            fsio.remove_tree(link)
        failpoint("current_link.before")
        fsio.replace_symlink(link, target)
        failpoint("current_link.after")


# --- helpers ---------------------------------------------------------------------------


def read_release(release_dir: Path) -> str:
    """First line of ``release_dir/VERSION``: the release the OS installed."""
    path = release_dir / "VERSION"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the release version ({exc.strerror}); "
                          "check app.release_dir") from exc
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if not first:
        raise ConfigError(f"{path}: empty; its first line must name the release")
    if not is_valid_release(first):
        raise ConfigError(f"{path}: {first[:64]!r} is not a valid release name")
    return first


def _take_lock(state_dir: Path) -> int:
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLocked(f"another patchd process holds {path}: the state directory "
                          f"{state_dir} is in use (stop the other daemon first)") from None
    return fd


def _load_pointers(path: Path) -> Pointers | None:
    raw = fsio.read_json(path)
    if raw is None:
        return None
    try:
        return Pointers.from_json(raw)
    except ValueError as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc))
        return None


def _parse_state(raw: object, path: Path) -> State | None:
    if raw is None:
        return None
    try:
        return state_from_json(raw)
    except ValueError as exc:
        log.warning("state.corrupt", path=str(path), error=str(exc))
        return None


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
