"""``patchd run``: the daemon as one anyio task group (SPEC §3.4, §3.5, §6, §7).

The supervisor owns every task: the socket server, the poll loop, the one update task,
the event sender, the config watcher, the signal handler, boot watchers and the
watchdog. ``READY=1`` is sent only once the state is loaded and the socket listens.
Deciding lives elsewhere (strategy, lifecycle); this module schedules and reacts.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from anyio.abc import TaskGroup

from patchd.config import Config, load_config
from patchd.core.errors import (
    BadInputError,
    ConfigError,
    PatchdError,
    TransientError,
)
from patchd.core.model import Bad, BadReason, Build, Installed, release_newer, utc_now_text
from patchd.fetch.sources import Source, open_source
from patchd.host.logs import configure_logging
from patchd.host.systemd import Notifier, watchdog_interval
from patchd.service.activity import ActivityBoard
from patchd.service.events import EventQueue, send_pending
from patchd.service.updater import Updater
from patchd.state import Lifecycle, load_client_state
from patchd.trust.strategy import NO_UPGRADE, Decision

log = structlog.get_logger("patchd.service.daemon")

#: First check happens a random 0–60 s after start, so a fleet rebooting together
#: does not hit the repository at once. Tests shorten it with PATCHD_FIRST_CHECK_DELAY.
FIRST_CHECK_MAX_DELAY = 60.0
MIN_BACKOFF = 5.0


def backoff_delay(failures: int, interval: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter, capped at the poll interval."""
    rng = rng or random.Random()
    ceiling = min(interval, MIN_BACKOFF * 2 ** max(failures - 1, 0))
    return rng.uniform(ceiling / 2, ceiling)


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    rng = rng or random.Random()
    return interval * (1 + rng.uniform(-jitter, jitter))


def first_check_delay() -> float:
    override = os.environ.get("PATCHD_FIRST_CHECK_DELAY")
    if override is not None:
        return float(override)
    return random.uniform(0, FIRST_CHECK_MAX_DELAY)


@dataclass
class CheckOutcome:
    decision: Decision
    error: BaseException | None = None


class Daemon:
    """The running daemon of one app. ``api.py`` calls its public methods."""

    def __init__(self, config_path: Path | None, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = Notifier()
        self.board = ActivityBoard()
        self.lifecycle = Lifecycle.open(config.paths.state_dir, config.paths.cache_dir,
                                        config.app.release_dir)
        self.lock: threading.RLock = self.lifecycle.lock
        self.client = load_client_state(self.lifecycle.layout)
        self.events = EventQueue(config.paths.state_dir / "events.json", app=config.app.name,
                                 channel=config.server.channel,
                                 client_id=lambda: self.updater.client.client_id)
        self.lifecycle.on_event = self._lifecycle_event
        self.updater = Updater(config, self.lifecycle, self.client, self.events, self.board,
                               self.lock)
        self.source: Source = self._open_source(config)
        self.last_check: str | None = None
        self.next_check: str | None = None
        self.last_error: str | None = None
        self._tg: TaskGroup | None = None
        self._wake_poll = anyio.Event()
        self._wake_events = anyio.Event()
        self._stop_watching = anyio.Event()
        self._check_running: anyio.Event | None = None
        self._check_result: CheckOutcome | None = None
        self._update_scope: anyio.CancelScope | None = None
        self._update_build: Build | None = None
        self._update_done: anyio.Event | None = None
        self._update_error: BaseException | None = None
        self._boot_scope: anyio.CancelScope | None = None
        self._config_signature = _file_signature(config_path) if config_path else None
        self.board.listeners.append(lambda a: self.notifier.status(self.status_line()))

    def __repr__(self) -> str:
        return f"<Daemon {self.config.app.name} {self.board.current.summary()}>"

    # --- wiring --------------------------------------------------------------------

    @staticmethod
    def _open_source(config: Config) -> Source:
        return open_source(config.server.manifest_url, timeout=config.server.timeout,
                           max_rate=config.install.max_download_rate)

    def _lifecycle_event(self, type_: str, build: Build, message: str) -> None:
        self.events.add(type_, build, message)

    def status_line(self) -> str:
        activity = self.board.current
        if activity.phase != "idle":
            return activity.summary()
        p = self.lifecycle.pointers
        line = f"idle; next boot {p.next_boot}"
        if self.last_error:
            line += f"; last error: {self.last_error}"
        return line[:200]

    # --- running -------------------------------------------------------------------

    async def run(self) -> None:
        from patchd.service.api import serve_api

        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._signals, tg)
            await tg.start(serve_api, self)
            await self._resolve_stale_breadcrumb()
            self.notifier.ready()
            self.notifier.status(self.status_line())
            log.info("daemon.ready", app=self.config.app.name, socket=str(self.config.paths.socket),
                     next_boot=str(self.lifecycle.pointers.next_boot))
            tg.start_soon(self._poll_loop)
            tg.start_soon(self._event_sender)
            tg.start_soon(self._watchdog)
            if self.config_path is not None:
                tg.start_soon(self._config_watcher)
        await self._shutdown()

    async def _shutdown(self) -> None:
        log.debug("daemon.tasks_ended")
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.source.aclose()
        self.lifecycle.close()
        log.info("daemon.stopped")

    async def _signals(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                self.notifier.stopping()
                # The file watcher blocks a worker thread; cancellation alone would wait
                # out its timeout, the stop event ends it within one step.
                self._stop_watching.set()
                tg.cancel_scope.cancel()
                return

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    # --- checks and updates ----------------------------------------------------------

    async def check_now(self) -> Decision:
        """Check the manifest and start the decided update in the background.

        A check requested while another runs joins it. A decision for another build
        than the one being downloaded (rolled back or superseded) cancels that update.
        """
        if self._check_running is not None:
            running = self._check_running
            await running.wait()
            assert self._check_result is not None
            if self._check_result.error is not None:
                raise self._check_result.error
            return self._check_result.decision
        self._check_running = anyio.Event()
        outcome = CheckOutcome(NO_UPGRADE)
        try:
            outcome.decision = await self._check()
            return outcome.decision
        except Exception as exc:
            outcome.error = exc
            raise
        finally:
            self._check_result = outcome
            self._check_running.set()
            self._check_running = None

    async def _check(self) -> Decision:
        if self.board.current.phase == "idle":
            self.board.set("checking")
        try:
            manifest = await self.updater.fetch_verified(self.source)
            forgotten = self.updater.apply_rollbacks(manifest)
            decision = self.updater.decide(manifest)
        except PatchdError as exc:
            self._record_error(exc)
            raise
        finally:
            if self.board.current.phase == "checking":
                self.board.idle()
        self.last_check = utc_now_text()
        if self._update_build is not None and (
                self._update_build in forgotten or decision.build != self._update_build):
            log.warning("update.superseded", building=str(self._update_build),
                        decided=str(decision))
            await self._cancel_update()
        if decision.kind != "none" and self._update_build is None:
            self._start_update(decision)
        log.info("check.decided", strategy=decision.kind,
                 build=str(decision.build) if decision.build else None)
        self._wake_events.set()
        return decision

    def _record_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        event = exc.bad_reason if isinstance(exc, BadInputError) else "check.failed"
        kind = ("transient" if isinstance(exc, TransientError) else
                "bad_input" if isinstance(exc, BadInputError) else
                "config" if isinstance(exc, ConfigError) else "error")
        log.error(event, error=str(exc), error_class=type(exc).__name__, kind=kind)
        self.notifier.status(self.status_line())

    def _start_update(self, decision: Decision) -> None:
        assert self._tg is not None and decision.build is not None
        self._update_build = decision.build
        self._update_done = anyio.Event()
        self._update_error = None
        self._update_scope = anyio.CancelScope()
        # Shown at once, so a client that watches right after CheckNow never sees a
        # stale "idle" before the task has started.
        size = decision.bundle.size if decision.bundle else 0
        self.board.set("downloading", decision.build, 0, size)
        self._tg.start_soon(self._run_update, decision, self._update_scope, self._update_done)

    async def _run_update(self, decision: Decision, scope: anyio.CancelScope,
                          done: anyio.Event) -> None:
        assert decision.build is not None
        try:
            with scope, structlog.contextvars.bound_contextvars(
                    release=decision.build.release, patch=decision.build.patch):
                await self.updater.perform(decision, self.source)
                self.last_error = None
        except Exception as exc:
            self._update_error = exc
            self._record_error(exc)
        finally:
            self._update_build = None
            self._update_scope = None
            done.set()
            self.board.idle()
            self._wake_events.set()  # the update queued download/install events

    async def _cancel_update(self) -> None:
        if self._update_scope is not None and self._update_done is not None:
            self._update_scope.cancel()
            await self._update_done.wait()

    async def wait_update(self) -> BaseException | None:
        """Wait for the running update (if any); its error, or None."""
        if self._update_done is not None:
            await self._update_done.wait()
        return self._update_error

    @property
    def busy(self) -> bool:
        return self._update_build is not None

    async def install_local(self, path: Path) -> Build:
        """``Install``: an operator-supplied bundle, verified like any download.

        The header is read unverified only to learn which build it claims to be; the
        installer then verifies the signature and app/arch before writing anything.
        """
        from patchd.core.errors import BundleInvalid
        from patchd.trust.bundle import read_header_unverified

        header = await anyio.to_thread.run_sync(read_header_unverified, path)
        build = Build(header.release, header.patch)
        with self.lock:
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
        self.board.set("installing", build)
        try:
            await self.updater.install_local(path, build, header.kind)
        except Exception as exc:
            self._record_error(exc)
            raise
        finally:
            self.board.idle()
        return build

    async def _poll_loop(self) -> None:
        delay = first_check_delay()
        failures = 0
        while True:
            self.next_check = _in(delay)
            with anyio.move_on_after(delay):
                await self._wake_poll.wait()
            self._wake_poll = anyio.Event()
            error: BaseException | None = None
            try:
                await self.check_now()
                error = await self.wait_update()
            except Exception as exc:
                error = exc
            interval = self.config.server.poll_interval
            if isinstance(error, TransientError):
                failures += 1
                delay = backoff_delay(failures, interval)
                retry_after = getattr(error, "retry_after", None)
                if retry_after:
                    delay = max(delay, min(retry_after, interval))
                log.info("check.retry_scheduled", in_seconds=round(delay, 1), failures=failures)
            else:
                failures = 0
                delay = jittered(interval, self.config.server.poll_jitter)

    async def _event_sender(self) -> None:
        failures = 0
        client: httpx.AsyncClient | None = None
        try:
            while True:
                with anyio.move_on_after(backoff_delay(failures, 3600) if failures else None):
                    await self._wake_events.wait()
                self._wake_events = anyio.Event()
                url = self.config.server.events_url
                if not url or not len(self.events):
                    continue
                if client is None:
                    client = httpx.AsyncClient(timeout=self.config.server.timeout)
                try:
                    await send_pending(self.events, client, url)
                    failures = 0
                except TransientError as exc:
                    failures += 1
                    log.warning("events.send_failed", error=str(exc), failures=failures)
        finally:
            if client is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await client.aclose()

    # --- boot protocol support ---------------------------------------------------------

    def boot_target(self) -> tuple[Build, Path]:
        """Resolve a stale breadcrumb and strict-verify before naming the tree to boot."""
        with self.lock:
            crashed = self.lifecycle.detect_boot_crash()
            if crashed is not None:
                self._wake_events.set()
            if self.config.trust.verify == "strict":
                from patchd.build.install import verify_tree

                def check(build: Build, state: Installed, tree: Path) -> str | None:
                    return verify_tree(tree, state.files)

                self.lifecycle.validate_next_boot(check)
            return self.lifecycle.boot_target()

    def boot_started(self, build: Build, pid: int | None, resumed: bool = False) -> None:
        """Watch the booting host: its exit before BootSuccess is a crash; and the timeout.

        ``resumed``: the boot began before this daemon started (a restart mid-boot).
        """
        self._stop_boot_watch()
        if self._tg is None:
            return
        scope = anyio.CancelScope()
        self._boot_scope = scope
        self._tg.start_soon(self._watch_boot, build, pid, scope, resumed)

    def boot_finished(self) -> None:
        self._stop_boot_watch()
        self._wake_events.set()

    def _stop_boot_watch(self) -> None:
        if self._boot_scope is not None:
            self._boot_scope.cancel()
            self._boot_scope = None

    async def _watch_boot(self, build: Build, pid: int | None, scope: anyio.CancelScope,
                          resumed: bool) -> None:
        timeout = self.config.boot.timeout or None
        elapsed = self.lifecycle.boot_elapsed(datetime.now(UTC))
        if resumed and timeout is not None and elapsed is not None:
            # After a daemon restart the boot has been running for a while already;
            # boot_started_at has whole seconds, so count one less, never fire early.
            timeout = max(0.0, timeout - max(0.0, elapsed - 1))
        with scope:
            with anyio.move_on_after(timeout) as timer:
                if pid is not None and self.config.boot.watch_pid:
                    await wait_pid_exit(pid)
                    with self.lock:
                        crashed = self.lifecycle.detect_boot_crash()
                    if crashed is not None:  # the lifecycle logged it (boot_crash)
                        self._wake_events.set()
                    return
                await anyio.sleep_forever()
            if timer.cancelled_caught:
                with self.lock:
                    p = self.lifecycle.pointers
                    if p.currently_booting == build:
                        self.lifecycle.record_boot_failure(
                            build, BadReason.BOOT_TIMEOUT,
                            f"no BootSuccess within {self.config.boot.timeout:g} s")
                self._wake_events.set()

    async def _resolve_stale_breadcrumb(self) -> None:
        """At start-up: a breadcrumb whose pid is gone is a crash; a live one is watched."""
        with self.lock:
            self.lifecycle.detect_boot_crash()
            p = self.lifecycle.pointers
        if p.currently_booting is not None:
            self.boot_started(p.currently_booting, p.boot_pid, resumed=True)

    # --- config reload -------------------------------------------------------------------

    async def _config_watcher(self) -> None:
        import watchfiles

        assert self.config_path is not None
        target = self.config_path.resolve()
        parent = target.parent

        def only_config(change: Any, path: str) -> bool:
            return Path(path) == target

        async def catch_early_edit() -> None:
            # The watch is set up asynchronously after READY=1; an edit made in that
            # window would go unseen, so compare the file once the watch surely runs.
            await anyio.sleep(1)
            if _file_signature(target) != self._config_signature:
                await self.reload()

        assert self._tg is not None
        self._tg.start_soon(catch_early_edit)
        async for _changes in watchfiles.awatch(parent, watch_filter=only_config,
                                                debounce=200, step=50, recursive=False,
                                                stop_event=self._stop_watching):
            await self.reload()

    async def reload(self) -> None:
        """Reload the config; an invalid one is logged and the old one kept."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        self._config_signature = _file_signature(self.config_path)
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), kept=self.config.source)
            self.notifier.ready()
            return
        old, self.config = self.config, new
        configure_logging(new.log.format, new.log.level)
        for name in ("paths", "api"):
            if getattr(old, name) != getattr(new, name):
                log.warning("config.restart_needed", section=name)
        if (old.server.manifest_url, old.server.timeout, old.install.max_download_rate) != (
                new.server.manifest_url, new.server.timeout, new.install.max_download_rate):
            await self._cancel_update()
            old_source, self.source = self.source, self._open_source(new)
            self.updater._manifest = None
            await old_source.aclose()
        self.updater.config = new
        self.events.channel = new.server.channel
        log.info("config.reloaded", source=new.source)
        self._wake_poll.set()
        self.notifier.ready()


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def wait_pid_exit(pid: int) -> None:
    """Return when process ``pid`` exits, without polling (a pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OverflowError, ValueError):
        return  # gone, or a number no process can have: either way it is not running
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_command(args: argparse.Namespace) -> int:
    """``patchd run``: load the config, configure logging, serve until SIGTERM."""
    config_path: Path | None = args.config
    if config_path is None:
        app = os.environ.get("PATCHD_APP")
        if not app:
            from patchd.core.errors import UsageError

            raise UsageError("run needs --config PATH (or PATCHD_APP to use /etc/patchd/APP.toml)")
        config_path = Path(f"/etc/patchd/{app}.toml")
    config = load_config(config_path)
    configure_logging(args.log_format or config.log.format, args.log_level or config.log.level)

    async def main() -> None:
        daemon = Daemon(config_path, config)  # anyio primitives need the running loop
        await daemon.run()

    anyio.run(main)
    return 0

