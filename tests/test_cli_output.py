"""CLI rough edges (issue #16, item 10): every option has help text, and ``check --wait``
prints no stray ``idle`` line."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.cli.main import build_parser
from support.cli import run_patchd
from support.env import Env, local_env


def subcommands(parser: argparse.ArgumentParser, prefix: str = "patchd"
                ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, by its command line, depth first."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                assert name in helped, f"'{prefix} {name}' has no help in '{prefix} --help'"
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_option_of_every_command_has_help() -> None:
    """Walking build_parser(): each option and argument of each subcommand has help."""
    missing = []
    commands = list(subcommands(build_parser()))
    for command, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                missing.append(f"{command} {name}")
    assert len(commands) >= 18, [c for c, _ in commands]
    assert not missing, "options without help: " + ", ".join(missing)


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
