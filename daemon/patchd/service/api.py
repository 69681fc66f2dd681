"""``io.patchd.Updater``: the socket methods, mapped onto the running daemon.

Parameters are validated here and authorisation is decided here from the peer's
credentials. What a method does is the daemon's (through the narrow
:class:`Operations` protocol, not the ``Daemon`` class), and how a patchd error is
answered is the error table's (``patchd.core.errors.SOCKET_ERRORS``). The protocol
itself (framing, limits, introspection) is ``patchd.varlink``'s.

Socket-group policy: when ``api.socket_group`` does not exist or the daemon may not
hand the socket to it, the daemon still starts, keeps its own group on the socket and
logs ``api.socket_group_unusable`` with what to do; it never refuses to start, so a
host can always report boots as root.
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog
from anyio.abc import TaskStatus

from patchd import __version__
from patchd.config.preflight import socket_group_usable
from patchd.core.error_table import INTERNAL_ERROR, to_socket_error
from patchd.core.errors import (
    NotAuthorized,
    PatchdError,
    SocketInUse,
)
from patchd.core.model import MAX_HOLD_REASON, Build
from patchd.host import process
from patchd.service.activity import ActivityBoard
from patchd.service.incoming import receive_bundle
from patchd.service.interface import INTERFACE_NAME, INTERFACE_TEXT
from patchd.trust import Decision
from patchd.varlink import (
    AddressInUse,
    Call,
    InvalidParameter,
    Limits,
    PeerCred,
    VarlinkError,
    VarlinkServer,
    VarlinkService,
)

if TYPE_CHECKING:
    from patchd.config import Config

__all__ = ["ADMINS", "ANYONE", "REPORTERS", "BootOperations", "Operations", "UpdaterApi",
           "authorized", "privileged", "serve_api", "socket_limits"]

log = structlog.get_logger("patchd.service.api")

ANYONE = frozenset({"GetStatus", "GetMetrics", "GetBootTarget", "WatchActivity"})
REPORTERS = frozenset({"BootStart", "BootSuccess", "BootFailure"})
ADMINS = frozenset({"CheckNow", "Install", "Rollback", "Hold", "Unhold", "Unmark"})
#: WatchActivity sends at most this many replies a second.
WATCH_MAX_RATE = 10.0


class BootOperations(Protocol):
    """The boot protocol, as the socket needs it (``service.boot.BootKeeper``)."""

    async def target(self) -> tuple[Build, Path]: ...
    async def start(self, build: Build | None, pid: int | None) -> tuple[Build, Path]: ...
    async def success(self, build: Build | None) -> Build: ...
    async def failure(self, build: Build | None, reason: str | None) -> Build: ...


class Operations(Protocol):
    """Everything the socket API needs from the daemon, and nothing more."""

    @property
    def config(self) -> Config: ...
    @property
    def board(self) -> ActivityBoard: ...
    @property
    def boot(self) -> BootOperations: ...
    def status(self) -> dict[str, Any]: ...
    def hold_info(self) -> dict[str, Any] | None: ...
    def metrics_text(self) -> str: ...
    async def check_now(self) -> Decision: ...
    async def install(self, path: Path, hold: bool = False) -> Build: ...
    async def rollback(self) -> Build: ...
    async def hold(self, reason: str) -> dict[str, Any]: ...
    async def unhold(self) -> dict[str, Any] | None: ...
    async def unmark(self, build: Build) -> None: ...


@functools.lru_cache(maxsize=512)
def _user_name(uid: int) -> str | None:
    """Cached: a flood of connections must not mean a flood of passwd lookups."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def privileged(uid: int, reporters: tuple[str, ...], admins: tuple[str, ...],
               own_uid: int) -> bool:
    """Peers whose connections the socket keeps room for: root, the daemon's user,
    boot reporters and admins. A boot report must get through a flood by anyone else,
    or a boot timeout would fire because the daemon could not accept the report."""
    if uid in (0, own_uid):
        return True
    name = _user_name(uid)
    return name is not None and (name in reporters or name in admins)


def authorized(method: str, uid: int, reporters: tuple[str, ...], admins: tuple[str, ...],
               own_uid: int) -> bool:
    """Reads for anyone on the socket; boots for reporters; changes for admins.

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


def _socket_error(exc: PatchdError) -> VarlinkError:
    return VarlinkError(*to_socket_error(exc))


Handler = Callable[["UpdaterApi", Call], Awaitable[dict[str, Any]]]


def _answers_errors(handler: Handler) -> Handler:
    """patchd's errors leave the handler as the interface error the table names."""

    @functools.wraps(handler)
    async def wrapper(self: UpdaterApi, call: Call) -> dict[str, Any]:
        try:
            return await handler(self, call)
        except PatchdError as exc:
            raise _socket_error(exc) from None

    return wrapper


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


class UpdaterApi:
    """Handlers of io.patchd.Updater for one daemon."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def __repr__(self) -> str:
        return f"<UpdaterApi {self.ops!r}>"

    def methods(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("GetStatus", "GetMetrics", "GetBootTarget", "BootStart", "BootSuccess",
                 "BootFailure", "CheckNow", "Install", "Rollback", "Hold", "Unhold", "Unmark",
                 "WatchActivity")}

    def authorize(self, method: str, peer: PeerCred) -> bool:
        cfg = self.ops.config
        if not authorized(method, peer.uid, cfg.boot.reporters, cfg.api.admins, os.geteuid()):
            log.warning("api.not_authorized", method=method, uid=peer.uid, pid=peer.pid)
            raise _socket_error(NotAuthorized(method))
        if method.rpartition(".")[2] in ADMINS:  # who changed what: one line per call
            log.info("api.admin_call", method=method, uid=peer.uid, pid=peer.pid)
        return True

    @_answers_errors
    async def GetStatus(self, call: Call) -> dict[str, Any]:
        return self.ops.status()

    @_answers_errors
    async def GetMetrics(self, call: Call) -> dict[str, Any]:
        return {"text": self.ops.metrics_text()}

    @_answers_errors
    async def GetBootTarget(self, call: Call) -> dict[str, Any]:
        build, path = await self.ops.boot.target()
        return {"build": build.to_json(), "path": str(path)}

    @_answers_errors
    async def BootStart(self, call: Call) -> dict[str, Any]:
        build = build_param(call)
        pid = call.parameters.get("pid")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)
                                or not 0 < pid <= process.PID_MAX):
            raise InvalidParameter("pid")
        booted, path = await self.ops.boot.start(build, pid)
        return {"build": booted.to_json(), "path": str(path)}

    @_answers_errors
    async def BootSuccess(self, call: Call) -> dict[str, Any]:
        await self.ops.boot.success(build_param(call))
        return {}

    @_answers_errors
    async def BootFailure(self, call: Call) -> dict[str, Any]:
        build = build_param(call)
        reason = call.parameters.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InvalidParameter("reason")
        await self.ops.boot.failure(build, reason)
        return {}

    @_answers_errors
    async def CheckNow(self, call: Call) -> dict[str, Any]:
        decision = await self.ops.check_now()
        reply: dict[str, Any] = {"strategy": decision.kind,
                                 "build": decision.build.to_json() if decision.build else None}
        if self.ops.hold_info() is not None:
            reply["held"] = True  # optional: absent when the decision is carried out
        return reply

    @_answers_errors
    async def Install(self, call: Call) -> dict[str, Any]:
        index, path = call.parameters.get("fd"), call.parameters.get("path")
        hold = call.parameters.get("hold")
        if hold is not None and not isinstance(hold, bool):
            raise InvalidParameter("hold")
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or \
                    not 0 <= index < len(call.fds) or path is not None:
                raise InvalidParameter("fd")
            cfg = self.ops.config
            received = await anyio.to_thread.run_sync(
                receive_bundle, call.fds[index], cfg.paths.cache_dir, cfg.install.min_free)
            try:
                build = await self.ops.install(received, bool(hold))
            finally:
                await anyio.to_thread.run_sync(functools.partial(received.unlink, missing_ok=True))
            return {"build": build.to_json()}
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidParameter("path")
        build = await self.ops.install(Path(path), bool(hold))
        return {"build": build.to_json()}

    @_answers_errors
    async def Rollback(self, call: Call) -> dict[str, Any]:
        build = await self.ops.rollback()
        return {"build": build.to_json()}

    @_answers_errors
    async def Hold(self, call: Call) -> dict[str, Any]:
        reason = call.parameters.get("reason")
        if reason is None:
            reason = ""
        # One printable line, bounded: it is echoed in status, STATUS= and the journal.
        if not isinstance(reason, str) or len(reason) > MAX_HOLD_REASON \
                or not reason.isprintable():
            raise InvalidParameter("reason")
        return {"hold": await self.ops.hold(reason)}

    @_answers_errors
    async def Unhold(self, call: Call) -> dict[str, Any]:
        return {"lifted": await self.ops.unhold()}

    @_answers_errors
    async def Unmark(self, call: Call) -> dict[str, Any]:
        build = build_param(call, required=True)
        assert build is not None
        await self.ops.unmark(build)
        return {}

    async def WatchActivity(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        board = self.ops.board
        version, activity = board.version, board.current
        yield {"activity": activity.to_json()}
        if not call.more:
            return
        while True:
            version, activity = await board.wait_change(version)
            yield {"activity": activity.to_json()}
            await anyio.sleep(1 / WATCH_MAX_RATE)  # coalesce bursts of progress


async def serve_api(ops: Operations, *,
                    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the daemon's socket; ``started`` once it listens."""
    api = UpdaterApi(ops)
    # An unexpected failure in a handler is answered with a declared error (so clients
    # generated from the interface recognise it), not org.varlink.service's.
    internal_name, internal_parameters = INTERNAL_ERROR
    service = VarlinkService(vendor="patchd", product="patchd", version=__version__,
                             url="https://github.com/patchd/patchd", authorize=api.authorize,
                             internal_error=f"{INTERFACE_NAME}.{internal_name}",
                             internal_error_parameters=internal_parameters)
    service.add_interface(INTERFACE_NAME, INTERFACE_TEXT, api.methods(), requires_more=())
    cfg = ops.config
    cfg.paths.socket.parent.mkdir(parents=True, exist_ok=True)
    # The judgement preflight warned with at start; None and False both fall back.
    group = cfg.api.socket_group if socket_group_usable(cfg.api.socket_group) else None
    if group is None:
        log.warning("api.socket_group_unusable", group=cfg.api.socket_group,
                    effect="socket keeps the daemon's group",
                    hint="create the group and make the daemon's user a member (e.g. "
                         "SupplementaryGroups= in the unit), or run as root")
    def is_privileged(peer: PeerCred) -> bool:
        now = ops.config
        return privileged(peer.uid, now.boot.reporters, now.api.admins, os.geteuid())

    server = VarlinkServer(service, cfg.paths.socket, mode=0o660, group=group,
                           limits=socket_limits(), privileged=is_privileged)
    try:
        await server.serve(task_status=task_status)
    except AddressInUse as exc:
        hint = "; is patchd already running?" if exc.live else ""
        raise SocketInUse(f"{exc}{hint}") from exc


def socket_limits() -> Limits:
    """The socket's limits: as many connections as the descriptor limit leaves room for
    (the daemon raised it to the hard limit at start), at most 1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - 128 if soft != resource.RLIM_INFINITY else 1024
    return Limits(max_connections=max(64, min(1024, room)))
