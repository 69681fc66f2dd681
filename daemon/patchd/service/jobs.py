"""The one owner of every job that changes the host's state.

Poll updates, ``CheckNow``, ``Install`` and ``Rollback`` all go through one
:class:`JobRunner`, so "who may change state now?" is answered by pointing at
``runner.job``, and the activity board shows what that job reports and nothing else.

The rules, chosen so that no two writers ever work on the same build:

- A job (an update, an operator's install, a rollback) runs alone. Asking for another
  while one runs is refused with :class:`~patchd.core.errors.Busy`, naming what runs.
- A check (read the manifest, forget builds the server rolled back, decide) runs while
  no job or only an update runs: that is how a newer decision supersedes a download.
  It never overlaps an install or a rollback. A check asked for while another runs
  waits for it and then shares the next run with whoever else waited: the running one
  may have read the manifest before the question (a publish in between would be
  missed), so every answer comes from a check that began after it was asked.
- A rollback may preempt an update: the update is cancelled (its partial download is
  kept for the next check) so an operator is never told to wait for a download.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
from anyio.abc import TaskGroup

from patchd.core.errors import Busy, Refused
from patchd.core.model import Build
from patchd.service.activity import Activity, ActivityBoard

__all__ = ["Job", "JobKind", "JobRunner"]

JobKind = Literal["update", "install", "rollback"]
T = TypeVar("T")


@dataclass(eq=False)
class Job:
    """One running job: what it is, how to stop it, and how it ended."""

    kind: JobKind
    build: Build | None
    runner: JobRunner = field(repr=False)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope, repr=False)
    done: anyio.Event = field(default_factory=anyio.Event, repr=False)
    error: Exception | None = None

    @property
    def current(self) -> bool:
        """Still the runner's job (not ended, not preempted)."""
        return self.runner.job is self

    def show(self, phase: str, build: Build | None = None, done: int = 0,
             total: int = 0) -> None:
        """Put this job's phase on the activity board, unless it is no longer current."""
        if self.current:
            self.runner.board.set(phase, build, done, total)

    def progress(self, done: int, total: int) -> None:
        if self.current:
            self.runner.board.progress(done, total)


class JobRunner:
    """Runs one state-changing job at a time; see the module docstring for the rules."""

    def __init__(self, board: ActivityBoard, on_job_end: Callable[[], None]) -> None:
        self.board = board
        self.job: Job | None = None
        self._on_job_end = on_job_end
        self._tg: TaskGroup | None = None
        self._check: _CheckRun | None = None

    def __repr__(self) -> str:
        checking = " checking" if self._check is not None else ""
        return f"<JobRunner job={self.job!r}{checking} {self.board.current.summary()}>"

    def attach(self, tg: TaskGroup) -> None:
        """The task group that owns background jobs (the daemon's)."""
        self._tg = tg

    @property
    def checking(self) -> bool:
        return self._check is not None

    def _busy(self) -> Busy:
        activity = self.board.current
        return Busy(activity.to_json(), activity.summary())

    # --- jobs ------------------------------------------------------------------------

    async def run(self, kind: JobKind, work: Callable[[Job], Awaitable[T]], *,
                  preempt_update: bool = False) -> T:
        """Run ``work`` now, in the caller's task, as the only job.

        Busy when a check or another job runs, except that ``preempt_update`` cancels a
        running update first. The job is claimed before the first await, so nothing can
        start in between.
        """
        running = self.job
        if self._check is not None or (
                running is not None and not (preempt_update and running.kind == "update")):
            raise self._busy()
        job = self._begin(kind, None)
        try:
            if running is not None:
                running.scope.cancel()
                await running.done.wait()
            with job.scope:
                return await work(job)
            # Only cancel() reaches here (a stop of the daemon cancels an outer scope).
            raise Refused(f"the {kind} was cancelled before it finished")
        except Exception as exc:
            job.error = exc
            raise
        finally:
            self._end(job)

    def start(self, kind: JobKind, build: Build, work: Callable[[Job], Awaitable[None]],
              shown: Activity) -> Job:
        """Start ``work`` in the background as the only job; ``shown`` goes on the board
        at once, so a client watching right after ``CheckNow`` never sees a stale idle."""
        assert self._tg is not None, "attach() the daemon's task group first"
        if self.job is not None:
            raise self._busy()
        job = self._begin(kind, build)
        self.board.set(shown.phase, shown.build, shown.done, shown.total)
        self._tg.start_soon(self._background, job, work)
        return job

    async def _background(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> None:
        try:
            with job.scope:
                await work(job)
        except Exception as exc:  # the work logged it; waiters read it from the job
            job.error = exc
        finally:
            self._end(job)

    def _begin(self, kind: JobKind, build: Build | None) -> Job:
        job = Job(kind, build, self)
        self.job = job
        return job

    def _end(self, job: Job) -> None:
        if self.job is job:
            self.job = None
            self.board.idle()
        job.done.set()
        self._on_job_end()

    async def cancel(self, only: JobKind | None = None) -> None:
        """Cancel the running job (of kind ``only``, if given) and wait until it ended."""
        job = self.job
        if job is not None and only in (None, job.kind):
            job.scope.cancel()
            await job.done.wait()

    async def wait(self) -> Exception | None:
        """Wait for the running job, if any, to end; its error, or None."""
        job = self.job
        if job is None:
            return None
        await job.done.wait()
        return job.error

    # --- checks ----------------------------------------------------------------------

    async def wait_check_allowed(self) -> None:
        """Wait until a check may run (no install or rollback in progress)."""
        while self.job is not None and self.job.kind != "update":
            await self.job.done.wait()

    async def check(self, run_check: Callable[[], Awaitable[T]]) -> T:
        """Run a check, or share one that began after this call (see the module);
        Busy during an install or rollback."""
        if self._check is not None:
            await self._check.done.wait()  # too old to answer: it may have read already
            if self._check is not None:  # another who waited began the next one
                fresh = self._check
                await fresh.done.wait()
                if fresh.error is not None:
                    raise fresh.error
                return fresh.result  # type: ignore[return-value]
        if self.job is not None and self.job.kind != "update":
            raise self._busy()
        run = self._check = _CheckRun()
        shown = self.job is None
        if shown:
            self.board.set("checking")
        try:
            result = await run_check()
            run.result = result
            return result
        except Exception as exc:
            run.error = exc
            raise
        finally:
            if shown and self.board.current.phase == "checking":
                self.board.idle()
            run.done.set()
            self._check = None


@dataclass(eq=False)
class _CheckRun:
    """One check, shared by whoever asked while the one before it ran."""

    done: anyio.Event = field(default_factory=anyio.Event)
    result: object = None
    error: Exception | None = None
