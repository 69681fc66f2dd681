"""Health checks and hooks of ``patchd launch``: found in the build's tree and the config.

A build ships its own checks and hooks (docs/host-integration.md):

    TREE/patchd/health/required.d/*   must all pass before BootSuccess
    TREE/patchd/health/wanted.d/*     logged (``health.wanted_failed``), never fatal
    TREE/patchd/hooks/pre-start       before the first start of a build (migrations)
    TREE/patchd/hooks/on-fallback     from the tree fallen back *to*, naming the failed build

and the host adds ``[health] required``/``wanted`` command lines. Every executable
runs with the tree as its working directory, ``PATCHD_APP``, ``PATCHD_BUILD`` and
``PATCHD_TREE`` in its environment, and a deadline (``host/commands.py``). Files in a
``.d`` directory run like run-parts: in name order of discovery, skipping names
starting with ``.`` or ending in ``~``; a file that is not executable is skipped with
a warning, so a README there cannot fail a boot.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from patchd.config.launch import HealthSection
from patchd.host.commands import Outcome, run_command

__all__ = ["Check", "Verdict", "checks_of", "hook_path", "run_checks", "run_hook"]

log = structlog.get_logger("patchd.cli.launch")

#: Characters of a failed check's output carried in the BootFailure detail.
DETAIL_TAIL = 600


@dataclass(frozen=True)
class Check:
    """One health check: its name in messages and what to run."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """The required checks' verdict: ``failed`` names the first check that failed."""

    failed: Check | None = None
    outcome: Outcome | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None

    def reason(self) -> str:
        """The BootFailure detail: which check, how it failed, the end of its output."""
        assert self.failed is not None and self.outcome is not None
        text = f"health check {self.failed.name} failed ({self.outcome.describe()})"
        tail = self.outcome.tail[-DETAIL_TAIL:]
        return f"{text}: {tail}" if tail else text


def _executables(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        path = directory / name
        if name.startswith(".") or name.endswith("~") or not path.is_file():
            continue
        if not os.access(path, os.X_OK):
            log.warning("health.not_executable", path=str(path), effect="skipped")
            continue
        found.append(path)
    return found


def _configured(command: str, tree: Path) -> Check:
    argv = shlex.split(command)
    if "/" in argv[0] and not argv[0].startswith("/"):
        argv[0] = str(tree / argv[0])
    return Check(command, tuple(argv))


def checks_of(kind: str, tree: Path, health: HealthSection) -> list[Check]:
    """The ``required`` or ``wanted`` checks for ``tree``: the tree's, then the host's."""
    own = [Check(f"{kind}.d/{p.name}", (str(p),))
           for p in _executables(tree / "patchd" / "health" / f"{kind}.d")]
    configured = health.required if kind == "required" else health.wanted
    return own + [_configured(c, tree) for c in configured]


async def _run_one(check: Check, kind: str, tree: Path, env: Mapping[str, str],
                   deadline: float) -> Outcome:
    def line(text: str) -> None:
        log.info("health.output", check=check.name, line=text)

    outcome = await run_command(check.argv, deadline=deadline, cwd=tree,
                                env={**env, "PATCHD_CHECK": kind}, on_line=line)
    if outcome.ok:
        log.info("health.passed", check=check.name, kind=kind, seconds=round(outcome.seconds, 3))
    elif kind == "wanted":
        log.warning("health.wanted_failed", check=check.name, result=outcome.describe(),
                    output=outcome.tail[-DETAIL_TAIL:])
    else:
        log.warning("health.required_failed", check=check.name, result=outcome.describe(),
                    output=outcome.tail[-DETAIL_TAIL:])
    return outcome


async def run_checks(checks: Sequence[Check], kind: str, tree: Path, env: Mapping[str, str],
                     deadline: float) -> Verdict:
    """Run ``checks`` together, each within ``deadline`` s; the first failure in order."""
    outcomes: dict[int, Outcome] = {}

    async def one(i: int, check: Check) -> None:
        outcomes[i] = await _run_one(check, kind, tree, env, deadline)

    async with anyio.create_task_group() as tg:
        for i, check in enumerate(checks):
            tg.start_soon(one, i, check)
    for i, check in enumerate(checks):
        if not outcomes[i].ok:
            return Verdict(check, outcomes[i])
    return Verdict()


def hook_path(tree: Path, name: str) -> Path | None:
    """``TREE/patchd/hooks/NAME`` when the build ships it (an executable file)."""
    path = tree / "patchd" / "hooks" / name
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):
        log.warning("hook.not_executable", hook=name, path=str(path), effect="skipped")
        return None
    return path


async def run_hook(path: Path, name: str, tree: Path, env: Mapping[str, str],
                   deadline: float) -> Outcome:
    """Run one hook of the tree; its output goes to the log a line at a time."""
    def line(text: str) -> None:
        log.info("hook.output", hook=name, line=text)

    log.info("hook.started", hook=name, path=str(path))
    outcome = await run_command([str(path)], deadline=deadline, cwd=tree, env=env,
                                on_line=line)
    if outcome.ok:
        log.info("hook.finished", hook=name, seconds=round(outcome.seconds, 3))
    else:
        log.warning("hook.failed", hook=name, result=outcome.describe(),
                    output=outcome.tail[-DETAIL_TAIL:])
    return outcome
