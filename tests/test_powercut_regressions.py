"""Regression cases of the bugs the power-cut campaign found, one transition each.

Each runs one lifecycle transition or one install in this process with the state on
powerfs, then checks every cut point's crash state (strict model, docs/reliability.md):
what a transition has recorded must survive a power cut once it has returned, and a
build recorded installed must have its whole tree at every cut.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.build.install import materialise
from patchd.core.model import Build, Downloading, Installed, state_from_json
from support.crashstate import crash_states, read_log
from support.crashstate import materialise as write_state
from support.install_child import Env, listing, make_env, stage_download
from support.powerfs import PowerFs, unavailable

R = "1.0"
B1 = Build(R, 1)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[PowerFs, Env]]:
    """powerfs over a disk holding a release and empty state and cache directories."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    backing = tmp_path / "backing"
    release = backing / "release"
    for rel, text in {"VERSION": "1.0\n", "bin/app": "#!/bin/sh\n", "lib/a.txt": "a\n",
                      "lib/sub/b.txt": "b\n", "share/old.txt": "old\n"}.items():
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        (release / rel).write_text(text)
    (backing / "state").mkdir()
    (backing / "cache").mkdir()
    mount = tmp_path / "mnt"
    with PowerFs(backing, mount, tmp_path / "ops.log") as fs:
        env = make_env(tmp_path, state=mount / "state", cache=mount / "cache",
                       release=mount / "release")
        yield fs, env


def states_after(fs: PowerFs, tmp: Path) -> Iterator[tuple[bool, int, Path]]:
    """(returned yet?, cut, crash state written to a directory) for every cut point."""
    ops = read_log(fs.log)
    returned = next(i for i, op in enumerate(ops) if op["op"] == "mark")
    for cut, root in crash_states(fs.snapshot, ops):
        dest = tmp / f"cut-{cut}"
        write_state(root, dest)
        yield cut >= returned, cut, dest


def build_state(root: Path, build: Build) -> object:
    path = root / "state" / "builds" / build.release / str(build.patch) / "state.json"
    return state_from_json(json.loads(path.read_text())) if path.exists() else None


def test_new_build_directory_survives_a_power_cut(mounted: tuple[PowerFs, Env],
                                                  tmp_path: Path) -> None:
    """A new build's first state survives every cut once recorded (its new dirs too)."""
    fs, env = mounted
    with env.open() as lc:
        fs.checkpoint()
        lc.record_download_started(B1, "https://updates.example/b1", "0" * 64, 10)
        fs.mark("returned")
    lost = [cut for done, cut, root in states_after(fs, tmp_path)
            if done and not isinstance(build_state(root, B1), Downloading)]
    assert not lost, f"the recorded download was lost at cut points {lost}"


@pytest.mark.parametrize("clone", ["hardlink", "copy"])
def test_installed_tree_is_whole_at_every_power_cut(mounted: tuple[PowerFs, Env],
                                                    tmp_path: Path, clone: str) -> None:
    """An install is never on disk as installed without its whole tree, at any cut."""
    fs, env = mounted
    target = tmp_path / "target"
    shutil.copytree(fs.backing / "release", target, symlinks=True)
    (target / "lib/a.txt").write_text("a, patched\n")
    (target / "share/old.txt").unlink()
    (target / "share/new").mkdir()
    (target / "share/new/n.txt").write_text("new\n")
    os.symlink("../lib/a.txt", target / "share/link")
    bundle = env.pack(B1, fs.backing / "release", target)
    want = listing(target)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        fs.checkpoint()
        materialise(lc, env.request(B1, bundle, clone=clone))  # type: ignore[arg-type]
        fs.mark("returned")
    checked = 0
    for done, cut, root in states_after(fs, tmp_path):
        state = build_state(root, B1)
        tree = root / "state" / "builds" / R / "1" / "tree"
        if isinstance(state, Installed) or done:
            assert isinstance(state, Installed), f"cut {cut}: returned, but state is {state}"
            assert listing(tree) == want, f"cut {cut}: installed tree differs from the target"
            checked += 1
        shutil.rmtree(root)
    assert checked >= 1
