"""A host to run the real daemon on: a release, a publisher with a repository, daemons.

test_api, test_cli_client and test_operator all drive real daemons on the same kind of
host and call them the same way; the set-up and the command-line helpers live here, so
a change to the host (a new config key, a command's output) is made once. (The log is
read with ``support.hostile.log_events``.) A test module imports ``env_fixture`` for
the ``env`` fixture (a file:// repository), and ``http_env_fixture`` with
``nginx_repo`` for ``http_env`` (a real nginx): the fixtures are named apart from
their functions, so a test that takes ``env`` does not shadow an import.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.cli import run_patchd
from support.daemon import DaemonProcess, Publisher, write_tree
from support.nginx import NginxRepo, nginx_repo  # noqa: F401 (fixture of http_env)

UPDATER = "io.patchd.Updater"
R = "1.4.0"


def b(patch: int, release: str = R) -> dict[str, Any]:
    """A Build as it travels on the wire."""
    return {"release": release, "patch": patch}


# --- the environment: a release, a publisher, a repository, daemons --------------------


@dataclass
class Env:
    """A host (release dir), a publisher with a repository, and daemons to start."""

    tmp: Path
    release_dir: Path
    publisher: Publisher
    manifest_url: str
    daemons: list[DaemonProcess] = field(default_factory=list)

    def tree(self, files: dict[str, str | bytes]) -> Path:
        """The release's tree with ``files`` changed (a patch's target)."""
        target = self.tmp / "trees" / f"t{len(list(self.tmp.glob('trees/*')))}"
        shutil.copytree(self.release_dir, target, symlinks=True)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                path.write_bytes(data)
            else:
                path.write_text(data)
        return target

    def patch(self, number: int, extra: dict[str, str | bytes] | None = None,
              **kw: Any) -> Path:
        """A signed patch bundle (not published) whose app prints its number."""
        files: dict[str, str | bytes] = {"lib/app.py": f"print('patch {number}')\n"}
        files.update(extra or {})
        return self.publisher.bundle(R, number, self.release_dir, self.tree(files), **kw)

    def daemon(self, extra: str = "", start: bool = True,
               prepare: Callable[[DaemonProcess], None] | None = None) -> DaemonProcess:
        d = DaemonProcess(self.tmp / f"d{len(self.daemons)}", manifest_url=self.manifest_url,
                          keys=[self.publisher.public], release_dir=self.release_dir,
                          extra=extra)
        self.daemons.append(d)
        if prepare is not None:
            prepare(d)
        if start:
            d.start()
        return d

    def close(self) -> None:
        for d in self.daemons:
            d.close()


def make_env(tmp: Path, repo: Path, manifest_url: str) -> Env:
    release = write_tree(tmp / "opt" / "kiosk",
                         {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "print('1.4.0')\n"},
                         version=R)
    repo.mkdir(parents=True, exist_ok=True)
    return Env(tmp, release, Publisher(tmp, repo), manifest_url)


@contextmanager
def local_env(tmp: Path) -> Iterator[Env]:
    """A local (file://) repository: the fastest real source for most tests."""
    repo = tmp / "repo" / "stable"
    e = make_env(tmp, repo, f"file://{repo}/manifest.json")
    try:
        yield e
    finally:
        e.close()


@contextmanager
def nginx_env(tmp: Path, nginx: NginxRepo) -> Iterator[Env]:
    """The same over a real nginx, where ``max_download_rate`` applies."""
    e = make_env(tmp, nginx.root / "stable", nginx.url("stable/manifest.json"))
    try:
        yield e
    finally:
        e.close()


@pytest.fixture(name="env")
def env_fixture(tmp_path: Path) -> Iterator[Env]:
    """A host with a local (file://) repository for channel ``stable``."""
    with local_env(tmp_path) as e:
        yield e


@pytest.fixture(name="http_env")
def http_env_fixture(tmp_path: Path, nginx_repo: NginxRepo) -> Iterator[Env]:  # noqa: F811
    """The same on a real nginx, where ``max_download_rate`` slows a download down."""
    with nginx_env(tmp_path, nginx_repo) as e:
        yield e


# --- the command line -------------------------------------------------------------------


def patchd(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``patchd ARGS --socket <the daemon's socket>``."""
    return run_patchd(*args, "--socket", str(d.socket))


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The command succeeded; its output."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with ``code`` and said why in one line, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("patchd: "), proc.stderr
    return lines[0]


# --- authorisation by uid -------------------------------------------------------------------

# The child starts as root (the interpreter lives under /root, which other users cannot
# read), imports what it needs, then drops to the user's uid/gid and supplementary
# groups before it connects; it talks through the varlink package and prints one JSON
# outcome per call.
_AS_USER = """\
import json, os, sys, varlink
uid, gid, groups = json.loads(sys.argv[3])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
socket, calls = sys.argv[1], json.loads(sys.argv[2])
out = []
with varlink.Client(address="unix:" + socket) as c, c.open("io.patchd.Updater") as up:
    for method, params in calls:
        try:
            out.append({"ok": getattr(up, method)(**params)})
        except varlink.VarlinkError as exc:
            out.append(exc.as_dict())
print(json.dumps(out))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="switching to another uid needs root (run as root)")


def as_user(user: str, d: DaemonProcess, calls: list[tuple[str, dict[str, Any]]],
            groups: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run ``calls`` from a child process that setuid()s to ``user`` (and its group)."""
    proc = subprocess.run([sys.executable, "-c", _AS_USER, str(d.socket), json.dumps(calls),
                           json.dumps(credentials(user, groups))],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def credentials(user: str, groups: tuple[str, ...] = ()) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) of ``user`` plus the named extra groups."""
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, [grp.getgrnam(g).gr_gid for g in groups]


def shared_socket(d: DaemonProcess) -> None:
    """Let other users reach the socket: its directory 0755 (the file stays 0660)."""
    os.chmod(d.socket.parent, 0o755)


def denied(method: str) -> dict[str, Any]:
    return {"error": f"{UPDATER}.NotAuthorized", "parameters": {"method": f"{UPDATER}.{method}"}}
