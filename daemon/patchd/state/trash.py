"""Trees on their way out: moved aside under the lifecycle's lock, removed outside it.

A build's tree holds thousands of files; deleting it takes seconds. Transitions run
under the lifecycle's lock, some of them on the event loop, and ``GetStatus`` takes the
same lock on the event loop: a deletion inside a transition would stall the socket and
the watchdog for as long as it runs. So a transition only *moves* what it drops: one
rename into ``builds/.trash-<hex>`` (same file system, so atomic; both directories
fsynced, so durable), and the files are deleted later, by whoever owns the trash:

- an owner (the daemon) registers a wake-up with :meth:`Trash.set_owner` and calls
  :meth:`Trash.empty` from a worker thread of its own;
- without one (tests, tools that open the lifecycle directly) the lifecycle empties the
  trash itself right after its outermost locked call returns, so those callers find
  everything gone when the call returns, as before.

A crash at any instant leaves either the old name, which start-up repair handles as it
always did, or a ``.trash-`` name, which is not a release name: the start-up sweep
(``recovery._sweep``) queues every such entry under ``builds/`` here again, with the
trees it drops itself. ``Lifecycle.open`` deletes them before it returns, unless the
caller will own the trash (the daemon, so that it reports READY without waiting for
the deletions).
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from patchd.core import fsio
from patchd.state.layout import TRASH_PREFIX

__all__ = ["Trash"]

log = structlog.get_logger("patchd.state.trash")


class Trash:
    """The queue of paths moved into ``builds/.trash-*`` and not yet deleted.

    Thread-safe: transitions add from the event loop or a worker thread, the owner
    takes from another.
    """

    def __init__(self, builds: Path,
                 resisted: Callable[[Path, Path, OSError], None] | None = None) -> None:
        self.builds = builds
        self._mutex = threading.Lock()
        #: Each queued path, with where it came from (for :attr:`_resisted`'s name).
        self._queued: dict[Path, Path] = {}
        self._owner: Callable[[], None] | None = None
        #: ``resisted(path, origin, error)``: what to do with a path that cannot be
        #: deleted (a mount point inside it, an immutable file): start-up repair sets it
        #: aside under its original name. Without it, it stays for the next start.
        self._resisted = resisted

    def __repr__(self) -> str:
        return f"<Trash {self.builds} queued={len(self._queued)} owned={self.owned}>"

    @property
    def owned(self) -> bool:
        """Someone else empties the trash (else the lifecycle does, after each call)."""
        return self._owner is not None

    def set_owner(self, wake: Callable[[], None] | None) -> None:
        """Hand the deletions to an owner: ``wake()`` is called each time a path is
        queued, from any thread and possibly under the lifecycle's lock, so it must be
        quick and never block (the daemon writes to an eventfd). None takes them back.
        Once this returns, the previous ``wake`` is not running and is not called again,
        so its owner may release what it uses."""
        with self._mutex:
            self._owner = wake

    def move(self, path: Path) -> None:
        """Take ``path`` out of the layout in one durable rename and queue it.

        A directory goes to ``builds/.trash-<hex>``; anything else is unlinked in
        place (one unlink is quick). Where the rename is impossible (``path`` is on
        another file system, a mount point, immutable) it is removed in place as it
        always was, raising what that raises.
        """
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(mode):
            fsio.remove_tree(path)
            return
        dest = self.builds / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
        try:
            os.rename(path, dest)
        except OSError as exc:
            log.info("lifecycle.trash_refused", path=str(path), error=exc.strerror or str(exc))
            fsio.remove_tree(path)
            return
        # Durable both ways: the old name must not come back, the new one must stay
        # findable for the start-up sweep.
        fsio.fsync_dir(path.parent)
        if dest.parent != path.parent:
            fsio.fsync_dir(dest.parent)
        log.debug("lifecycle.trashed", path=str(path), trash=dest.name)
        with self._mutex:
            self._queued[dest] = path
            if self._owner is not None:
                try:
                    self._owner()
                except Exception as exc:  # the rename is on disk: the next wake or start-up
                    log.warning("lifecycle.trash_wake_failed", error=str(exc))

    def adopt(self, path: Path) -> None:
        """Queue a ``.trash-`` directory already on disk (one a crash or a stop left):
        the start-up sweep finds them, and the owner deletes them with the rest."""
        with self._mutex:
            self._queued[path] = path

    def take(self) -> list[Path]:
        """Every path queued so far, now the caller's to delete."""
        return [path for path, _origin in self._take()]

    def _take(self) -> list[tuple[Path, Path]]:
        with self._mutex:
            taken, self._queued = self._queued, {}
        return list(taken.items())

    def empty(self) -> int:
        """Delete everything queued; blocking, so never under the lifecycle's lock nor on
        the event loop. A path that resists goes to ``resisted`` (start-up repair sets
        it aside); without one it stays for the start-up sweep, with a warning.
        Returns how many paths were taken."""
        taken = self._take()
        for path, origin in taken:
            try:
                fsio.remove_tree(path)
            except OSError as exc:
                if self._resisted is not None:
                    self._resisted(path, origin, exc)
                else:
                    log.warning("lifecycle.trash_left", path=str(path),
                                error=exc.strerror or str(exc))
        return len(taken)
