"""One job at a time: the job runner on the real daemon, and its rules on their own.

The race this guards against was seen: an operator's ``Install`` and a ``CheckNow`` of
the same build ran at once and left a tree with 0 files as the boot target, a good
bundle refused as "directory does not exist", and "Directory not empty" on rename.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from patchd.core.errors import Busy
from patchd.core.model import Build
from patchd.service.activity import Activity, ActivityBoard
from patchd.service.jobs import Job, JobRunner
from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess, Publisher, state_of, write_tree

R = "1.4.0"
ROUNDS = 50


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[Publisher, DaemonProcess, Path]]:
    release = write_tree(tmp_path / "opt" / "kiosk",
                         {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "print('1.4.0')\n",
                          **{f"lib/m{i}/data.txt": f"module {i}\n" for i in range(30)}},
                         version=R)
    repo = tmp_path / "repo" / "stable"
    repo.mkdir(parents=True)
    publisher = Publisher(tmp_path, repo)
    d = DaemonProcess(tmp_path / "d", manifest_url=f"file://{repo}/manifest.json",
                      keys=[publisher.public], release_dir=release)
    d.start()
    try:
        yield publisher, d, release
    finally:
        d.close()


def _race(d: DaemonProcess, bundle: Path) -> dict[str, Any]:
    """Install and CheckNow sent at the same instant on two connections."""
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def call(method: str, params: dict[str, Any]) -> None:
        barrier.wait()
        try:
            outcome[method] = d.call(method, params)
        except VarlinkError as exc:
            outcome[method] = exc

    threads = [threading.Thread(target=call, args=("Install", {"path": str(bundle)})),
               threading.Thread(target=call, args=("CheckNow", {}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcome


def test_install_and_check_now_of_the_same_build_never_interleave(
        host: tuple[Publisher, DaemonProcess, Path], tmp_path: Path) -> None:
    """Install and CheckNow of the same build together, 50 times: every time one of them
    runs and the other is refused (Busy, or "already installed"), and the boot target's
    tree is the build's, complete."""
    publisher, d, release = host
    refusals: set[str] = set()
    for n in range(1, ROUNDS + 1):
        target = tmp_path / "trees" / str(n)
        write_tree(target, {**{k: v.decode() for k, v in _files(release).items()},
                            "lib/app.py": f"print('patch {n}')\n",
                            f"lib/m{n % 30}/data.txt": f"module {n % 30} as of patch {n}\n"})
        bundle = publisher.bundle(R, n, release, target)
        publisher.publish(bundle)

        outcome = _race(d, bundle)
        status = d.wait_status(lambda s, n=n: s["activity"]["phase"] == "idle"  # type: ignore[misc]
                               and s["next_boot"]["patch"] == n, f"patch {n} installed")

        for method, result in outcome.items():
            if isinstance(result, VarlinkError):
                short = result.name.rpartition(".")[2]
                assert short in ("Busy", "InvalidBundle"), (n, method, result)
                if short == "InvalidBundle":
                    assert "already installed" in result.parameters["reason"], (n, result)
                refusals.add(f"{method}:{short}")
        assert state_of(status, R, n) == "installed", (n, status)
        assert status["last_error"] is None, (n, status["last_error"])
        boot = d.call("GetBootTarget")
        assert boot["build"] == {"release": R, "patch": n}
        assert _files(Path(boot["path"])) == _files(target), f"round {n}: tree differs"
    assert refusals, "the two calls never met: the test raced nothing"
    assert "Traceback" not in d.log()


# --- the rules, on the runner alone --------------------------------------------------------

B1 = Build(R, 1)


@pytest.mark.anyio
async def test_a_job_refuses_another_with_busy_naming_it() -> None:
    """While an install runs, another install, a rollback and a check are refused Busy
    with the running job's activity."""
    runner = JobRunner(ActivityBoard(), on_job_end=lambda: None)
    release = anyio.Event()

    async def install(job: Job) -> str:
        job.show("installing", B1)
        await release.wait()
        return "installed"

    async with anyio.create_task_group() as tg:
        runner.attach(tg)
        results: list[str] = []

        async def first() -> None:
            results.append(await runner.run("install", install))

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        for attempt in (lambda: runner.run("install", install),
                        lambda: runner.run("rollback", install, preempt_update=True),
                        lambda: runner.check(lambda: anyio.lowlevel.checkpoint())):
            with pytest.raises(Busy) as info:
                await attempt()
            assert info.value.activity["phase"] == "installing"
        release.set()
    assert results == ["installed"]
    assert runner.job is None and runner.board.current == Activity()


@pytest.mark.anyio
async def test_rollback_preempts_an_update_and_checks_join() -> None:
    """A rollback cancels a running update first. A check asked while one runs waits for
    it and shares the next run: three asked together make two runs, the first alone."""
    ends: list[str] = []
    runner = JobRunner(ActivityBoard(), on_job_end=lambda: ends.append("end"))
    runs = 0

    async def check() -> int:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.05)
        return runs

    async with anyio.create_task_group() as tg:
        runner.attach(tg)
        update = runner.start("update", B1, lambda job: anyio.sleep_forever(),
                              Activity("downloading", B1, 0, 10))
        assert runner.board.current.phase == "downloading"
        joined: list[int] = []
        all_answered = anyio.Event()

        async def ask() -> None:
            joined.append(await runner.check(check))
            if len(joined) == 3:
                all_answered.set()

        for _ in range(3):
            tg.start_soon(ask)
        with anyio.fail_after(5):
            await all_answered.wait()
        assert joined == [1, 2, 2] and runs == 2
        assert await runner.run("rollback", _done, preempt_update=True) == "rolled back"
        assert update.done.is_set() and update.error is None
    assert ends == ["end", "end"]


async def _done(job: Job) -> str:
    return "rolled back"


@pytest.mark.anyio
async def test_a_check_asked_after_a_publish_reads_the_new_manifest() -> None:
    """A check that read the manifest before a publish does not answer a question asked
    after it: the late asker waits for it and gets a check of its own (the failpoint
    matrix once saw CheckNow answer ``none`` from the check a reload had started)."""
    runner = JobRunner(ActivityBoard(), on_job_end=lambda: None)
    published = 1
    read = anyio.Event()

    async def check() -> int:
        seen = published  # the manifest, read first
        read.set()
        await anyio.sleep(0.05)  # verify, decide
        return seen

    answers: list[int] = []
    async with anyio.create_task_group() as tg:
        runner.attach(tg)

        async def ask() -> None:
            answers.append(await runner.check(check))

        tg.start_soon(ask)  # the reload's check
        await read.wait()
        published = 2  # the publish, while that check runs
        assert await runner.check(check) == 2  # CheckNow
    assert answers == [1]
