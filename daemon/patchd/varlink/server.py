"""The server: one listening socket, one task per client, a cap on how many.

Accepting is kept apart from serving a connection (``connection.py``) because its
failures are different: running out of descriptors must pause accepting while the
clients already connected go on being served.
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

from .connection import Limits, serve_connection
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
    ) -> None:
        self.service = service
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.limits = limits
        self.connections = 0
        self.refused = 0
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
        log.info("varlink.listening", path=str(self.path), mode=oct(self.mode), group=self.group)
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
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                # Out of descriptors or memory: connections already open keep being
                # served; give them a moment to finish before accepting again.
                log.warning("varlink.accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            await checkpoint()
            if self.connections >= self.limits.max_connections:
                self.refused += 1
                log.warning(
                    "varlink.connection_refused",
                    reason="too_many_connections",
                    open=self.connections,
                    refused=self.refused,
                )
                client.close()
                continue
            client.setblocking(False)
            self._count(+1)
            tg.start_soon(self._connection, client)

    async def _connection(self, sock: socket.socket) -> None:
        try:
            await serve_connection(self.service, sock, self.limits)
        finally:
            self._count(-1)
            sock.close()
