"""The command line's shape: help, version, usage errors, exit codes."""

from __future__ import annotations

from patchd import __version__
from support.cli import run_patchd

SUBCOMMANDS = ["run", "config", "status", "watch", "check", "install", "rollback",
               "boot-target", "boot", "keygen", "pack", "publish", "demo"]


def test_help_lists_every_subcommand() -> None:
    """`patchd --help` names every subcommand of docs/cli.md"""
    proc = run_patchd("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in proc.stdout or f"\n    {name}\n" in proc.stdout, name


def test_version() -> None:
    """`patchd --version` prints the package version."""
    proc = run_patchd("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"patchd {__version__}"


def test_unknown_command_is_one_line_exit_2() -> None:
    """A usage error is exit 2 and one line on stderr."""
    proc = run_patchd("frobnicate")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "invalid choice" in proc.stderr


def test_missing_required_option_is_one_line_exit_2() -> None:
    """`patchd keygen` without -o is a one-line usage error."""
    proc = run_patchd("keygen")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "-o" in proc.stderr


def test_boot_needs_an_event() -> None:
    """`patchd boot` alone names what is missing."""
    proc = run_patchd("boot")
    assert proc.returncode == 2 and "EVENT" in proc.stderr
