"""``io.patchd.Updater`` (SPEC §4): the socket methods, mapped onto the running daemon.

Parameters are validated here, authorisation is decided here from the peer's
credentials, and patchd's own errors are translated to the interface's errors. The
protocol itself (framing, limits, introspection) is ``varlink.py``'s.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskStatus

from patchd import __version__
from patchd.core.errors import (
    BadInputError,
    LifecycleError,
    NotBootTarget,
    PatchdError,
    SocketInUse,
    TransientError,
)
from patchd.core.model import Build
from patchd.host import process
from patchd.service.interface import INTERFACE_NAME, INTERFACE_TEXT
from patchd.varlink import (
    AddressInUse,
    Call,
    InvalidParameter,
    PeerCred,
    VarlinkError,
    VarlinkServer,
    VarlinkService,
)

if TYPE_CHECKING:
    from patchd.service.daemon import Daemon

log = structlog.get_logger("patchd.service.api")

ANYONE = frozenset({"GetStatus", "GetBootTarget", "WatchActivity"})
REPORTERS = frozenset({"BootStart", "BootSuccess", "BootFailure"})
ADMINS = frozenset({"CheckNow", "Install", "Rollback"})
#: WatchActivity sends at most this many replies a second.
WATCH_MAX_RATE = 10.0


def error(name: str, **parameters: Any) -> VarlinkError:
    return VarlinkError(f"{INTERFACE_NAME}.{name}", parameters)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def authorized(method: str, uid: int, reporters: tuple[str, ...], admins: tuple[str, ...],
               own_uid: int) -> bool:
    """SPEC §4: reads for anyone on the socket; boots for reporters; changes for admins.

    root and the daemon's own user may do everything (the daemon's user can edit its
    state directly anyway, so refusing it would protect nothing).
    """
    short = method.rpartition(".")[2]
    if short in ANYONE or uid in (0, own_uid):
        return True
    name = _user_name(uid)
    if short in REPORTERS:
        return name in reporters
    if short in ADMINS:
        return name in admins
    return False


def build_param(call: Call, key: str = "build", required: bool = False) -> Build | None:
    value = call.parameters.get(key)
    if value is None:
        if required:
            raise InvalidParameter(key)
        return None
    try:
        return Build.from_json(value)
    except (ValueError, TypeError):
        raise InvalidParameter(key) from None


def _optional(build: Build | None) -> dict[str, Any] | None:
    return build.to_json() if build is not None else None


def build_info(build: Build, state: Any) -> dict[str, Any]:
    reason = getattr(state, "reason", None)
    size = getattr(state, "size", None)
    return {"build": build.to_json(), "state": state.name,
            "reason": reason.value if reason is not None else None, "size": size}


class UpdaterApi:
    """Handlers of io.patchd.Updater for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        #: The last GetBootTarget reply and the pointers object it was computed from.
        self._target: tuple[object, dict[str, Any]] | None = None

    def methods(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("GetStatus", "GetBootTarget", "BootStart", "BootSuccess", "BootFailure",
                 "CheckNow", "Install", "Rollback", "WatchActivity")}

    def authorize(self, method: str, peer: PeerCred) -> bool:
        cfg = self.d.config
        if not authorized(method, peer.uid, cfg.boot.reporters, cfg.api.admins, os.geteuid()):
            log.warning("api.not_authorized", method=method, uid=peer.uid, pid=peer.pid)
            raise error("NotAuthorized", method=method)
        return True

    async def GetStatus(self, call: Call) -> dict[str, Any]:
        d = self.d
        with d.lock:
            p = d.lifecycle.pointers
            builds = [build_info(b, s) for b, s in d.lifecycle.builds()]
        return {"app": d.config.app.name, "channel": d.config.server.channel,
                "release": p.release, "next_boot": p.next_boot.to_json(),
                "last_booted": _optional(p.last_booted),
                "currently_booting": _optional(p.currently_booting),
                "builds": builds, "activity": d.board.current.to_json(),
                "last_check": d.last_check, "next_check": d.next_check,
                "last_error": d.last_error}

    async def GetBootTarget(self, call: Call) -> dict[str, Any]:
        """The hot path of every host start (and of launchers polling it).

        With no breadcrumb there is nothing to resolve and, unless ``verify = "strict"``,
        nothing to check, so the answer is in memory: it is cached against the pointers
        object it came from (the lifecycle replaces that object on every write). The
        worker-thread path, which may read and write state files, is only for a boot in
        progress, strict verification, or a lock held by another thread.
        """
        d = self.d
        pointers = d.lifecycle.pointers
        if pointers.currently_booting is None and d.config.trust.verify != "strict":
            cached = self._target
            if cached is not None and cached[0] is pointers:
                return cached[1]
            if d.lock.acquire(blocking=False):
                try:
                    pointers = d.lifecycle.pointers
                    if pointers.currently_booting is None:
                        build, path = d.lifecycle.boot_target()
                        reply = {"build": build.to_json(), "path": str(path)}
                        self._target = (pointers, reply)
                        return reply
                finally:
                    d.lock.release()
        build, path = await anyio.to_thread.run_sync(d.boot_target)
        return {"build": build.to_json(), "path": str(path)}

    async def BootStart(self, call: Call) -> dict[str, Any]:
        build = build_param(call)
        pid = call.parameters.get("pid")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)
                                or not 0 < pid <= process.PID_MAX):
            raise InvalidParameter("pid")
        pid_start = process.pid_start_time(pid) if pid is not None else None
        await anyio.to_thread.run_sync(self.d.boot_target)  # stale breadcrumb, strict check
        with self.d.lock:
            try:
                booted, path = self.d.lifecycle.record_boot_start(build, pid, pid_start)
            except NotBootTarget as exc:
                raise error("NotBootTarget", expected=exc.expected.to_json(),
                            got=exc.got.to_json()) from None
        self.d.boot_started(booted, pid)
        log.info("boot.started", release=booted.release, patch=booted.patch, pid=pid)
        return {"build": booted.to_json(), "path": str(path)}

    async def BootSuccess(self, call: Call) -> dict[str, Any]:
        build = build_param(call)
        with self.d.lock:
            booted = self._booting(lambda: self.d.lifecycle.record_boot_success(build))
        self.d.boot_finished()
        log.info("boot.success", release=booted.release, patch=booted.patch)
        return {}

    async def BootFailure(self, call: Call) -> dict[str, Any]:
        from patchd.core.model import BadReason

        build = build_param(call)
        reason = call.parameters.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InvalidParameter("reason")
        with self.d.lock:
            failed = self._booting(lambda: self.d.lifecycle.record_boot_failure(
                build, BadReason.BOOT_FAILURE, reason or "reported by the host"))
        self.d.boot_finished()
        log.warning("boot.failure_reported", release=failed.release, patch=failed.patch,
                    reason=reason)
        return {}

    def _booting(self, transition: Any) -> Build:
        try:
            result: Build = transition()
            return result
        except NotBootTarget as exc:
            raise error("NotBootTarget", expected=exc.expected.to_json(),
                        got=exc.got.to_json()) from None
        except LifecycleError as exc:
            raise error("UpdateFailed", reason=str(exc), transient=False) from None

    async def CheckNow(self, call: Call) -> dict[str, Any]:
        try:
            decision = await self.d.check_now()
        except PatchdError as exc:
            raise error("UpdateFailed", reason=str(exc),
                        transient=isinstance(exc, TransientError)) from None
        return {"strategy": decision.kind,
                "build": decision.build.to_json() if decision.build else None}

    async def Install(self, call: Call) -> dict[str, Any]:
        path = call.parameters.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidParameter("path")
        if self.d.busy or self.d.board.current.phase != "idle":
            raise error("Busy", activity=self.d.board.current.to_json())
        try:
            build = await self.d.install_local(Path(path))
        except BadInputError as exc:
            raise error("InvalidBundle", reason=str(exc)) from None
        except PatchdError as exc:
            raise error("UpdateFailed", reason=str(exc),
                        transient=isinstance(exc, TransientError)) from None
        except OSError as exc:
            raise error("InvalidBundle", reason=f"{path}: {exc.strerror}") from None
        return {"build": build.to_json()}

    async def Rollback(self, call: Call) -> dict[str, Any]:
        with self.d.lock:
            try:
                build = self.d.lifecycle.manual_rollback()
            except LifecycleError as exc:
                raise error("UpdateFailed", reason=str(exc), transient=False) from None
        log.warning("rollback.manual", to=str(build))
        return {"build": build.to_json()}

    async def WatchActivity(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        board = self.d.board
        version, activity = board.version, board.current
        yield {"activity": activity.to_json()}
        if not call.more:
            return
        while True:
            version, activity = await board.wait_change(version)
            yield {"activity": activity.to_json()}
            await anyio.sleep(1 / WATCH_MAX_RATE)  # coalesce bursts of progress



async def serve_api(daemon: Daemon, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
    """Serve the daemon's socket; ``started`` once it listens."""
    api = UpdaterApi(daemon)
    # An unexpected failure in a handler is answered with a declared error (so clients
    # generated from the interface recognise it), not org.varlink.service's.
    service = VarlinkService(vendor="patchd", product="patchd", version=__version__,
                             url="https://github.com/patchd/patchd", authorize=api.authorize,
                             internal_error=f"{INTERFACE_NAME}.UpdateFailed",
                             internal_error_parameters={
                                 "reason": "internal error in patchd; see the daemon's log",
                                 "transient": False})
    service.add_interface(INTERFACE_NAME, INTERFACE_TEXT, api.methods(),
                          requires_more=())
    cfg = daemon.config
    daemon.config.paths.socket.parent.mkdir(parents=True, exist_ok=True)
    group = cfg.api.socket_group if _usable_group(cfg.api.socket_group) else None
    if group is None:
        log.warning("api.socket_group_unusable", group=cfg.api.socket_group,
                    effect="socket keeps the daemon's group",
                    hint="create the group and make the daemon's user a member (e.g. "
                         "SupplementaryGroups= in the unit), or run as root")
    server = VarlinkServer(service, cfg.paths.socket, mode=0o660, group=group)
    try:
        await server.serve(task_status=task_status)
    except AddressInUse as exc:
        hint = "; is patchd already running?" if exc.live else ""
        raise SocketInUse(f"{exc}{hint}") from exc


def _usable_group(name: str) -> bool:
    """The group exists and we may give the socket to it (root, or we are a member)."""
    import grp

    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return False
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()
