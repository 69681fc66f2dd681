"""Every background task of the daemon runs supervised: a failure is one task's, never
the daemon's.

An unexpected exception in the poll loop, the event sender, the watchdog, the config
watcher or the signal handler would otherwise end the daemon's task group, and with it
the socket and the boot protocol: a host's boot would time out because of, say, a
broken event collector. :func:`supervised` logs the failure once with its class and
traceback and starts the task again after a backoff (5 s doubling, at most 5 min; reset
once a run has lasted a minute). Cancellation (the daemon stopping) is not a failure.

``PATCHD_TASK_FAULT=name,…`` (tests only) raises one ``RuntimeError`` in each named
task as it first starts, so the restart path is proven on the real process; the name
``check`` raises it in the first check instead (:func:`take_fault`), proving that an
unforeseen exception in a check is logged once and recorded.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import anyio
import structlog

from patchd.service.schedule import backoff_delay

__all__ = ["MAX_RESTART_DELAY", "supervised", "take_fault"]

log = structlog.get_logger("patchd.service.supervise")

#: The longest wait before a failed task starts again.
MAX_RESTART_DELAY = 300.0
#: A run that lasted this long resets the backoff.
HEALTHY_RUN = 60.0

_INJECTED = {name for name in os.environ.get("PATCHD_TASK_FAULT", "").split(",") if name}


def take_fault(name: str) -> None:
    """Raise the injected fault for ``name`` once, if ``PATCHD_TASK_FAULT`` names it."""
    if name in _INJECTED:
        _INJECTED.discard(name)
        raise RuntimeError(f"fault injected into {name} (PATCHD_TASK_FAULT)")


async def supervised(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run ``task()`` until it returns; restart it with backoff whenever it raises."""
    failures = 0
    while True:
        started = anyio.current_time()
        try:
            take_fault(name)
            await task()
            return
        except Exception as exc:
            failures = 1 if anyio.current_time() - started >= HEALTHY_RUN else failures + 1
            delay = backoff_delay(failures, MAX_RESTART_DELAY)
            log.error("task.failed", task=name, error=str(exc), error_class=type(exc).__name__,
                      failures=failures, restart_in=round(delay, 1), exc_info=exc)
        await anyio.sleep(delay)
        log.warning("task.restarted", task=name, failures=failures)
