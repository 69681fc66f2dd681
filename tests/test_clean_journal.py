"""A client hanging up on a stream is a normal flow: the daemon logs it at info level,
never an error with a traceback (operators alert on ``journalctl -p err``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from support.daemon import DaemonProcess, Publisher, write_tree


def _error_lines(log: str) -> list[str]:
    lines = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "critical"):
            lines.append(line)
    return lines


def test_hanging_up_on_watch_activity_logs_no_error(tmp_path: Path) -> None:
    """WatchActivity with more, then the client closes: the stream ends as
    ``hangup_during_stream`` at info level and no error-level line is logged."""
    release = write_tree(tmp_path / "release", {"bin/app": "#!/bin/sh\n"}, version="1.0")
    publisher = Publisher(tmp_path, tmp_path / "repo")
    d = DaemonProcess(tmp_path / "d", manifest_url=f"file://{tmp_path}/repo/manifest.json",
                      keys=[publisher.public], release_dir=release)
    try:
        d.start()
        for _ in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(d.socket))
                s.sendall(json.dumps({"method": "io.patchd.Updater.WatchActivity",
                                      "parameters": {}, "more": True}).encode() + b"\0")
                first = s.recv(65536)
                assert b'"activity"' in first and b'"continues":true' in first.replace(b" ", b"")
        d.wait_log("hangup_during_stream")
        assert d.status()["app"]  # still serving
        assert _error_lines(d.log()) == []
    finally:
        d.close()
