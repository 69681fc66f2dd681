"""``patchd install`` passes the bundle as an open file descriptor (#16).

The service's ``/tmp`` is private, and its user may not read the operator's files: the
CLI opens the file as its caller and passes the descriptor over the socket
(SCM_RIGHTS). Here the daemon runs in its own mount namespace with a private tmpfs over
the directory holding the bundle, as ``PrivateTmp=`` does to ``/tmp``.
"""

from __future__ import annotations

import array
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.service.interface import INTERFACE_NAME
from patchd.varlink import VarlinkClient, VarlinkError
from support.cli import run_patchd
from support.env import Env, R, b, local_env

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="a private mount namespace needs root and unshare")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with local_env(tmp_path) as e:
        yield e


def _open_fds(pid: int) -> list[str]:
    """The pipes and sockets the daemon holds open (the kinds this test passes it; the
    config watcher's inotify and eventfds come and go on their own)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("pipe:", "socket:")):
            out.append(target)
    return sorted(out)


@needs_root
def test_install_of_a_file_the_daemon_cannot_see(env: Env) -> None:
    private = env.tmp / "private"
    private.mkdir()
    d = env.daemon(start=False)
    # The daemon's view of `private` is an empty tmpfs: a path there means nothing to it.
    d.wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private)]
    d.start()
    bundle = private / "kiosk-1.4.0+1.patchd"
    shutil.copy(env.patch(1), bundle)
    with pytest.raises(VarlinkError) as info:
        d.call("Install", {"path": str(bundle)})  # what the CLI sent before
    assert "No such file" in info.value.parameters["reason"]

    proc = run_patchd("install", str(bundle), "--socket", str(d.socket))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "installed 1.4.0+1; it boots at the next start\n"
    assert d.status()["next_boot"] == b(1)
    assert not list(d.cache_dir.glob("incoming-*"))  # the private copy is gone


def test_passed_descriptors_are_checked_and_never_leak(env: Env) -> None:
    d = env.daemon()
    assert d.proc is not None
    before = _open_fds(d.proc.pid)
    method = f"{INTERFACE_NAME}.Install"
    read_end, write_end = os.pipe()
    try:
        with VarlinkClient(d.socket, timeout=30) as client:
            with pytest.raises(VarlinkError) as info:  # a FIFO could block a worker forever
                client.call(method, {"fd": 0}, fds=(read_end,))
            assert info.value.name.endswith("InvalidBundle")
            assert "not a regular file" in info.value.parameters["reason"]
            with pytest.raises(VarlinkError) as info:
                client.call(method, {"fd": 1}, fds=(read_end,))
            assert info.value.parameters == {"parameter": "fd"}
            with pytest.raises(VarlinkError) as info:
                client.call(method, {"fd": 0})  # an index but no descriptor
            assert info.value.parameters == {"parameter": "fd"}
        # Descriptors sent with a call that does not use them are closed too.
        with VarlinkClient(d.socket, timeout=30) as client:
            assert client.call(f"{INTERFACE_NAME}.GetStatus", {}, fds=(read_end, write_end))
        # Five descriptors on one call: the connection ends, and all five are closed.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(str(d.socket))
            raw.sendmsg([b'{"method":"io.patchd.Updater.GetStatus"}\0'],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          array.array("i", [read_end] * 5))])
            raw.settimeout(10)
            assert raw.recv(65536) == b""
        d.wait_log("varlink.connection_dropped")  # fds_truncated: room for 4 only
    finally:
        os.close(read_end)
        os.close(write_end)
    # The daemon notices each closed connection a moment after the client closed it.
    deadline = time.monotonic() + 10
    while (now := _open_fds(d.proc.pid)) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now == before, (before, now)
    proc = run_patchd("install", str(env.patch(2)), "--socket", str(d.socket))
    assert proc.returncode == 0, proc.stderr
    assert d.status()["next_boot"] == {"release": R, "patch": 2}
