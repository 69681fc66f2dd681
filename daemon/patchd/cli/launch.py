"""``patchd launch APP [--] COMMAND [ARGS]``: the ready-made launcher (docs/host-integration.md).

One boot, as this module runs it::

    GetStatus → BootStart(pid = the launcher) → on-fallback hook (after a failure)
      → pre-start hook (a build not booted before) → start COMMAND from the tree
      → READY=1 (with --notify) → grace → required checks (wanted ones beside them)
      → BootSuccess, READY=1 to systemd   | any failure: BootFailure(reason), stop the
                                          |   app, boot again: the fallback (bounded)
      → run: forward signals; a new build activates by [activate] policy (a restart);
        the app's exit is the launcher's exit, with the same status

The launcher stays the app's parent (``launch_app.py`` says why and how the app dies
with it); the daemon watches the launcher's pid. Signals TERM, INT, HUP, USR1, USR2
are forwarded; TERM and INT also end the launcher once the app has exited.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from patchd.cli.launch_activate import Activation, Clock
from patchd.cli.launch_app import App, NotifyProxy, command_in_tree
from patchd.cli.launch_checks import checks_of, hook_path, run_checks, run_hook
from patchd.cli.launch_daemon import DaemonLink, build_text
from patchd.config.launch import LaunchConfig, read_launch_config
from patchd.core.errors import (
    ClientError,
    CommandFailed,
    DaemonConnectionBroken,
    DaemonNotRunning,
    LaunchFailed,
    PatchdError,
    UsageError,
)
from patchd.core.text import printable

__all__ = ["FORWARDED_SIGNALS", "Launcher", "launch_command"]

log = structlog.get_logger("patchd.cli.launch")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)
#: Characters of a reason sent with BootFailure.
MAX_REASON = 900
#: Seconds a restart or fallback waits for a daemon that went away.
DAEMON_WAIT = 30.0

T = TypeVar("T")
Build = dict[str, Any]


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived while the launcher waited for something."""


class Launcher:
    """One app under ``patchd launch``: its boots, its checks, its restarts."""

    def __init__(self, config: LaunchConfig, command: list[str], *, notify: bool,
                 clock: Clock) -> None:
        self.cfg = config
        self.command = command
        self.notify = notify
        self.link = DaemonLink(config.socket)
        self.activation = Activation(config.activate, self.link, clock)
        self.stopping = anyio.Event()
        self.app: App | None = None
        self.ready = anyio.Event()
        self.told_ready = False
        self._tg: TaskGroup | None = None
        self._proxy: NotifyProxy | None = None

    def __repr__(self) -> str:
        return f"<Launcher {self.cfg.app} app={self.app!r}>"

    # --- the whole run --------------------------------------------------------------

    async def run(self) -> int:
        """Launch, keep running, and return the app's exit status (negative: a signal)."""
        self._proxy = NotifyProxy()
        status, error = 0, None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self._signals)
                tg.start_soon(self._proxy.serve, self._on_notify)
                try:
                    status = await self._main()
                except PatchdError as exc:  # raised here, not as a group of one
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            self._proxy.close()
        if error is not None:
            raise error
        return status

    async def _signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(*FORWARDED_SIGNALS) as received:
            task_status.started()
            async for sig in received:
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("launch.stopping", signal=sig.name)
                    self.stopping.set()
                if self.app is not None:
                    self.app.signal(sig)

    def _on_notify(self, key: str, value: str) -> None:
        if key == "READY" and value == "1":
            self.ready.set()
        elif key == "PATCHD_IDLE":
            self.activation.app_reports_idle(value == "1")

    def _tell_ready(self) -> None:
        if not self.told_ready and self._proxy is not None:
            self._proxy.send("READY=1")
            self.told_ready = True

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        """``work()``, unless a stop signal comes first (then :class:`_Stopped`)."""
        result: list[T] = []
        async with anyio.create_task_group() as tg:
            async def run() -> None:
                result.append(await work())
                tg.cancel_scope.cancel()

            async def stop() -> None:
                await self.stopping.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            tg.start_soon(stop)
        if not result:
            raise _Stopped()
        return result[0]

    async def _main(self) -> int:
        try:
            await self.link.call("GetStatus")
        except PatchdError as exc:
            log.warning("launch.daemon_unreachable", error=str(exc),
                        effect=f"running the release in {self.cfg.release_dir} without "
                               "boot reports or health checks")
            return await self._unprotected()
        assert self._tg is not None
        self._tg.start_soon(self.link.watch, self.activation.changes)
        failed: Build | None = None
        starts = 0
        while True:
            try:
                status = await self._call_patiently("GetStatus")
                if failed is not None and status["next_boot"] == failed:
                    raise LaunchFailed(f"{build_text(failed)} failed and there is no other "
                                       "build to fall back to")
                reply = await self._call_patiently("BootStart", {"pid": os.getpid()})
            except _Stopped:
                return -signal.SIGTERM
            build, tree = reply["build"], Path(reply["path"])
            log.info("launch.boot_started", build=build_text(build), tree=str(tree))
            starts += 1
            try:
                reason = await self._guarded(functools.partial(
                    self._prepare, build, tree, failed, status.get("last_booted")))
                if reason is None:
                    reason = await self._start(build, tree)
            except _Stopped:
                return await self._stopped_during_boot(build)
            if reason is None:
                outcome = await self._succeeded(build)
                if isinstance(outcome, int):
                    return outcome
                if outcome is None:  # an activation: boot again, into next_boot
                    failed, starts = None, 0
                    continue
                reason = outcome
            failed = build
            await self._failed(build, reason)
            if starts >= self.cfg.health.attempts:
                raise LaunchFailed(f"gave up after {starts} failed starts in a row; the last: "
                                   f"{build_text(build)}: {printable(reason, 300)}")

    async def _call_patiently(self, method: str,
                              params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A call that waits up to :data:`DAEMON_WAIT` s for a daemon being restarted
        (a restart or fallback may meet one); a stop signal ends the wait."""
        delay, waited = 0.5, 0.0
        while True:
            if self.stopping.is_set():
                raise _Stopped()
            try:
                return await self.link.call(method, params)
            except (DaemonNotRunning, DaemonConnectionBroken) as exc:
                if waited >= DAEMON_WAIT:
                    raise
                log.info("launch.daemon_away", error=str(exc), retry_in=delay)
            with anyio.move_on_after(delay):
                await self.stopping.wait()
            waited += delay
            delay = min(delay * 2, 5.0)

    # --- one boot -------------------------------------------------------------------

    def _env(self, build: Build, tree: Path) -> dict[str, str]:
        return {"PATCHD_APP": self.cfg.app, "PATCHD_BUILD": build_text(build),
                "PATCHD_TREE": str(tree)}

    async def _prepare(self, build: Build, tree: Path, failed: Build | None,
                       last_booted: Build | None) -> str | None:
        """The hooks before a start: on-fallback (after ``failed``), pre-start (a build
        not booted before). A failure reason, or None."""
        timeout = self.cfg.hooks.timeout
        env = self._env(build, tree)
        if failed is not None and (path := hook_path(tree, "on-fallback")) is not None:
            # Its failure does not fail the fallback: the health checks judge that.
            await run_hook(path, "on-fallback", tree,
                           {**env, "PATCHD_FAILED_BUILD": build_text(failed)}, timeout)
        if build != last_booted and (path := hook_path(tree, "pre-start")) is not None:
            outcome = await run_hook(path, "pre-start", tree, env, timeout)
            if not outcome.ok:
                tail = f": {outcome.tail[-600:]}" if outcome.tail else ""
                return f"pre-start hook failed ({outcome.describe()}){tail}"
        return None

    async def _start(self, build: Build, tree: Path) -> str | None:
        """Start the app and judge it: None when healthy, else the failure reason."""
        assert self._tg is not None
        self.ready = anyio.Event()
        self.activation.app_idle = False
        argv = command_in_tree(self.command, tree)
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env.update(self._env(build, tree))
        assert self._proxy is not None
        env["NOTIFY_SOCKET"] = self._proxy.path
        try:
            app = App.start(argv, env)
        except OSError as exc:
            return f"cannot start {argv[0]}: {exc.strerror}"
        self.app = app
        self._tg.start_soon(app.watch)
        log.info("launch.app_started", build=build_text(build), pid=app.pid)
        if self.stopping.is_set():  # a stop that came while it was being started
            app.signal(signal.SIGTERM)
        verdict: list[str | None] = []
        async with anyio.create_task_group() as tg:
            async def exited() -> None:
                code = await app.wait()
                verdict.append(f"the app exited ({_exit_text(code)}) before its health "
                               "checks passed")
                tg.cancel_scope.cancel()

            async def judged() -> None:
                verdict.append(await self._judge(build, tree, app))
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(judged)
        if self.stopping.is_set():
            raise _Stopped()
        return verdict[0]

    async def _judge(self, build: Build, tree: Path, app: App) -> str | None:
        health = self.cfg.health
        if self.notify:
            with anyio.move_on_after(health.ready_timeout):
                await self.ready.wait()
            if not self.ready.is_set():
                return f"no READY=1 from the app within {health.ready_timeout:g} s"
        await anyio.sleep(health.grace)
        env = {**self._env(build, tree), "PATCHD_APP_PID": str(app.pid)}
        wanted = checks_of("wanted", tree, health)
        if wanted:
            assert self._tg is not None
            self._tg.start_soon(run_checks, wanted, "wanted", tree, env, health.timeout)
        verdict = await run_checks(checks_of("required", tree, health), "required", tree,
                                   env, health.timeout)
        return None if verdict.ok else verdict.reason()

    async def _stopped_during_boot(self, build: Build) -> int:
        """SIGTERM/INT before the verdict: the boot did not succeed; say so, then end."""
        app = self.app
        code = await app.wait() if app is not None else -signal.SIGTERM
        await self._report_failure(build, "stopped by a signal before its health checks "
                                          "passed")
        return code

    async def _failed(self, build: Build, reason: str) -> None:
        log.warning("launch.boot_failed", build=build_text(build), reason=reason)
        await self._report_failure(build, reason)
        if self.app is not None:
            await self.app.stop(self.cfg.activate.stop_timeout)
            self.app = None

    async def _report_failure(self, build: Build, reason: str) -> None:
        try:
            await self.link.call("BootFailure", {"build": build,
                                                 "reason": printable(reason, MAX_REASON)})
        except CommandFailed as exc:  # the daemon judged it already (a timeout)
            log.info("launch.report_refused", report="BootFailure", error=str(exc))
        except ClientError as exc:
            log.warning("launch.report_failed", report="BootFailure", error=str(exc))

    async def _succeeded(self, build: Build) -> int | str | None:
        """BootSuccess, then run until the app exits (its status), a new build is to be
        activated (None), or the daemon refused the success (a reason: fall back)."""
        try:
            await self.link.call("BootSuccess", {"build": build})
        except CommandFailed as exc:
            return f"the daemon refused BootSuccess: {exc}"
        except ClientError as exc:
            log.warning("launch.report_failed", report="BootSuccess", error=str(exc),
                        effect="the app keeps running; the daemon judges the boot")
        log.info("launch.healthy", build=build_text(build))
        self._tell_ready()
        app = self.app
        assert app is not None
        activate = False
        async with anyio.create_task_group() as tg:
            async def exited() -> None:
                await app.wait()
                tg.cancel_scope.cancel()

            async def activation() -> None:
                nonlocal activate
                await self.activation.due(build)
                activate = True
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(activation)
        if not activate or self.stopping.is_set():
            code = await app.wait()
            log.info("launch.app_exited", build=build_text(build), status=_exit_text(code))
            return code
        log.info("launch.activating", running=build_text(build))
        await app.stop(self.cfg.activate.stop_timeout)
        self.app = None
        return None

    # --- without the daemon ---------------------------------------------------------

    async def _unprotected(self) -> int:
        """No daemon: run the release's own tree, as a hand-written launcher would."""
        assert self._tg is not None and self._proxy is not None
        tree = self.cfg.release_dir
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env.update(PATCHD_APP=self.cfg.app, PATCHD_TREE=str(tree),
                   NOTIFY_SOCKET=self._proxy.path)
        argv = command_in_tree(self.command, tree)
        try:
            app = App.start(argv, env)
        except OSError as exc:
            raise LaunchFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
        self.app = app
        self._tg.start_soon(app.watch)
        if not self.notify:
            self._tell_ready()
        else:
            async def relay() -> None:
                await self.ready.wait()
                self._tell_ready()
            self._tg.start_soon(relay)
        return await app.wait()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _die_like(code: int) -> int:
    """The launcher's exit: the app's status, or death by the app's signal."""
    if code >= 0:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    sig = -code
    with contextlib.suppress(OSError, ValueError):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    return 128 + sig  # still here: a signal whose default action is to be ignored


def launch_command(args: argparse.Namespace) -> int:
    from patchd.host.logs import configure_logging

    command = list(args.app_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("launch: give the COMMAND to run (patchd launch APP -- COMMAND)")
    path = args.config or Path(f"/etc/patchd/{args.app}.toml")
    config = read_launch_config(path)
    if config.app != args.app:
        raise UsageError(f"launch: {path} configures app {config.app!r}, not {args.app!r}")
    if args.socket is not None:
        config = LaunchConfig(config.app, config.release_dir, args.socket, config.health,
                              config.hooks, config.activate, config.source)
    configure_logging(args.log_format, args.log_level, stream=sys.stderr)
    launcher = Launcher(config, command, notify=args.notify, clock=Clock.from_environment())
    code = anyio.run(launcher.run)
    return _die_like(code)
