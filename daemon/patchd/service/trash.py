"""The daemon's side of the lifecycle's trash (``state/trash.py``): deleting trees.

Transitions only rename what they drop into ``builds/.trash-*``; the deletion itself
takes seconds for a big tree, and must hold neither the lifecycle's lock (``GetStatus``
takes it on the event loop) nor the event loop (watchdog pings, the socket). The
:class:`TrashCollector` owns the trash for the daemon's lifetime and deletes it in a
worker thread, from a task of the daemon's task group.

The wake-up is an eventfd: a transition may queue trash from the event loop or from a
worker thread that holds the lifecycle's lock, so it must neither block nor need the
event loop; writing to an eventfd does neither, and the task waits for it to become
readable. Whatever is still queued when the daemon stops, or when it is killed, is
deleted by the start-up sweep.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import structlog

from patchd.state import Trash

__all__ = ["TrashCollector"]

log = structlog.get_logger("patchd.service.trash")


class TrashCollector:
    """Owns ``trash`` from construction to :meth:`close`; :meth:`run` empties it."""

    def __init__(self, trash: Trash) -> None:
        self._trash = trash
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        trash.set_owner(self._poke)

    def __repr__(self) -> str:
        return f"<TrashCollector {self._trash!r}>"

    def _poke(self) -> None:
        """Called by the trash, from any thread: never blocks (the counter saturating
        would need 2**64 - 1 pokes unread, and a poke already pending is enough)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self._wake, 1)

    async def run(self) -> None:
        """Delete queued trash in a worker thread each time some arrives; forever."""
        while True:
            # Reset the wake-up before emptying: trash queued while a tree is being
            # deleted pokes again and is taken in the next round.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
            count = await anyio.to_thread.run_sync(self._trash.empty)
            if count:
                log.debug("trash.emptied", paths=count)
            await anyio.wait_readable(self._wake)

    def close(self) -> None:
        """Give the trash back (the lifecycle deletes it itself again), then close the
        eventfd: once ``set_owner`` returns, no thread pokes it any more."""
        self._trash.set_owner(None)
        os.close(self._wake)
