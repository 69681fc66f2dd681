"""``[hooks] post_install`` on the real daemon: run after an install, as the daemon's
user, in the installed tree, within ``[hooks] timeout``; its failure changes nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.host.process import pid_alive
from support.launch import LaunchEnv, R, install, launch_env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LaunchEnv]:
    with launch_env(tmp_path) as e:
        yield e


def test_post_install_runs_after_an_install(env: LaunchEnv) -> None:
    """The hook runs once the build is installed and promoted, before Install answers,
    with the build, its tree and its own arguments; its output is in the daemon's log."""
    record = env.tmp / "post-install.log"
    hook = env.tmp / "post-install"
    hook.write_text('#!/bin/sh\necho "$1 $PATCHD_APP $PATCHD_BUILD $PATCHD_TREE $(id -u) '
                    f'$PWD" > {record}\necho "warming caches"\n')
    hook.chmod(0o755)
    d = env.daemon(f'[hooks]\npost_install = "{hook} --from-patchd"\n')
    install(d, env.patch(1))
    tree = d.state_dir / "builds" / R / "1" / "tree"
    assert record.read_text().split() == ["--from-patchd", "kiosk", f"{R}+1", str(tree),
                                          str(os.getuid()), str(tree)]
    d.wait_log("warming caches")
    assert d.status()["next_boot"] == {"release": R, "patch": 1}


def test_post_install_past_its_deadline_is_killed_and_changes_nothing(
        env: LaunchEnv) -> None:
    """A hook that hangs is killed at [hooks] timeout (with what it started), logged as
    hook.failed, and the build stays installed and next_boot."""
    pidfile = env.tmp / "child.pid"
    hook = env.tmp / "post-install"
    hook.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pidfile}\nwait\n")
    hook.chmod(0o755)
    d = env.daemon(f'[hooks]\npost_install = "{hook}"\ntimeout = "1s"\n')
    started = time.monotonic()
    install(d, env.patch(1))
    assert time.monotonic() - started < 1 + 10
    d.wait_log("hook.failed")
    assert "timed out" in d.log()
    assert d.status()["next_boot"] == {"release": R, "patch": 1}
    child = int(pidfile.read_text())
    assert not pid_alive(child, None)  # killed (a zombie of init's is gone too)
