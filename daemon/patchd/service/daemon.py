"""``patchd run``: the daemon of one app, as one anyio task group.

The daemon wires the parts together and owns every task: the socket server, the poll
loop, background jobs (through the job runner), the event sender, the config watcher,
the signal handler, boot watchers (through the boot keeper) and the watchdog.
``READY=1`` is sent only once the state is loaded and the socket listens. Deciding
lives elsewhere (strategy, lifecycle); who may change state is the job runner's
business; this module schedules and reacts.
"""

from __future__ import annotations

import argparse
import grp
import os
import signal
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskGroup

from patchd.config import Config, load_config
from patchd.config.preflight import preflight, raise_errors
from patchd.core.errors import (
    BundleInvalid,
    PatchdError,
    Refused,
    UsageError,
)
from patchd.core.model import Bad, Build, Installed, release_newer
from patchd.fetch.client import HttpClients, TransportSettings
from patchd.fetch.sources import Source, open_source
from patchd.host.logs import configure_logging
from patchd.host.process import raise_fd_limit
from patchd.host.systemd import Notifier, watchdog_interval
from patchd.service.activity import ActivityBoard
from patchd.service.boot import BootKeeper
from patchd.service.checks import Checker
from patchd.service.events import EventQueue, send_pending
from patchd.service.jobs import Job, JobRunner
from patchd.service.metrics import Metrics, TextfileWriter, render
from patchd.service.reload import ConfigReloader, Trigger
from patchd.service.schedule import backoff_delay
from patchd.service.supervise import supervised
from patchd.service.trash import TrashCollector
from patchd.service.updater import Updater
from patchd.state import Lifecycle, load_client_state
from patchd.trust import BundleHeader, Decision, read_header_unverified

__all__ = ["Daemon", "run_command"]

log = structlog.get_logger("patchd.service.daemon")


class Daemon:
    """The running daemon of one app; the socket API sees it through ``api.Operations``."""

    def __init__(self, config_path: Path | None, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = Notifier()
        self.board = ActivityBoard()
        # keep_trash: what start-up repair drops (perhaps a big tree a crash left) is
        # deleted by the collector after READY, not before.
        self.lifecycle = Lifecycle.open(config.paths.state_dir, config.paths.cache_dir,
                                        config.app.release_dir, keep_trash=True)
        #: Trees dropped by transitions are deleted in its worker thread, off the lock.
        self.trash = TrashCollector(self.lifecycle.trash)
        client = load_client_state(self.lifecycle.layout, config.server.channel)
        self.updater: Updater
        self.events = EventQueue(self.lifecycle.layout.events, app=config.app.name,
                                 channel=config.server.channel,
                                 client_id=lambda: self.updater.client.client_id)
        self.lifecycle.on_event = self.events.add
        self.metrics = Metrics()
        self.events.listeners.append(self.metrics.event)
        self.updater = Updater(config, self.lifecycle, client, self.events, self.metrics)
        #: One HTTP client per transport configuration, for the repository and events.
        self.http = HttpClients()
        self.source: Source = self._open_source(config)
        self.runner = JobRunner(self.board, on_job_end=self.wake_events)
        self.boot = BootKeeper(self.lifecycle, lambda: self.config, on_change=self.wake_events)
        self.checks = Checker(self.updater, self.runner, lambda: self.source,
                              lambda: self.config, on_change=self.wake_events,
                              on_error=self._failed)
        self.textfile = TextfileWriter(lambda: self.config.metrics.textfile, self.metrics_text)
        self._wake_sender = anyio.Event()
        self.reloader = (ConfigReloader(config_path, lambda: self.config, self._apply_config,
                                        self.notifier) if config_path else None)
        #: What keeps the host from working as configured though the daemon runs (an
        #: unusable socket group); shown first in STATUS=, so `systemctl status` says it.
        self.problems: list[str] = []
        self.board.listeners.append(lambda a: self._show_status())

    def __repr__(self) -> str:
        return f"<Daemon {self.config.app.name} {self.board.current.summary()}>"

    @staticmethod
    def _transport(config: Config) -> TransportSettings | None:
        """What the repository's client is built from (certificate files' fingerprints
        included); None for a local repository."""
        if not config.server.manifest_url.startswith(("http://", "https://")):
            return None
        return TransportSettings.from_config(config.server)

    def _open_source(self, config: Config) -> Source:
        url = config.server.manifest_url
        #: The transport the source was opened with: a reload compares the certificate
        #: files on disk now with it (a renewal keeps their paths, so the config itself
        #: does not change).
        self._source_transport = self._transport(config)
        client = self.http.get(self._source_transport) if self._source_transport else None
        return open_source(url, timeout=config.server.timeout,
                           max_rate=config.install.max_download_rate,
                           min_rate=config.server.min_rate,
                           document_deadline=config.server.document_deadline, client=client)

    def wake_events(self) -> None:
        """Something queued events (or may have): let the sender look."""
        self._wake_sender.set()
        self.textfile.changed()

    def _failed(self, exc: BaseException) -> None:
        self.metrics.failure(exc)
        self._show_status()

    # --- what the socket API calls -------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GetStatus``: pointers, builds, activity and the last check's outcome."""
        with self.lifecycle.lock:
            p = self.lifecycle.pointers
            builds = [_build_info(b, s) for b, s in self.lifecycle.builds()]
        return {"app": self.config.app.name, "channel": self.config.server.channel,
                "release": p.release, "next_boot": p.next_boot.to_json(),
                "last_booted": _optional(p.last_booted),
                "currently_booting": _optional(p.currently_booting),
                "builds": builds, "activity": self.board.current.to_json(),
                "last_check": self.checks.last_check, "next_check": self.checks.next_check,
                "last_error": self.checks.last_error, "hold": self.hold_info(),
                "activation": self._activation(p)}

    def hold_info(self) -> dict[str, Any] | None:
        hold = self.updater.hold
        return hold.to_json() if hold is not None else None

    def _activation(self, p: Any) -> dict[str, Any] | None:
        """A build that replaces the one running, and when (``[activate]``); None when
        next_boot is what booted last, or a boot is under way."""
        if p.last_booted in (None, p.next_boot) or p.currently_booting is not None:
            return None
        now = datetime.now().astimezone()
        return {"build": p.next_boot.to_json(), **self.config.activate.when(now)}

    def metrics_text(self) -> str:
        """``GetMetrics`` and the textfile: the status and the counters, as Prometheus text."""
        return render(self.status(), self.metrics.snapshot(),
                      last_attempt=self.checks.last_attempt, queue_depth=len(self.events),
                      queue_dropped=self.events.dropped)

    async def check_now(self) -> Decision:
        return await self.checks.check_now()

    async def install(self, path: Path, hold: bool = False) -> Build:
        """``Install``: an operator-supplied bundle, verified like any download.

        The header is read unverified only to learn which build it claims to be; the
        installer then verifies the signature and app/arch before writing anything.
        ``hold``: hold the host on it (else an older build than the host would move to
        by itself is refused).
        """
        async def work(job: Job) -> Build:
            try:
                header = await anyio.to_thread.run_sync(read_header_unverified, path)
            except OSError as exc:
                raise BundleInvalid(f"{path}: {exc.strerror}") from exc
            build, kind = self._local_build(path, header)
            try:
                await self.updater.install_local(path, build, kind, job, hold)
            except Refused:
                raise  # an older build without --hold: the operator is told, nothing failed
            except Exception as exc:
                self.checks.record_error(exc)
                if isinstance(exc, OSError):
                    raise BundleInvalid(f"{path}: {exc.strerror}") from exc
                raise
            return build

        return await self.runner.run("install", work)

    def _local_build(self, path: Path, header: BundleHeader
                     ) -> tuple[Build, Literal["patch", "full"]]:
        """The build a local bundle claims to be, if this host may install it."""
        build = Build(header.release, header.patch)
        with self.lifecycle.lock:
            release = self.lifecycle.release
            state = self.lifecycle.state(build)
        if header.kind == "patch" and header.release != release:
            raise BundleInvalid(f"{path} patches release {header.release}, "
                                f"this host runs {release}")
        if header.kind == "full" and not release_newer(header.release, release):
            raise BundleInvalid(f"{path} is a full bundle of {header.release}, "
                                f"not newer than the running release {release}")
        if isinstance(state, Bad):
            raise BundleInvalid(f"{build} is marked bad ({state.reason.value}); "
                                "it is never installed again")
        if isinstance(state, Installed):
            raise BundleInvalid(f"{build} is already installed")
        return build, "full" if header.kind == "full" else "patch"

    async def rollback(self) -> Build:
        """``Rollback``: next boot is marked bad (``manual``); a running update yields."""
        async def work(job: Job) -> Build:
            with self.lifecycle.lock:
                build = self.lifecycle.manual_rollback()
            log.warning("rollback.manual", to=str(build))
            return build

        return await self.runner.run("rollback", work, preempt_update=True)

    async def hold(self, reason: str) -> dict[str, Any]:
        """``Hold``: checks go on, nothing is installed; a running update stops (its
        partial download is kept for after the hold)."""
        hold = await self.updater.place_hold(reason)
        await self.runner.cancel(only="update")
        self._show_status()
        self.wake_events()
        return hold.to_json()

    async def unhold(self) -> dict[str, Any] | None:
        """``Unhold``: the next check installs what it decides again."""
        lifted = await self.updater.lift_hold()
        self._show_status()
        self.wake_events()
        return lifted.to_json() if lifted is not None else None

    async def unmark(self, build: Build) -> None:
        """``Unmark``: lift the build's tombstone (the lifecycle logs and queues it)."""
        await anyio.to_thread.run_sync(self.lifecycle.unmark, build)  # waits for the lock
        self.wake_events()

    # --- running -------------------------------------------------------------------

    async def run(self) -> None:
        from patchd.service.api import serve_api

        async with anyio.create_task_group() as tg:
            self.runner.attach(tg)
            self.boot.attach(tg)
            tg.start_soon(supervised, "signals", partial(self._signals, tg))
            tg.start_soon(supervised, "trash", self.trash.run)
            await tg.start(serve_api, self)
            self.problems = _socket_problems(self.config)
            await self.boot.resume()
            self.notifier.ready()
            self._show_status()
            log.info("daemon.ready", app=self.config.app.name, socket=str(self.config.paths.socket),
                     next_boot=str(self.lifecycle.pointers.next_boot))
            tg.start_soon(supervised, "poll_loop", self.checks.poll_loop)
            tg.start_soon(supervised, "event_sender", self._event_sender)
            tg.start_soon(supervised, "watchdog", self._watchdog)
            tg.start_soon(supervised, "metrics", self.textfile.run)
            if self.reloader is not None:
                tg.start_soon(supervised, "config_watcher", partial(self.reloader.watch, tg))
        await self._shutdown()

    def status_line(self) -> str:
        activity = self.board.current
        problems = "".join(f"{problem}; " for problem in self.problems)
        if activity.phase != "idle":
            return problems + activity.summary()
        line = f"idle; next boot {self.lifecycle.pointers.next_boot}"
        if self.updater.hold is not None:
            line = f"{self.updater.hold}; {line}"
        line = problems + line
        if self.checks.last_error:
            line += f"; last error: {self.checks.last_error}"
        return line[:200]

    def _show_status(self) -> None:
        self.notifier.status(self.status_line())
        self.textfile.changed()

    async def _shutdown(self) -> None:
        log.debug("daemon.tasks_ended")
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.source.aclose()
            await self.http.aclose()
        self.trash.close()
        self.lifecycle.close()
        log.info("daemon.stopped")

    async def _signals(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if self.reloader is not None:
                        await self.reloader.reload("signal")
                    continue
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                self.notifier.stopping()
                if self.reloader is not None:
                    self.reloader.stop.set()
                tg.cancel_scope.cancel()
                return

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    async def _event_sender(self) -> None:
        """POST queued events through the repository's client (same CA, client
        certificate, headers and proxy; closed with the daemon)."""
        failures = 0
        while True:
            with anyio.move_on_after(backoff_delay(failures, 3600) if failures else None):
                await self._wake_sender.wait()
            self._wake_sender = anyio.Event()
            url = self.config.server.events_url
            if not url or not len(self.events):
                continue
            client = self.http.get(TransportSettings.from_config(self.config.server))
            try:
                await send_pending(self.events, client, url)
                failures = 0
                self.textfile.changed()  # the queue's depth
            except Exception as exc:  # whatever the collector does stays in here
                failures += 1
                log.warning("events.send_failed", error=str(exc),
                            error_class=type(exc).__name__, failures=failures)

    # --- config reload -------------------------------------------------------------

    async def _apply_config(self, new: Config, trigger: Trigger) -> None:
        """Put a valid new config in effect (the reloader read it)."""
        renewed = self._transport(new) != self._source_transport
        if new == self.config and not renewed:
            log.info("config.unchanged", trigger=trigger)
            return
        old, self.config = self.config, new
        configure_logging(new.log.format, new.log.level)
        for name in ("paths", "api"):
            if getattr(old, name) != getattr(new, name):
                log.warning("config.restart_needed", section=name)
        # Another repository, channel, transport or rate: the running update (decided
        # from the old manifest) stops, and the next check starts from the new one.
        if renewed or (old.server.manifest_url, old.server.channel,
                       old.install.max_download_rate, old.server.min_rate,
                       old.server.document_deadline) != (
                new.server.manifest_url, new.server.channel, new.install.max_download_rate,
                new.server.min_rate, new.server.document_deadline):
            await self.runner.cancel(only="update")
            old_source, self.source = self.source, self._open_source(new)
            self.updater.forget_manifest()
            await old_source.aclose()
            await self.http.close_retired()
        self.updater.config = new
        self.events.channel = new.server.channel
        log.info("config.reloaded", source=new.source, trigger=trigger,
                 transport_changed=renewed)
        self.checks.wake()


def _optional(build: Build | None) -> dict[str, Any] | None:
    return build.to_json() if build is not None else None


def _build_info(build: Build, state: Any) -> dict[str, Any]:
    reason = getattr(state, "reason", None)
    size = getattr(state, "size", None)
    return {"build": build.to_json(), "state": state.name,
            "reason": reason.value if reason is not None else None, "size": size}


def _socket_problems(config: Config) -> list[str]:
    """Whether the socket went to ``api.socket_group``; if not, the app's user gets
    "permission denied" though the daemon runs (service/api.py logs the fix).

    This reads the group the socket file really has rather than asking
    ``config.preflight.socket_group_usable`` again: that predicts the chown, this
    reports its outcome (a setgid directory can give the socket the group anyway), and
    STATUS= should say what apps will meet."""
    want = config.api.socket_group
    try:
        gid = grp.getgrnam(want).gr_gid
        actual = config.paths.socket.stat().st_gid
    except (KeyError, OSError):
        gid, actual = -1, None
    if gid == actual:
        return []
    return [f"socket group {want} unusable, apps get permission denied"]


def run_command(args: argparse.Namespace) -> int:
    """``patchd run``: load the config, configure logging, serve until SIGTERM."""
    config_path: Path | None = args.config
    if config_path is None:
        app = os.environ.get("PATCHD_APP")
        if not app:
            raise UsageError("run needs --config PATH (or PATCHD_APP to use /etc/patchd/APP.toml)")
        config_path = Path(f"/etc/patchd/{app}.toml")
    config = load_config(config_path)
    configure_logging(args.log_format or config.log.format, args.log_level or config.log.level)
    found = preflight(config)  # the same checks as `patchd config check`
    raise_errors(config, found)
    for finding in found:
        log.warning("config.host_problem", key=finding.key, problem=finding.message)
    soft, hard = raise_fd_limit()
    log.debug("daemon.fd_limit", soft=soft, hard=hard)

    async def main() -> None:
        daemon = Daemon(config_path, config)  # anyio primitives need the running loop
        await daemon.run()

    try:
        anyio.run(main)
    except BaseExceptionGroup as group:
        # A task group wraps what its tasks raise; a patchd error (the socket is taken)
        # must reach the CLI as itself, for its one line and its exit code.
        first = _first_patchd_error(group)
        if first is None:
            raise
        raise first from None
    return 0


def _first_patchd_error(group: BaseExceptionGroup[BaseException]) -> PatchdError | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_patchd_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, PatchdError):
            return exc
    return None
