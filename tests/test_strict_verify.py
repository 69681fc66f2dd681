"""Strict verification's two halves on a real lifecycle and real files (issue #15, item 5):
the tree stamp, and the shared verification that no waiter's cancellation stops.
The daemon-level behaviour is in tests/e2e/test_hardening_verify.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from patchd.build.verify import tree_stamp
from patchd.config import Config, config_from_dict
from patchd.core.model import Bad, BadReason, Build, Installed
from patchd.service.boot import BootKeeper
from patchd.service.strict import StrictVerifier
from patchd.state import Lifecycle
from support.lifecycle_child import make_release, ready

B1, B2 = Build("1.0.0", 1), Build("1.0.0", 2)


@pytest.fixture
def lc(tmp_path: Path) -> Iterator[Lifecycle]:
    """A lifecycle whose next_boot B1 is installed (one file, bin/app)."""
    with Lifecycle.open(*make_release(tmp_path, "1.0.0")) as store:
        ready(store, B1)
        yield store


def files_of(lc: Lifecycle) -> dict[str, str]:
    state = lc.state(B1)
    assert isinstance(state, Installed)
    return state.files


def test_tree_stamp_changes_with_any_listed_file(lc: Lifecycle) -> None:
    """Same files, same stamp; a ctime-only change, a same-bytes replacement or a
    directory swapped for a link changes it; a fresh file leaves it unsettled."""
    tree, files = lc.tree_path(B1), files_of(lc)
    first = tree_stamp(tree, files)
    assert first is not None and not first.settled  # written just now
    assert tree_stamp(tree, files) == first
    app = tree / "bin" / "app"
    st = app.stat()
    os.utime(app, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the ctime moves
    second = tree_stamp(tree, files)
    assert second is not None and second.digest != first.digest
    copy = tree / "bin" / "app.new"
    copy.write_bytes(app.read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(copy, app)  # same bytes, same mtime, another inode
    third = tree_stamp(tree, files)
    assert third is not None and third.digest not in (first.digest, second.digest)
    os.rename(tree / "bin", tree / "bin.real")
    os.symlink("bin.real", tree / "bin")
    assert tree_stamp(tree, files) is None  # only a full verification says what is wrong


@pytest.mark.anyio
async def test_a_waiter_that_gives_up_does_not_stop_the_shared_verification(
        lc: Lifecycle) -> None:
    """Two requests share one verification; the first is cancelled while it runs (held
    open by a FIFO put in place of bin/app); the second still gets its verdict, the
    failure is not kept, and the restored file passes at the next request."""
    app = lc.tree_path(B1) / "bin" / "app"
    data = app.read_bytes()
    app.unlink()
    os.mkfifo(app)  # opening it for reading blocks until a writer comes
    verifier = StrictVerifier(lc)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            verifier.attach(tg)
            with anyio.CancelScope() as gives_up:
                async with anyio.create_task_group() as waiters:
                    waiters.start_soon(verifier.verify, B1)
                    await anyio.wait_all_tasks_blocked()
                    gives_up.cancel()
            async with anyio.create_task_group() as waiters:
                async def wait() -> None:
                    verdict = await verifier.verify(B1)
                    assert verdict.problem == "bin/app is no longer a regular file"

                waiters.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                # The writer opens the FIFO: the verification, still running, goes on.
                await anyio.to_thread.run_sync(lambda: os.close(os.open(app, os.O_WRONLY)))
            app.unlink()
            app.write_bytes(data)
            assert (await verifier.verify(B1)).problem is None
    assert [(e["passed"], e["kept"]) for e in logs if e["event"] == "verify.tree"] == [
        (False, False), (True, False)]


def strict_config(lc: Lifecycle) -> Config:
    return config_from_dict({
        "app": {"name": "kiosk", "release_dir": str(lc.release_dir)},
        "server": {"manifest_url": "https://updates.example/kiosk/stable/manifest.json"},
        "trust": {"keys": ["ed25519:" + "A" * 43 + "="], "verify": "strict"}})


@pytest.mark.anyio
async def test_boot_start_verifies_the_fallback_of_a_tampered_build(lc: Lifecycle) -> None:
    """BootStart in strict mode: next_boot B2 was changed on disk, so it is marked
    validation_failed and the fallback B1 is verified in turn, then recorded as booting."""
    lc.record_boot_start(B1, None, None)
    lc.record_boot_success(B1)
    ready(lc, B2)
    (lc.tree_path(B2) / "bin" / "app").write_text("#!/bin/sh\necho tampered\n")
    config = strict_config(lc)
    keeper = BootKeeper(lc, lambda: config, on_change=lambda: None)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            keeper.attach(tg)
            assert await keeper.start(None, None) == (B1, lc.tree_path(B1))
            tg.cancel_scope.cancel()  # the pid watch
    bad = lc.state(B2)
    assert isinstance(bad, Bad) and bad.reason is BadReason.VALIDATION_FAILED
    assert lc.pointers.currently_booting == B1 and lc.pointers.next_boot == B1
    assert [(e["build"], e["passed"]) for e in logs if e["event"] == "verify.tree"] == [
        (str(B2), False), (str(B1), True)]
