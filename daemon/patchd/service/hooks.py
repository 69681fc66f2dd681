"""The host's ``[hooks] post_install``: a command the daemon runs after installing a build.

It runs at the promotion point, inside the update or install job (the activity stays
``installing`` until it ends, so ``patchd launch`` activates the build only after it),
as the daemon's user and inside its sandbox, with ``[hooks] timeout`` as its deadline
and its output in the daemon's log. Its failure is logged (``hook.failed``) and
changes nothing: the build is installed and stays next_boot.
"""

from __future__ import annotations

import shlex

import structlog

from patchd.config import Config
from patchd.core.model import Build
from patchd.host.commands import run_command
from patchd.state import Lifecycle

__all__ = ["post_install"]

log = structlog.get_logger("patchd.service.hooks")


async def post_install(config: Config, lifecycle: Lifecycle, build: Build) -> None:
    """Run ``[hooks] post_install`` for ``build``, if one is configured."""
    command = config.hooks.post_install
    if not command:
        return
    tree = lifecycle.layout.tree(build)

    def line(text: str) -> None:
        log.info("hook.output", hook="post_install", line=text)

    log.info("hook.started", hook="post_install", release=build.release, patch=build.patch)
    outcome = await run_command(
        shlex.split(command), deadline=config.hooks.timeout, cwd=tree, on_line=line,
        env={"PATCHD_APP": config.app.name, "PATCHD_BUILD": str(build),
             "PATCHD_TREE": str(tree)})
    if outcome.ok:
        log.info("hook.finished", hook="post_install", seconds=round(outcome.seconds, 3))
    else:
        log.warning("hook.failed", hook="post_install", result=outcome.describe(),
                    output=outcome.tail[-600:])
