"""Lifecycle test helpers: a release tree, a stand-in installer, a random driver, the
invariants — and, run as a script, a child process that drives the store.

``python lifecycle_child.py STATE CACHE RELEASE SEED [STEPS] [ACTION...]`` performs
random transitions forever (or STEPS of them), or the named actions; the crash and
failpoint tests kill it (SIGKILL or ``PATCHD_FAILPOINT``) and check what it left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

from patchd.core import fsio
from patchd.core.errors import BadInputError, LifecycleError
from patchd.core.model import (
    Bad,
    BadReason,
    Build,
    Downloaded,
    Downloading,
    Installed,
    state_from_json,
)
from patchd.state import Action, Lifecycle, Pointers
from patchd.state.layout import CURRENT_LINK, POINTERS_FILE

REASONS = list(BadReason)
#: How often the random driver picks each transition: mostly progress, some failure.
WEIGHTS = {"download": 6, "partial": 3, "evict": 1, "install": 8, "abort": 1,
           "boot_start": 6, "boot_success": 4, "boot_failure": 2, "crash": 2, "rollback": 1,
           "manual": 1, "mark_bad": 1, "validate": 2}


def make_release(root: Path, release: str = "1.0.0") -> tuple[Path, Path, Path]:
    """state_dir, cache_dir and a release_dir holding VERSION and two files."""
    state, cache, rel = root / "state", root / "cache", root / "release"
    rel.mkdir(parents=True, exist_ok=True)
    (rel / "VERSION").write_text(f"{release}\nbuilt by the test\n")
    (rel / "bin").mkdir(exist_ok=True)
    (rel / "bin" / "app").write_text("#!/bin/sh\necho base\n")
    return state, cache, rel


def sha_of(build: Build) -> str:
    return hashlib.sha256(f"bundle {build}".encode()).hexdigest()


def url_of(build: Build) -> str:
    return f"https://updates.example/{build.release}/{build.patch}.patchd"


def size_of(build: Build) -> int:
    return 32 + build.patch


def start_download(lc: Lifecycle, build: Build) -> Action:
    """Ask the lifecycle, then do what it says up to (not including) the network."""
    d = lc.decide_start(build, url_of(build), sha_of(build), size_of(build))
    if d.action is Action.FRESH:
        path = lc.download_path(build)
        path.parent.mkdir(parents=True, exist_ok=True)
        lc.record_download_started(build, url_of(build), sha_of(build), size_of(build))
        path.write_bytes(b"")
    return d.action


def receive(lc: Lifecycle, build: Build, count: int) -> None:
    """Append ``count`` bytes (at most up to the size) to a downloading build's file."""
    path = lc.download_path(build)
    have = path.stat().st_size if path.exists() else 0
    with path.open("ab") as f:
        f.write(b"x" * max(0, min(count, size_of(build) - have)))


def download(lc: Lifecycle, build: Build) -> None:
    """A whole download: decide, fetch the rest, record completion."""
    action = start_download(lc, build)
    if action in (Action.FRESH, Action.RESUME, Action.VERIFY):
        receive(lc, build, size_of(build))
        lc.record_download_complete(build)


def install(lc: Lifecycle, build: Build, *, promote: bool = True) -> None:
    """Stand-in for install.py: staging tree, rename to tree, tell the lifecycle."""
    lc.record_install_started(build)
    staging = lc.staging_path(build)
    fsio.remove_tree(staging)
    (staging / "bin").mkdir(parents=True)
    content = f"#!/bin/sh\necho {build}\n".encode()
    (staging / "bin" / "app").write_bytes(content)
    tree = lc.tree_path(build) if build.patch else staging.parent / "tree"
    if tree.exists():  # a forgotten tree kept for a host; the installer swaps it
        fsio.remove_tree(tree)
    os.rename(staging, tree)
    lc.record_install_complete(build, len(content),
                               {"bin/app": hashlib.sha256(content).hexdigest()})
    if promote:
        lc.promote_to_next_boot(build)


def ready(lc: Lifecycle, build: Build, *, promote: bool = True) -> None:
    """Download and install ``build`` (the usual path to next_boot)."""
    download(lc, build)
    install(lc, build, promote=promote)


# --- invariants --------------------------------------------------------------------------


def check_files_parse(state_dir: Path) -> None:
    """Every state file on disk is complete JSON of the right shape (no torn writes)."""
    pointers = state_dir / POINTERS_FILE
    if pointers.exists():
        Pointers.from_json(json.loads(pointers.read_bytes()))
    for path in (state_dir / "builds").glob("*/*/state.json"):
        state_from_json(json.loads(path.read_bytes()))


def check_invariants(lc: Lifecycle) -> None:
    """next_boot is installed or a base and never bad; ``current`` points at its tree."""
    check_files_parse(lc.state_dir)
    p = lc.pointers
    nb = p.next_boot
    state = lc.state(nb)
    assert not isinstance(state, Bad), f"bad build is next_boot: {lc!r}"
    if nb != Build(lc.os_release, 0):
        assert isinstance(state, Installed), f"next_boot {nb} is {state}: {lc!r}"
        assert lc.tree_path(nb).is_dir(), f"next_boot tree missing: {lc!r}"
    build, path = lc.boot_target()
    assert build == nb and path == lc.tree_path(nb)
    link = lc.state_dir / CURRENT_LINK
    assert link.is_symlink(), f"current missing: {lc!r}"
    assert (lc.state_dir / os.readlink(link)).resolve() == path.resolve(), (
        f"current -> {os.readlink(link)} but next_boot tree is {path}: {lc!r}")
    hosts = (p.last_booted, p.currently_booting)
    for b, s in lc.builds():
        if isinstance(s, Downloading | Downloaded) and b not in hosts:
            assert not lc.tree_path(b).exists(), f"{b} is {s.name} but has a tree: {lc!r}"


# --- random driver -----------------------------------------------------------------------


def random_step(lc: Lifecycle, rng: random.Random) -> str:
    """One random transition a real daemon could make; returns its name.

    Transitions a state forbids raise LifecycleError (or InstallLoop), which is an
    answer, not a failure.
    """
    # A window around the newest patch, so fresh builds keep coming as old ones go bad.
    newest = max((b.patch for b, _ in lc.builds() if b.release == lc.release), default=0)
    build = Build(lc.release, rng.randint(max(1, newest - 3), newest + 2))
    op = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    try:
        if op == "download":
            download(lc, build)
        elif op == "partial":
            if start_download(lc, build) in (Action.FRESH, Action.RESUME):
                receive(lc, build, rng.randint(1, 20))
        elif op == "evict":
            fsio.remove_tree(lc.download_path(build))
        elif op == "install":
            if isinstance(lc.state(build), Downloaded):
                install(lc, build, promote=rng.random() < 0.8)
        elif op == "abort":
            if isinstance(lc.state(build), Downloaded):
                lc.record_install_started(build)
                lc.record_install_aborted(build)
        elif op == "boot_start":
            lc.record_boot_start(None, os.getpid() if rng.random() < 0.5 else None, None)
        elif op == "boot_success":
            lc.record_boot_success(None)
        elif op == "boot_failure":
            lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "random failure")
        elif op == "crash":
            lc.detect_boot_crash(lambda pid, start: rng.random() < 0.5)
        elif op == "rollback":
            lc.forget_rolled_back(build)
        elif op == "manual":
            lc.manual_rollback()
        elif op == "mark_bad":
            lc.mark_bad(build, rng.choice(REASONS), "random")
        elif op == "validate":
            lc.validate_next_boot(lambda b, s, t: "random problem" if rng.random() < 0.1 else None)
    except (LifecycleError, BadInputError):
        pass
    return op


def main(argv: list[str]) -> int:
    import logging

    import structlog  # the child's logs are noise; the parent checks the results

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    state, cache, rel, seed = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    steps = int(argv[4]) if len(argv) > 4 else -1
    rng = random.Random(seed)
    with Lifecycle.open(state, cache, rel) as lc:
        if len(argv) > 5:
            return run_actions(lc, argv[5:])
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while steps != 0:
            random_step(lc, rng)
            steps -= 1
    return 0


def run_actions(lc: Lifecycle, actions: list[str]) -> int:
    """Named actions for failpoint tests, e.g. ``boot_failure`` or ``ready:1.0.0:2``."""
    for action in actions:
        name, _, arg = action.partition(":")
        build = Build(arg.rsplit(":", 1)[0], int(arg.rsplit(":", 1)[1])) if arg else None
        if name == "ready":
            assert build is not None
            ready(lc, build)
        elif name == "boot_start":
            lc.record_boot_start(None, None, None)
        elif name == "boot_success":
            lc.record_boot_success(None)
        elif name == "boot_failure":
            lc.record_boot_failure(None, BadReason.BOOT_FAILURE, "failpoint test")
        else:
            raise SystemExit(f"unknown action {action}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
