"""Start-up failures end in one clear line and the right exit code, not an internal error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.daemon import DaemonProcess, Publisher, write_tree


def test_a_second_daemon_on_a_live_socket_exits_2_in_one_line(tmp_path: Path) -> None:
    """A second ``patchd run`` whose socket a live daemon serves exits 2, saying the socket
    is taken and asking whether patchd already runs (SocketInUse raised inside the task
    group reaches the CLI unwrapped)."""
    release = write_tree(tmp_path / "release", {"bin/app": "#!/bin/sh\n"}, version="1.0")
    publisher = Publisher(tmp_path, tmp_path / "repo")
    url = f"file://{tmp_path}/repo/manifest.json"
    first = DaemonProcess(tmp_path / "a", manifest_url=url, keys=[publisher.public],
                          release_dir=release)
    second = DaemonProcess(tmp_path / "b", manifest_url=url, keys=[publisher.public],
                           release_dir=release)
    try:
        first.start()
        second.socket = first.socket
        second.write_config(url, [publisher.public])
        proc = subprocess.run([sys.executable, "-m", "patchd", "run", "--config",
                               str(second.config_path)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("patchd: ")]
        assert len(lines) == 1, proc.stderr
        assert str(first.socket) in lines[0] and "already running" in lines[0], lines[0]
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
        assert first.status()["app"]  # the first daemon kept serving
    finally:
        second.close()
        first.close()
