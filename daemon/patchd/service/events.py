"""The durable queue of events for the server (docs/lifecycle.md) and the batch sender.

Events record what happened on the host (installs, boots, rollbacks) for a fleet view.
They must survive restarts and network outages, yet never grow without bound: the
queue keeps at most ``MAX_EVENTS`` and counts what it had to drop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from patchd.core.errors import NetworkError, ServerError
from patchd.core.fsio import atomic_write_json, read_json
from patchd.core.model import Build, utc_now_text

log = structlog.get_logger("patchd.service.events")

MAX_EVENTS = 1000
BATCH = 100
#: The most of a collector's answer that is read (raw bytes, never decoded).
MAX_RESPONSE = 64 * 1024
#: Seconds one POST may take, answer included, whatever the collector trickles.
SEND_DEADLINE = 30.0
TYPES = ("download", "install", "install_failure", "boot_success", "boot_failure", "rollback",
         "hold", "unhold", "unmark")


class EventQueue:
    """``events.json``: ``{"events": [...], "dropped": N}``, rewritten atomically on change."""

    def __init__(self, path: Path, *, app: str, channel: str,
                 client_id: Callable[[], str], limit: int = MAX_EVENTS) -> None:
        self.path = path
        self.app = app
        self.channel = channel
        self._client_id = client_id
        self.limit = limit
        self._lock = threading.Lock()
        #: Called with each event queued (type, build, message): the daemon's metrics.
        self.listeners: list[Callable[[str, Build | None, str], None]] = []
        doc = read_json(path)
        events = doc.get("events") if isinstance(doc, dict) else None
        self._events: list[dict[str, Any]] = [
            e for e in (events if isinstance(events, list) else []) if isinstance(e, dict)
        ][-limit:]
        dropped = doc.get("dropped", 0) if isinstance(doc, dict) else 0
        self.dropped: int = dropped if isinstance(dropped, int) else 0

    def __repr__(self) -> str:
        return f"<EventQueue {len(self._events)} queued, {self.dropped} dropped>"

    def __len__(self) -> int:
        return len(self._events)

    def add(self, type_: str, build: Build | None, message: str = "") -> None:
        """Queue one event durably; the oldest go when the bound is reached."""
        if type_ not in TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        event = {"type": type_, "client_id": self._client_id(), "app": self.app,
                 "channel": self.channel, "release": build.release if build else None,
                 "patch": build.patch if build else None, "time": utc_now_text(),
                 "message": message}
        with self._lock:
            self._events.append(event)
            overflow = len(self._events) - self.limit
            if overflow > 0:
                del self._events[:overflow]
                self.dropped += overflow
            self._save()
        for listener in self.listeners:
            listener(type_, build, message)

    def peek(self, n: int = BATCH) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events[:n])

    def ack(self, sent: list[dict[str, Any]]) -> None:
        """Remove events the server accepted (they are still the oldest ones)."""
        with self._lock:
            count = 0
            while count < len(sent) and count < len(self._events) and \
                    self._events[count] == sent[count]:
                count += 1
            del self._events[:count]
            self._save()

    def _save(self) -> None:
        atomic_write_json(self.path, {"events": self._events, "dropped": self.dropped})


async def send_pending(queue: EventQueue, client: httpx.AsyncClient, url: str,
                       deadline: float = SEND_DEADLINE) -> int:
    """POST queued events in order, in batches; returns how many were delivered.

    Stops at the first failure (raising a TransientError) so the order is kept and the
    caller's backoff decides when to try again.
    """
    delivered = 0
    while batch := queue.peek():
        status = await _post(client, url, batch, deadline)
        if status >= 300:
            raise ServerError(f"event collector {url} answered {status}", status=status)
        queue.ack(batch)
        delivered += len(batch)
    if delivered:
        log.info("events.sent", count=delivered, url=url)
    return delivered


async def _post(client: httpx.AsyncClient, url: str, batch: list[dict[str, Any]],
                deadline: float) -> int:
    """One POST; its status. The answer is streamed raw (a gzip bomb stays compressed),
    at most ``MAX_RESPONSE`` bytes of it, and the whole exchange has one deadline, so a
    hostile collector costs at most 64 KiB and ``deadline`` seconds."""
    try:
        with anyio.fail_after(deadline):
            async with client.stream("POST", url, json={"events": batch},
                                     headers={"Accept-Encoding": "identity"}) as response:
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        raise NetworkError(f"event collector {url} answered more than "
                                           f"{MAX_RESPONSE // 1024} KiB; stopped reading")
                return response.status_code
    except TimeoutError as exc:
        raise NetworkError(f"event collector {url} did not answer within {deadline:g} s"
                           ) from exc
    except httpx.HTTPError as exc:
        raise NetworkError(f"sending events to {url}: {exc}") from exc
