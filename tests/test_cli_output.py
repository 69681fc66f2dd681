"""CLI rough edges (issue #16, item 10): ``check --wait`` prints no stray ``idle`` line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cli import run_patchd
from test_api import Env, local_env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with local_env(tmp_path) as e:
        yield e


def test_check_wait_prints_no_idle_line(env: Env) -> None:
    """``check --wait`` says what it installs and that it did; the end of the activity
    (``idle``) is not news and is not printed."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    proc = run_patchd("check", "--wait", "--socket", str(d.socket))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "patch update to 1.4.0+1"
    assert lines[-1] == "installed 1.4.0+1; it boots at the next start"
    assert "idle" not in lines, lines
