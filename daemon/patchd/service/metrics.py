"""The daemon's metrics in the Prometheus text exposition format (docs/operations.md#metrics).

Two sources: the state as ``GetStatus`` reports it (build info, builds and tombstones by
state and reason, the checks' times) and :class:`Metrics`, counters kept in memory
since the daemon started (failures by class, bytes downloaded, installs, boots). The
same text answers ``GetMetrics`` (``patchd metrics APP``) and, when ``[metrics]
textfile`` is set, is kept in that file for node_exporter's textfile collector by
:class:`TextfileWriter`: rewritten atomically when something changed, at most every
``MIN_INTERVAL`` seconds.

Every sample carries ``app``, so the files of several apps on one host never collide
in node_exporter. Label values pass through ``printable`` (bounded, no control
characters) and are then escaped as the format requires (``\\``, ``"``, newline).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from patchd.core.errors import BadInputError, ConfigError, PatchdError, TransientError
from patchd.core.fsio import atomic_file
from patchd.core.model import BadReason, Build
from patchd.core.text import printable

__all__ = ["MIN_INTERVAL", "Metrics", "Snapshot", "TextfileWriter", "escape_label", "render"]

log = structlog.get_logger("patchd.service.metrics")

#: The textfile is rewritten at most this often (seconds); changes in between wait.
MIN_INTERVAL = 5.0
#: Characters of one label value kept (the rest becomes ``…``).
MAX_LABEL = 128
#: Boot failure reasons shown (at 0) before any happened, so ``increase()`` sees the first.
BOOT_FAILURE_REASONS = (BadReason.BOOT_CRASH, BadReason.BOOT_FAILURE, BadReason.BOOT_TIMEOUT)
BUILD_STATES = ("downloading", "downloaded", "installed", "bad")


def failure_kind(exc: BaseException) -> str:
    """The class of failure, as ``check.failed`` logs it: transient, bad_input, config, error."""
    return ("transient" if isinstance(exc, TransientError) else
            "bad_input" if isinstance(exc, BadInputError) else
            "config" if isinstance(exc, ConfigError) else "error")


@dataclass(frozen=True)
class Snapshot:
    """The counters at one moment."""

    started: float
    failures: Mapping[tuple[str, str], int] = field(default_factory=dict)
    download_bytes: int = 0
    events: Mapping[str, int] = field(default_factory=dict)
    boot_failures: Mapping[str, int] = field(default_factory=dict)


class Metrics:
    """Counters since the daemon started; safe to update from worker threads (boot
    reports and installs record events there)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self.started = clock()
        self._failures: Counter[tuple[str, str]] = Counter()
        self._download_bytes = 0
        self._events: Counter[str] = Counter()
        self._boot_failures: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<Metrics {self.snapshot()}>"

    def failure(self, exc: BaseException) -> None:
        """A check, update or install failed (``Checker.record_error``)."""
        with self._lock:
            self._failures[(type(exc).__name__, failure_kind(exc))] += 1

    def event(self, kind: str, build: Build | None, message: str) -> None:
        """An event was queued (``EventQueue.listeners``). A boot failure's message
        starts with its reason (``boot_crash: …``, ``Lifecycle.record_boot_failure``)."""
        with self._lock:
            self._events[kind] += 1
            if kind == "boot_failure":
                reason = message.partition(":")[0]
                known = reason in {r.value for r in BadReason}
                self._boot_failures[reason if known else "other"] += 1

    def counting(self, progress: Callable[[int, int], None],
                 offset: int) -> Callable[[int, int], None]:
        """``progress`` that also counts the bytes that arrived: each rise of ``done``
        above the last value seen (``offset`` at first; a restart from zero resets it)."""
        last = offset

        def report(done: int, total: int) -> None:
            nonlocal last
            if done > last:
                with self._lock:
                    self._download_bytes += done - last
            last = done
            progress(done, total)

        return report

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self.started, dict(self._failures), self._download_bytes,
                            dict(self._events), dict(self._boot_failures))


# --- the exposition format --------------------------------------------------------------


def escape_label(value: object) -> str:
    """A label value as the text format wants it: visible, bounded, ``\\ " \\n`` escaped."""
    text = printable(value, MAX_LABEL)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Text:
    """Families in the order written, each with its HELP, TYPE and samples."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str,
               samples: Iterable[tuple[Mapping[str, object], float]]) -> None:
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            pairs = {"app": self.app, **labels}
            body = ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs.items())
            self.lines.append(f"{name}{{{body}}} {_number(value)}")

    def one(self, name: str, kind: str, text: str, value: float) -> None:
        self.family(name, kind, text, [({}, value)])


def _timestamp(text: object) -> float:
    """Seconds since the epoch of a state file's ``YYYY-MM-DDTHH:MM:SSZ``; 0 for never."""
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _build(obj: object) -> str:
    if not isinstance(obj, dict):
        return ""
    return f"{obj.get('release')}+{obj.get('patch')}"


def render(status: Mapping[str, Any], counts: Snapshot, *, last_attempt: str | None,
           queue_depth: int, queue_dropped: int) -> str:
    """The metrics of one daemon as text exposition format 0.0.4.

    ``status`` is ``GetStatus``'s reply; its ``hold`` (the operator's hold, or None)
    becomes ``patchd_held``.
    """
    out = _Text(str(status.get("app", "")))
    out.family("patchd_build_info", "gauge",
               "The app's builds on this host (value 1): release, next boot, last booted.",
               [({"channel": status.get("channel", ""), "release": status.get("release", ""),
                  "next_boot": _build(status.get("next_boot")),
                  "last_booted": _build(status.get("last_booted")),
                  "currently_booting": _build(status.get("currently_booting"))}, 1)])
    out.one("patchd_held", "gauge", "1 when updates are held on this host, else 0.",
            1 if status.get("hold") else 0)
    out.one("patchd_start_time_seconds", "gauge",
            "When the daemon started (the counters count from here).", counts.started)
    out.one("patchd_last_check_timestamp_seconds", "gauge",
            "When the last check began (0: none since the daemon started).",
            _timestamp(last_attempt))
    out.one("patchd_last_successful_check_timestamp_seconds", "gauge",
            "When the last check that verified the manifest ended (0: none yet).",
            _timestamp(status.get("last_check")))
    out.one("patchd_last_attempt_failed", "gauge",
            "1 while the last check or update failed (status' last error), else 0.",
            1 if status.get("last_error") else 0)
    out.family("patchd_update_failures_total", "counter",
               "Failed checks, updates and installs, by error class and kind.",
               [({"class": cls, "kind": kind}, n)
                for (cls, kind), n in sorted(counts.failures.items())])
    out.one("patchd_download_bytes_total", "counter",
            "Bundle bytes received from the repository.", counts.download_bytes)
    for kind, name, text in (("download", "downloads", "Bundles downloaded and verified."),
                             ("install", "installs", "Builds installed."),
                             ("install_failure", "install_failures",
                              "Installs refused for a bad bundle."),
                             ("boot_success", "boot_successes", "Boots reported successful.")):
        out.one(f"patchd_{name}_total", "counter", text, counts.events.get(kind, 0))
    failures = {r.value: 0 for r in BOOT_FAILURE_REASONS} | dict(counts.boot_failures)
    out.family("patchd_boot_failures_total", "counter",
               "Boots that failed, by reason (boot_crash, boot_failure, boot_timeout).",
               [({"reason": r}, n) for r, n in sorted(failures.items())])
    builds = [b for b in status.get("builds", ()) if isinstance(b, dict)]
    tombs = Counter(str(b.get("reason")) for b in builds if b.get("state") == "bad")
    out.family("patchd_tombstones", "gauge",
               "Builds marked bad on this host (never installed again), by reason.",
               [({"reason": r.value}, tombs.get(r.value, 0)) for r in BadReason])
    states = Counter(str(b.get("state")) for b in builds)
    out.family("patchd_builds", "gauge", "Builds patchd keeps on this host, by state.",
               [({"state": s}, states.get(s, 0)) for s in BUILD_STATES])
    out.one("patchd_event_queue_depth", "gauge", "Events waiting to be sent.", queue_depth)
    out.one("patchd_event_queue_dropped_total", "counter",
            "Events dropped because the queue was full (kept across restarts).", queue_dropped)
    return "\n".join(out.lines) + "\n"


# --- the textfile -----------------------------------------------------------------------


def write_textfile(path: Path, text: str) -> None:
    """Replace the file atomically (node_exporter never reads half of it), mode 0644."""
    with atomic_file(path, 0o644) as f:
        f.write(text.encode())


class TextfileWriter:
    """Keeps ``[metrics] textfile`` current: rewritten after each change, at most every
    ``min_interval`` seconds; nothing when the key is empty. Call :meth:`changed` from
    the event loop."""

    def __init__(self, path: Callable[[], str], render: Callable[[], str],
                 min_interval: float = MIN_INTERVAL) -> None:
        self._path = path
        self._render = render
        self.min_interval = min_interval
        self._changed = anyio.Event()
        self._last_problem: str | None = None

    def __repr__(self) -> str:
        return f"<TextfileWriter {self._path() or 'off'}>"

    def changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        """Write at once, then after every change (the daemon supervises this task)."""
        self.changed()
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            path = self._path()
            if path:
                await self._write(Path(path), self._render())
            await anyio.sleep(self.min_interval)

    async def _write(self, path: Path, text: str) -> None:
        try:
            await anyio.to_thread.run_sync(write_textfile, path, text)
        except (OSError, PatchdError) as exc:
            problem = printable(getattr(exc, "strerror", None) or exc)
            if problem != self._last_problem:  # once per cause, not every few seconds
                log.warning("metrics.write_failed", path=str(path), error=problem)
            self._last_problem = problem
            return
        if self._last_problem is not None:
            log.info("metrics.written", path=str(path))
        self._last_problem = None
