"""Random sequences of lifecycle transitions keep the docs/lifecycle.md/§3.3 invariants."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from patchd.core import fsio
from patchd.core.errors import BadInputError, LifecycleError
from patchd.core.model import BadReason, Build, Downloaded
from patchd.state import Action, Lifecycle
from support.lifecycle_child import (
    check_invariants,
    download,
    install,
    make_release,
    receive,
    start_download,
)

FULL = os.environ.get("PATCHD_FULL") == "1"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Thousands of transitions: keep their log lines in memory, not on the terminal."""
    with structlog.testing.capture_logs():
        yield
patches = st.integers(min_value=1, max_value=4)


class LifecycleMachine(RuleBasedStateMachine):
    """Drives one store; checks the invariants after every step.

    Besides the store's own invariants (``check_invariants``) the model remembers
    which builds were tombstoned (a tombstone is never lifted, short of an OS release
    change) and which trees a host may be running (never deleted until another build
    booted successfully).
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="lc-"))
        self.dirs = make_release(self.root, "1.0.0")
        self.lc = Lifecycle.open(*self.dirs)
        self.bad: set[Build] = set()
        self.host_trees: set[Path] = set()
        self.version = 0

    def teardown(self) -> None:
        self.lc.close()
        shutil.rmtree(self.root)

    def build(self, patch: int) -> Build:
        return Build(self.lc.release, patch)

    def attempt(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run a transition; a refusal (LifecycleError, InstallLoop) is an answer."""
        with contextlib.suppress(LifecycleError, BadInputError):
            fn(*args, **kwargs)

    # --- rules ---

    @rule(patch=patches)
    def download(self, patch: int) -> None:
        self.attempt(download, self.lc, self.build(patch))

    @rule(patch=patches, count=st.integers(1, 40))
    def partial(self, patch: int, count: int) -> None:
        build = self.build(patch)
        try:
            if start_download(self.lc, build) in (Action.FRESH, Action.RESUME):
                receive(self.lc, build, count)
        except LifecycleError:
            pass

    @rule(patch=patches)
    def evict(self, patch: int) -> None:
        fsio.remove_tree(self.lc.download_path(self.build(patch)))

    @rule(patch=patches, promote=st.booleans())
    def install(self, patch: int, promote: bool) -> None:
        build = self.build(patch)
        if isinstance(self.lc.state(build), Downloaded):
            self.attempt(install, self.lc, build, promote=promote)

    @rule(patch=patches)
    def install_killed(self, patch: int) -> None:
        """The daemon dies mid-install: counted attempt, staging left, store reopened."""
        build = self.build(patch)
        if isinstance(self.lc.state(build), Downloaded):
            try:
                self.lc.record_install_started(build)
            except BadInputError:
                return
            (self.lc.staging_path(build) / "half").mkdir(parents=True, exist_ok=True)
            self.reopen()

    @rule(patch=patches)
    def promote(self, patch: int) -> None:
        self.attempt(self.lc.promote_to_next_boot, self.build(patch))

    @rule(with_pid=st.booleans())
    def boot_start(self, with_pid: bool) -> None:
        _, tree = self.lc.record_boot_start(None, os.getpid() if with_pid else None, None)
        if tree != self.lc.release_dir:
            self.host_trees.add(tree)

    @rule()
    def boot_success(self) -> None:
        try:
            build = self.lc.record_boot_success(None)
        except LifecycleError:
            return
        tree = self.lc.tree_path(build)
        self.host_trees = {tree} if tree != self.lc.release_dir else set()

    @rule(reason=st.sampled_from([BadReason.BOOT_FAILURE, BadReason.BOOT_TIMEOUT]))
    def boot_failure(self, reason: BadReason) -> None:
        self.attempt(self.lc.record_boot_failure, None, reason, "failed")

    @rule(alive=st.booleans())
    def crash_check(self, alive: bool) -> None:
        self.lc.detect_boot_crash(lambda pid, start: alive)

    @rule(patch=patches)
    def server_rollback(self, patch: int) -> None:
        self.lc.forget_rolled_back(self.build(patch))

    @rule()
    def manual_rollback(self) -> None:
        self.attempt(self.lc.manual_rollback)

    @rule(patch=patches, reason=st.sampled_from(list(BadReason)))
    def mark_bad(self, patch: int, reason: BadReason) -> None:
        self.lc.mark_bad(self.build(patch), reason, "test")

    @rule(fail=st.sets(patches))
    def validate(self, fail: set[int]) -> None:
        self.lc.validate_next_boot(lambda b, s, t: "corrupt" if b.patch in fail else None)

    @rule()
    def reopen(self) -> None:
        self.lc.close()
        self.lc = Lifecycle.open(*self.dirs)

    @precondition(lambda self: self.version < 2)
    @rule()
    def full_upgrade(self) -> None:
        """A full bundle of a newer release is installed and promoted."""
        full = Build(f"{2 + self.version}.0", 0)
        if self.lc.state(full) is None:
            self.attempt(install, self.lc, full)

    @precondition(lambda self: self.version < 2)
    @rule()
    def os_upgrade(self) -> None:
        """The package manager installs a newer release: a release change at next open."""
        self.version += 1
        (self.dirs[2] / "VERSION").write_text(f"1.{self.version}\n")
        self.lc.close()
        self.lc = Lifecycle.open(*self.dirs)
        self.bad = {b for b in self.bad if self.lc.state(b) is not None}
        self.host_trees = set()

    # --- invariants ---

    @invariant()
    def store_invariants(self) -> None:
        check_invariants(self.lc)

    @invariant()
    def tombstones_are_never_lifted(self) -> None:
        now = self.lc.bad_builds()
        assert self.bad <= now, f"tombstones lost: {self.bad - now} in {self.lc!r}"
        self.bad = now

    @invariant()
    def host_trees_are_kept(self) -> None:
        for tree in self.host_trees:
            assert tree.is_dir(), f"{tree} deleted while a host may run it: {self.lc!r}"


LifecycleMachine.TestCase.settings = settings(
    max_examples=300 if FULL else 40, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_lifecycle_machine = LifecycleMachine.TestCase
