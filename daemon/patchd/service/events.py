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

import httpx
import structlog

from patchd.core.errors import NetworkError, ServerError
from patchd.core.fsio import atomic_write_json, read_json
from patchd.core.model import Build, utc_now_text

log = structlog.get_logger("patchd.service.events")

MAX_EVENTS = 1000
BATCH = 100
TYPES = ("download", "install", "install_failure", "boot_success", "boot_failure", "rollback")


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


async def send_pending(queue: EventQueue, client: httpx.AsyncClient, url: str) -> int:
    """POST queued events in order, in batches; returns how many were delivered.

    Stops at the first failure (raising a TransientError) so the order is kept and the
    caller's backoff decides when to try again.
    """
    delivered = 0
    while batch := queue.peek():
        try:
            response = await client.post(url, json={"events": batch})
        except httpx.HTTPError as exc:
            raise NetworkError(f"sending events to {url}: {exc}") from exc
        if response.status_code >= 300:
            raise ServerError(f"event collector {url} answered {response.status_code}",
                              status=response.status_code)
        queue.ack(batch)
        delivered += len(batch)
    if delivered:
        log.info("events.sent", count=delivered, url=url)
    return delivered
