"""Server events: a durable, bounded queue, delivered in order to a real collector."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from patchd.core.errors import NetworkError, ServerError
from patchd.core.model import Build
from patchd.service.events import EventQueue, send_pending
from support.daemon import DaemonProcess, Publisher, write_tree


class Collector:
    """A real HTTP server on 127.0.0.1 recording every POSTed batch."""

    def __init__(self, status: int = 200) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.status = status
        self.cond = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with collector.cond:
                    if collector.status == 200:
                        collector.batches.append(json.loads(body)["events"])
                    collector.cond.notify_all()
                self.send_response(collector.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for batch in self.batches for e in batch]

    def wait_events(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.events) >= count, timeout):
                raise AssertionError(f"collector got {self.events}, wanted {count}")
            return self.events

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def queue(tmp_path: Path, limit: int = 1000) -> EventQueue:
    return EventQueue(tmp_path / "events.json", app="kiosk", channel="stable",
                      client_id=lambda: "client-1", limit=limit)


def test_queue_is_durable_and_bounded(tmp_path: Path) -> None:
    """Events survive a reload; beyond the bound the oldest go and are counted."""
    q = queue(tmp_path, limit=5)
    for n in range(8):
        q.add("install", Build("1.0", n))
    again = queue(tmp_path, limit=5)
    assert len(again) == 5 and again.dropped == 3
    assert [e["patch"] for e in again.peek()] == [3, 4, 5, 6, 7]
    doc = json.loads((tmp_path / "events.json").read_text())
    assert doc["dropped"] == 3 and len(doc["events"]) == 5


def test_event_fields(tmp_path: Path) -> None:
    """Each event carries type, client_id, app, channel, release, patch, time and message."""
    q = queue(tmp_path)
    q.add("boot_failure", Build("1.4.0", 3), "boot_crash")
    (event,) = q.peek()
    assert set(event) == {"type", "client_id", "app", "channel", "release", "patch", "time",
                          "message"}
    assert (event["type"], event["release"], event["patch"]) == ("boot_failure", "1.4.0", 3)


@pytest.mark.anyio
async def test_send_in_order_in_batches_and_ack(tmp_path: Path, collector: Collector) -> None:
    """Pending events go out oldest first in batches of at most 100, then leave the queue."""
    q = queue(tmp_path)
    for n in range(250):
        q.add("download", Build("1.0", n + 1))
    async with httpx.AsyncClient() as client:
        assert await send_pending(q, client, collector.url) == 250
    assert [len(b) for b in collector.batches] == [100, 100, 50]
    assert [e["patch"] for e in collector.events] == list(range(1, 251))
    assert len(q) == 0


@pytest.mark.anyio
async def test_collector_down_keeps_events(tmp_path: Path, collector: Collector) -> None:
    """A refused connection or a 5xx keeps every event queued for the next attempt."""
    q = queue(tmp_path)
    q.add("install", Build("1.0", 1))
    async with httpx.AsyncClient() as client:
        with pytest.raises(NetworkError):
            await send_pending(q, client, "http://127.0.0.1:9/events")
        collector.status = 503
        with pytest.raises(ServerError):
            await send_pending(q, client, collector.url)
        assert len(queue(tmp_path)) == 1
        collector.status = 200
        assert await send_pending(q, client, collector.url) == 1


def test_daemon_delivers_events_and_keeps_them_while_collector_is_down(
        tmp_path: Path, collector: Collector) -> None:
    """The daemon POSTs download/install/boot events in order; while the collector is
    down they stay in events.json and arrive once it is back."""
    release = write_tree(tmp_path / "opt", {"a.txt": "a"}, version="1.0")
    repo = tmp_path / "repo"
    pub = Publisher(tmp_path, repo)
    target = write_tree(tmp_path / "t1", {"a.txt": "b", "VERSION": "1.0\n"})
    pub.publish(pub.bundle("1.0", 1, release, target))
    d = DaemonProcess(tmp_path / "d", manifest_url=str(repo / "manifest.json"),
                      keys=[pub.public], release_dir=release,
                      extra=f'[server]\nevents_url = "{collector.url}"\n')
    try:
        d.start()
        d.check_and_wait()
        events = collector.wait_events(2)
        assert [e["type"] for e in events[:2]] == ["download", "install"]
        collector.status = 503
        d.call("BootStart", {})
        d.call("BootSuccess", {})
        d.check_and_wait()  # a check triggers a send; it fails and keeps the event
        d.wait_log("events.send_failed")
        stored = json.loads((d.state_dir / "events.json").read_text())["events"]
        assert [e["type"] for e in stored] == ["boot_success"]
        collector.status = 200
        d.check_and_wait()
        events = collector.wait_events(3)
        assert [e["type"] for e in events] == ["download", "install", "boot_success"]
        assert all(e["client_id"] == events[0]["client_id"] for e in events)
    finally:
        d.close()
