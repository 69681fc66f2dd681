"""A local user flooding the daemon's socket, from a child that setuid()s to that user.

The child starts as root (to raise its own descriptor limit), drops to the user, then
opens ``idle`` connections that say nothing and ``heavy`` connections that each send
``size`` bytes of a message that never ends; it prints ``ready`` and holds them all
until its stdin closes. ``HostileFlood`` is the context manager around it.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from pathlib import Path
from types import TracebackType

_CHILD = """\
import json, os, resource, socket, sys
path, uid, gid, idle, heavy, size = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (idle + heavy + 256, idle + heavy + 256))
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
held, refused = [], 0
for _ in range(idle):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    held.append(s)
chunk = b'{"method": "io.patchd.Updater.GetStatus", "parameters": {"x": "' + b"x" * size
for _ in range(heavy):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    try:
        s.send(chunk)
    except OSError:
        refused += 1
    held.append(s)
print(json.dumps({"held": len(held), "send_failed": refused}), flush=True)
sys.stdin.read()
"""


class HostileFlood:
    """``with HostileFlood(socket, "nobody", idle=1100):`` holds the flood inside."""

    def __init__(self, socket: Path, user: str, idle: int = 0, heavy: int = 0,
                 size: int = 1 << 20) -> None:
        entry = pwd.getpwnam(user)
        self.args = [str(socket), entry.pw_uid, entry.pw_gid, idle, heavy, size]
        self.proc: subprocess.Popen[str] | None = None
        self.report: dict[str, int] = {}

    def __enter__(self) -> HostileFlood:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(self.args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the child says when every connection is made
        assert line, f"the flood child died ({self.proc.wait()})"
        self.report = json.loads(line)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


_CALL = """\
import json, os, socket, sys
path, uid, gid, method = json.loads(sys.argv[1])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(json.dumps({"method": "io.patchd.Updater." + method, "parameters": {}}).encode() + b"\\0")
data = b""
while not data.endswith(b"\\0"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.rstrip(b"\\0").decode())
"""


def call_as(user: str, socket: Path, method: str) -> dict[str, object]:
    """One parameterless call by ``user`` (a setuid child); the raw varlink reply."""
    entry = pwd.getpwnam(user)
    proc = subprocess.run([sys.executable, "-c", _CALL,
                           json.dumps([str(socket), entry.pw_uid, entry.pw_gid, method])],
                          capture_output=True, text=True, timeout=30, cwd="/", check=True)
    reply: dict[str, object] = json.loads(proc.stdout)
    return reply
