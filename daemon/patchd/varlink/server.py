"""The server: one listening socket, one task per client, caps on how many.

Accepting is kept apart from serving a connection (``connection.py``) because its
failures are different: running out of descriptors must pause accepting while the
clients already connected go on being served. Who may connect is decided at accept
time from the peer's credentials: one unprivileged uid may hold ``max_per_uid``
connections, unprivileged peers together all but ``reserved`` of
``max_connections``, so a flood by one local user never keeps out the peers the
service says are privileged (``privileged``: for patchd, root, admins and boot
reporters). Refusals are counted and logged at most once a second.
"""

from __future__ import annotations

import errno
import grp
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.lowlevel import checkpoint

from .connection import Budget, Limits, serve_connection
from .message import PeerCred
from .service import VarlinkService
from .socket_file import bind_unix_socket, unlink_if_same

log = structlog.get_logger(__name__)

_ACCEPT_RETRY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EINTR}
)
_DEFAULT_LIMITS: Final = Limits()


def _group_id(name: str | None) -> int | None:
    """The gid of group ``name``; LookupError naming it when there is no such group."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LookupError(f"socket group {name!r} does not exist") from None


class VarlinkServer:
    """Listens on a Unix socket and serves one ``VarlinkService`` to many clients.

    Each connection runs in its own task of the server's task group; the count of
    open connections is ``connections`` (tests and the watchdog read it).

    ``serve`` raises ``AddressInUse`` when the path is taken by a live server or by
    something that is not a socket (a stale socket file is replaced), ``LookupError``
    for a ``group`` that does not exist and ``PermissionError`` when this process may
    not give the socket to it.
    """

    def __init__(
        self,
        service: VarlinkService,
        path: Path,
        *,
        mode: int = 0o660,
        group: str | None = None,
        limits: Limits = _DEFAULT_LIMITS,
        privileged: Callable[[PeerCred], bool] = lambda peer: peer.uid == 0,
    ) -> None:
        self.service = service
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.limits = limits
        self.privileged = privileged
        self.connections = 0
        self.refused = 0
        self._unprivileged = 0
        self._per_uid: dict[int, int] = {}
        self._budget = Budget(limits.max_buffered)
        self._logged_at = -1.0
        self._changed: anyio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"VarlinkServer({str(self.path)!r}, connections={self.connections}, "
            f"refused={self.refused})"
        )

    async def wait_connections(self, predicate: Callable[[int], bool]) -> None:
        """Wait until ``predicate(open connections)`` holds (for draining and tests)."""
        while not predicate(self.connections):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _count(self, delta: int) -> None:
        self.connections += delta
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started once listening, and serve until cancelled."""
        gid = _group_id(self.group)
        sock, identity = await anyio.to_thread.run_sync(bind_unix_socket, self.path, self.mode, gid)
        log.info("varlink.listening", path=str(self.path), mode=f"{self.mode:04o}",
                 group=self.group)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                await self._accept_loop(sock, tg)
        finally:
            sock.close()
            unlink_if_same(self.path, identity)

    async def _accept_loop(self, listener: socket.socket, tg: TaskGroup) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                await anyio.wait_readable(listener)
                continue
            except OSError as exc:
                # Out of descriptors or memory: connections already open keep being
                # served; give them a moment to finish before accepting again. Any
                # other failure is logged too: the listener must outlive it.
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("varlink.accept_failed", error=str(exc))
                else:
                    log.error("varlink.accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            await checkpoint()
            try:
                peer = PeerCred.of(client)
                privileged = self.privileged(peer)
            except Exception:  # a peer gone already, or a policy that failed: not privileged
                log.exception("varlink.peer_unknown")
                client.close()
                continue
            reason = self._refusal(peer, privileged)
            if reason is not None:
                self._refuse(client, peer, reason)
                continue
            client.setblocking(False)
            self._count(+1)
            if not privileged:
                self._unprivileged += 1
                self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            tg.start_soon(self._connection, client, peer, privileged)

    def _refusal(self, peer: PeerCred, privileged: bool) -> str | None:
        """Why this peer may not have another connection now, or None."""
        limits = self.limits
        if self.connections >= limits.max_connections:
            return "too_many_connections"
        if privileged:
            return None
        if self._unprivileged >= limits.max_connections - limits.reserved:
            return "reserved_for_privileged"
        if self._per_uid.get(peer.uid, 0) >= limits.max_per_uid:
            return "too_many_for_uid"
        return None

    def _refuse(self, client: socket.socket, peer: PeerCred, reason: str) -> None:
        """Close at once; log at most once a second (a flood must not flood the log)."""
        client.close()
        self.refused += 1
        now = anyio.current_time()
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            log.warning("varlink.connection_refused", reason=reason, uid=peer.uid,
                        open=self.connections, refused=self.refused)

    async def _connection(self, sock: socket.socket, peer: PeerCred, privileged: bool) -> None:
        try:
            await serve_connection(self.service, sock, self.limits, peer,
                                   None if privileged else self._budget)
        finally:
            self._count(-1)
            if not privileged:
                self._unprivileged -= 1
                left = self._per_uid[peer.uid] - 1
                if left:
                    self._per_uid[peer.uid] = left
                else:
                    del self._per_uid[peer.uid]
            sock.close()
