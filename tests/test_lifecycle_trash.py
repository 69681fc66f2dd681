"""Trees a transition drops are renamed into builds/.trash-* under the lock and deleted
outside it (state/trash.py): by the trash's owner, or right after the call without one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from patchd.core.model import BadReason, Build
from patchd.state import Lifecycle
from support.env import Env, b, local_env
from support.env import R as API_R
from support.lifecycle_child import check_invariants, make_release, ready

R = "1.0.0"
B0, B1, B2 = (Build(R, n) for n in range(3))
#: Enough files that deleting them is real work (a tree of a real app has thousands).
FILES = 3000


@pytest.fixture
def lc(tmp_path: Path) -> Iterator[Lifecycle]:
    with Lifecycle.open(*make_release(tmp_path, R)) as store:
        yield store


def fill(tree: Path, count: int = FILES) -> None:
    """Give ``tree`` ``count`` more files in a few directories."""
    for n in range(count):
        sub = tree / "data" / f"d{n % 30}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{n}").write_bytes(b"x" * 64)


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def trashed(lc: Lifecycle) -> list[Path]:
    return sorted(lc.layout.builds.glob(".trash-*"))


def boot(lc: Lifecycle) -> None:
    lc.record_boot_start(None, None, None)
    lc.record_boot_success(None)


def rollback(lc: Lifecycle) -> Build:
    ready(lc, B1)
    fill(lc.tree_path(B1))
    lc.forget_rolled_back(B1)
    return B1


def promote_over(lc: Lifecycle) -> Build:
    ready(lc, B1)
    fill(lc.tree_path(B1))
    ready(lc, B2)  # B1 never booted: the promotion of B2 retires it
    return B1


def mark_bad(lc: Lifecycle) -> Build:
    ready(lc, B1)
    fill(lc.tree_path(B1))
    lc.mark_bad(B1, BadReason.MANUAL, "test")  # never booted: its tree is no one's
    return B1


def boot_success(lc: Lifecycle) -> Build:
    ready(lc, B1)
    fill(lc.tree_path(B1))
    boot(lc)
    ready(lc, B2)
    boot(lc)  # B2 booted: the older B1 is cleaned up
    return B1


@pytest.mark.parametrize("transition", [rollback, promote_over, mark_bad, boot_success])
def test_transition_only_renames_the_tree_it_drops(
        lc: Lifecycle, transition: Callable[[Lifecycle], Build]) -> None:
    """Rollback, promotion, mark_bad and boot success leave the dropped tree whole in the
    trash for its owner; emptying it leaves nothing of the tree."""
    pokes: list[None] = []
    lc.trash.set_owner(lambda: pokes.append(None))
    gone = transition(lc)
    assert not lc.layout.tree(gone).exists()
    assert pokes and sum(files_under(p) for p in trashed(lc)) >= FILES
    assert lc.trash.empty() >= 1
    assert trashed(lc) == [] and lc.trash.take() == []
    check_invariants(lc)


def test_forget_returns_while_the_tree_is_deleted_outside_the_lock(lc: Lifecycle) -> None:
    """A server rollback of a build with a big tree returns with the tree renamed, not
    deleted; the deletion runs to its end while this thread holds the lifecycle's lock,
    and afterwards nothing of the build remains."""
    lc.trash.set_owner(lambda: None)  # the test decides when to empty the trash
    ready(lc, B1)
    fill(lc.tree_path(B1))
    lc.forget_rolled_back(B1)
    assert lc.state(B1) is None and not lc.layout.build_dir(B1).exists()
    [trash] = trashed(lc)
    assert files_under(trash) == FILES + 1  # every file still there: nothing deleted yet

    # The transition released the lock: another thread takes it at once.
    took: list[bool] = []

    def take_lock() -> None:
        took.append(lc.lock.acquire(blocking=False))
        if took[-1]:
            lc.lock.release()

    other = threading.Thread(target=take_lock)
    other.start()
    other.join()
    assert took == [True]

    emptied: list[int] = []
    with lc.lock:  # held here for the whole deletion
        drain = threading.Thread(target=lambda: emptied.append(lc.trash.empty()))
        drain.start()
        drain.join(timeout=120)  # a guard against a deadlock, never a wait for timing
        assert not drain.is_alive(), "deleting the trash waited for the lifecycle's lock"
    assert emptied == [1]
    assert not trash.exists() and trashed(lc) == []
    assert not lc.layout.release_dir(R).exists()
    check_invariants(lc)


def test_without_an_owner_the_trash_is_gone_when_the_call_returns(lc: Lifecycle) -> None:
    """Tests and tools using the lifecycle directly see the old behaviour: the dropped
    tree is deleted (outside the lock) before the transition returns, even nested in
    the caller's own hold of the lock."""
    ready(lc, B1)
    fill(lc.tree_path(B1), 100)
    with lc.lock:
        lc.forget_rolled_back(B1)
        assert trashed(lc) == []
    assert not lc.layout.build_dir(B1).exists() and lc.trash.take() == []


def test_discard_of_the_installers_old_tree_goes_through_the_trash(lc: Lifecycle) -> None:
    """The installer's retired tree takes the same way: renamed now, deleted by the owner."""
    lc.trash.set_owner(lambda: None)
    ready(lc, B1)
    old = lc.tree_path(B1)
    fill(old, 100)
    lc.discard(old)
    assert not old.exists() and files_under(trashed(lc)[0]) == 101
    lc.trash.empty()
    assert trashed(lc) == []


def test_a_crash_before_the_trash_is_emptied_leaves_nothing_after_start_up(
        lc: Lifecycle) -> None:
    """Trash never emptied (the daemon killed before its worker ran) is deleted by the
    start-up sweep; the state is whole."""
    lc.trash.set_owner(lambda: None)  # an owner that never gets to empty it
    ready(lc, B1)
    fill(lc.tree_path(B1), 200)
    ready(lc, B2)  # retires B1
    lc.forget_rolled_back(B2)
    assert len(trashed(lc)) == 2
    lc.close()
    with Lifecycle.open(lc.state_dir, lc.cache_dir, lc.release_dir) as again:
        assert trashed(again) == []
        assert list(again.layout.builds.iterdir()) == []
        assert again.pointers.next_boot == B0 and again.builds() == []
        check_invariants(again)


def test_opened_for_an_owner_start_up_repair_only_queues_what_it_drops(
        lc: Lifecycle) -> None:
    """Opened with ``keep_trash`` (the daemon, which owns the trash), start-up repair
    deletes nothing big before returning, so READY does not wait for it: a crash's trash
    stays queued and a half-built staging tree is renamed into the trash; the owner's
    first round deletes both."""
    lc.trash.set_owner(lambda: None)  # killed before its worker ran
    ready(lc, B1)
    fill(lc.tree_path(B1), 200)
    ready(lc, B2)  # retires B1: one trash directory
    staging = lc.staging_path(Build(R, 3))  # an install the crash interrupted
    fill(staging, 300)
    lc.close()
    with Lifecycle.open(lc.state_dir, lc.cache_dir, lc.release_dir,
                        keep_trash=True) as again:
        assert not staging.exists()
        assert len(trashed(again)) == 2
        assert sum(files_under(t) for t in trashed(again)) >= 500
        assert again.pointers.next_boot == B2
        assert again.trash.empty() == 2
        assert trashed(again) == []
        check_invariants(again)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """A host with a local (file://) repository."""
    with local_env(tmp_path) as e:
        yield e


def test_the_daemons_trash_worker_deletes_what_a_server_rollback_drops(env: Env) -> None:
    """A server rollback (applied on the event loop) only renames the build away; the
    daemon's own worker deletes it, and nothing of the build is left."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    d.check_and_wait()
    d.wait_status(lambda s: s["next_boot"] == b(1), "patch 1 installed")
    builds = d.state_dir / "builds"
    fill(builds / API_R / "1" / "tree", 500)
    assert '"trash.emptied"' not in d.log()
    env.publisher.roll_back(API_R, 1)
    d.call("CheckNow")
    d.wait_log('"trash.emptied"')
    assert d.status()["next_boot"] == b(0)
    assert not (builds / API_R).exists() and not list(builds.glob(".trash-*"))
