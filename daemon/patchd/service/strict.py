"""Strict verification for the boot keeper: off the lifecycle lock, shared, kept.

With ``verify = "strict"`` the files a build's bundle wrote are hashed again before its
tree is handed out. That takes seconds on a large tree, so it never runs under the
lifecycle lock (transitions and the event loop take it) and never once per request:

- One verification of a build runs at a time, in a worker thread owned by the
  daemon's task group; every request for that build that arrives meanwhile waits for
  its answer. A waiter that goes away (a client hangs up) does not stop it.
- A verification that passed is kept with the tree's stamp (``build.verify.tree_stamp``:
  every listed file's inode, mode, owner, size, mtime and ctime, read without reading a
  byte). A later request whose stamp is the same is answered from it; any change to a
  listed file, a new file list (a reinstall), or a daemon restart means hashing again.
  A stamp with a ctime under ``SETTLE_NS`` old is not kept, nor is a failure.

The caller (``service/boot.py``) takes the lifecycle lock only to act on the verdict:
mark a build bad, or record a boot of exactly the build that was verified.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup

from patchd.build.verify import tree_stamp, verify_tree
from patchd.core.model import Build, Installed, State
from patchd.state.view import LifecycleView

__all__ = ["StrictVerifier", "Verdict"]

log = structlog.get_logger("patchd.service.strict")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A build's state and tree as the verification found them, and the first problem."""

    build: Build
    state: State | None
    tree: Path
    problem: str | None


@dataclass(frozen=True, slots=True)
class _Passed:
    """A verification that passed: the state it checked and the tree's stamp then."""

    state: Installed
    tree: Path
    stamp: bytes


class _Run:
    """One verification in flight and everyone waiting for it."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.verdict: Verdict | None = None
        self.error: Exception | None = None


class StrictVerifier:
    """Verifies a build's installed tree for strict mode; see the module docstring."""

    #: Builds whose last passed verification is kept (the host boots one at a time).
    KEEP = 4

    def __init__(self, view: LifecycleView) -> None:
        self._view = view
        self._tg: TaskGroup | None = None
        self._runs: dict[Build, _Run] = {}
        self._passed: dict[Build, _Passed] = {}
        self._passed_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<StrictVerifier running={sorted(map(str, self._runs))} kept={len(self._passed)}>"

    def attach(self, tg: TaskGroup) -> None:
        """The task group that owns the verifications (the daemon's)."""
        self._tg = tg

    async def verify(self, build: Build) -> Verdict:
        """The verdict on ``build``: joins the verification in flight, or starts one."""
        run = self._runs.get(build)
        if run is None:
            run = _Run()
            if self._tg is not None:
                self._tg.start_soon(self._run, build, run)  # raises once the group closed
                self._runs[build] = run
            else:  # no owner: run it here, where no waiter's cancellation can cut it
                self._runs[build] = run
                with anyio.CancelScope(shield=True):
                    await self._run(build, run)
        await run.done.wait()
        if run.verdict is None:
            raise RuntimeError(f"strict verification of {build} did not finish") from run.error
        return run.verdict

    async def _run(self, build: Build, run: _Run) -> None:
        try:
            run.verdict = await anyio.to_thread.run_sync(
                self._verify, build, anyio.from_thread.check_cancelled)
        except Exception as exc:
            log.warning("verify.failed", build=str(build), error_class=type(exc).__name__,
                        error=str(exc))
            run.error = exc
        finally:
            if self._runs.get(build) is run:
                del self._runs[build]
            run.done.set()

    def _verify(self, build: Build, check_cancelled: Callable[[], None]) -> Verdict:
        """In a worker thread, without the lifecycle lock (state files are replaced
        atomically, so a read sees one whole version)."""
        view = self._view
        state = view.state(build)
        if not isinstance(state, Installed):
            tree = view.tree_path(build)
            if build == Build(view.os_release, 0):
                return Verdict(build, state, tree, None)  # release_dir: the OS owns it
            return Verdict(build, state, tree,
                           f"next_boot is {state.name if state else 'unknown'}")
        tree = view.layout.tree(build)
        stamp = tree_stamp(tree, state.files)
        with self._passed_lock:
            kept = self._passed.get(build)
        if stamp is not None and kept == _Passed(state, tree, stamp.digest):
            return Verdict(build, state, tree, None)
        started = time.monotonic()
        problem = verify_tree(tree, state.files, check_cancelled)
        keep = problem is None and stamp is not None and stamp.settled
        log.info("verify.tree", build=str(build), files=len(state.files), passed=problem is None,
                 kept=keep, seconds=round(time.monotonic() - started, 3))
        with self._passed_lock:
            self._passed.pop(build, None)
            if keep and stamp is not None:
                self._passed[build] = _Passed(state, tree, stamp.digest)
                while len(self._passed) > self.KEEP:
                    del self._passed[next(iter(self._passed))]
        return Verdict(build, state, tree, problem)
