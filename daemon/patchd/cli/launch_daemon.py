"""``patchd launch`` and the daemon: boot reports and the activity stream.

The launcher learns of a new build without polling: it follows WatchActivity, and
each time the daemon's activity returns to ``idle`` (an install or an update has
ended, promotion included) it bumps a :class:`Changes` counter, and whoever waits on
it reads the status once (``launch_activate.py``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import structlog

from patchd.cli.client import _client_error
from patchd.core.error_table import describe_socket_error
from patchd.service.interface import INTERFACE_NAME
from patchd.varlink import AsyncVarlinkClient, VarlinkError
from patchd.varlink import ClientError as VarlinkClientError

__all__ = ["Changes", "DaemonLink", "build_text"]

log = structlog.get_logger("patchd.cli.launch")

#: Seconds one call to the daemon may take.
CALL_TIMEOUT = 30.0
#: Longest wait between two reconnections of the activity stream.
MAX_BACKOFF = 30.0


def build_text(build: Any) -> str:
    if not isinstance(build, dict):
        return "none"
    return f"{build.get('release')}+{build.get('patch')}"


class Changes:
    """A counter the activity watcher bumps; waiters wake without polling."""

    def __init__(self) -> None:
        self.version = 0
        self._event = anyio.Event()

    def __repr__(self) -> str:
        return f"<Changes v{self.version}>"

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, seen: int) -> int:
        while self.version == seen:
            await self._event.wait()
        return self.version


class DaemonLink:
    """The daemon's socket, as the launcher uses it (async; errors as PatchdError)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __repr__(self) -> str:
        return f"<DaemonLink {self.socket}>"

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                async with await AsyncVarlinkClient.connect(self.socket) as client:
                    return await client.call(f"{INTERFACE_NAME}.{method}", params or {})
        except VarlinkError as exc:
            raise describe_socket_error(exc.name, exc.parameters) from None
        except VarlinkClientError as exc:
            raise _client_error(exc) from exc
        except TimeoutError as exc:
            raise _client_error(VarlinkClientError(
                f"no reply from {self.socket} within {CALL_TIMEOUT:g} s")) from exc

    async def watch(self, changes: Changes) -> None:
        """Follow WatchActivity for ever: bump ``changes`` at each (re)connection and
        each reply that says idle. A lost daemon is waited for (backoff), never an error."""
        backoff = 1.0
        while True:
            try:
                async with await AsyncVarlinkClient.connect(self.socket) as client:
                    # The first reply follows a (re)connection: anything may have changed
                    # meanwhile. Later ones come on changes only, and the daemon coalesces
                    # them, so a reply that says idle may be all we see of a short job.
                    async for reply in client.stream(f"{INTERFACE_NAME}.WatchActivity"):
                        backoff = 1.0
                        if reply.get("activity", {}).get("phase") == "idle":
                            changes.bump()
            except (VarlinkClientError, VarlinkError, OSError) as exc:
                log.info("launch.watch_lost", error=str(exc), retry_in=backoff)
            await anyio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(MAX_BACKOFF, backoff * 2)
