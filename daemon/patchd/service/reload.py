"""Reading the config file again: on SIGHUP and when the file watcher sees it change.

One change is handled once: editing the file and then ``systemctl reload`` (SIGHUP)
both trigger, in either order. The watcher skips a file already read (``trigger=
"start"`` is its silent look just after start); a SIGHUP always reads (files the config
names may have changed). An invalid file is logged and the old config kept; a file that
failed already is not reported at error level again. What a valid new config changes
in the running daemon is the daemon's business (the ``apply`` callback).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskGroup

from patchd.config import Config, load_config
from patchd.core.errors import ConfigError
from patchd.host.systemd import Notifier

__all__ = ["ConfigReloader", "Trigger"]

log = structlog.get_logger("patchd.service.daemon")

Trigger = Literal["signal", "watch", "start"]

#: ``apply(new, trigger)``: put a valid config in effect (or log that nothing changed).
Apply = Callable[[Config, Trigger], Awaitable[None]]


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigReloader:
    """The config file's reader after start: the watcher task, SIGHUP, each change once."""

    def __init__(self, path: Path, current: Callable[[], Config], apply: Apply,
                 notifier: Notifier) -> None:
        self.path = path
        self._current = current
        self._apply = apply
        self._notifier = notifier
        #: The file as last read (start or reload): a change the watcher reports that a
        #: SIGHUP already read, or the reverse, is handled once.
        self._signature = _file_signature(path)
        self._failed = False
        self._lock = anyio.Lock()
        #: Set to end the watcher: it blocks a worker thread, and cancellation alone
        #: would wait out its timeout; the stop event ends it within one step.
        self.stop = anyio.Event()

    def __repr__(self) -> str:
        return f"<ConfigReloader {self.path} failed={self._failed}>"

    async def watch(self, tg: TaskGroup) -> None:
        """Reload each time the file changes, until :attr:`stop` is set."""
        import watchfiles

        target = self.path.resolve()

        def only_config(change: Any, path: str) -> bool:
            return Path(path) == target

        async def catch_early_edit() -> None:
            # The watch is set up asynchronously after READY=1; an edit made in that
            # window would go unseen, so compare the file once the watch surely runs.
            await anyio.sleep(1)
            await self.reload("start")

        tg.start_soon(catch_early_edit)
        async for _changes in watchfiles.awatch(target.parent, watch_filter=only_config,
                                                debounce=200, step=50, recursive=False,
                                                stop_event=self.stop):
            await self.reload("watch")

    async def reload(self, trigger: Trigger = "signal") -> None:
        """Read the file if it changed (always on a signal), RELOADING=1 … READY=1 around
        it; each outcome is logged with its trigger."""
        async with self._lock:
            signature = _file_signature(self.path)
            if trigger != "signal" and signature == self._signature:
                (log.info if trigger == "watch" else log.debug)(
                    "config.unchanged", trigger=trigger)
                return
            self._notifier.reloading()
            try:
                await self._read(signature, trigger)
            finally:
                self._notifier.ready()

    async def _read(self, signature: tuple[int, int, int] | None, trigger: Trigger) -> None:
        seen_before, self._signature = signature == self._signature, signature
        try:
            new = await anyio.to_thread.run_sync(load_config, self.path)
        except ConfigError as exc:
            kept = self._current().source
            if seen_before and self._failed:
                log.warning("config.still_invalid", error=str(exc), kept=kept, trigger=trigger)
            else:
                log.error("config.reload_failed", error=str(exc), kept=kept, trigger=trigger)
            self._failed = True
            return
        self._failed = False
        await self._apply(new, trigger)
