"""Harness of the power-cut campaign: record a scenario on powerfs, then check every cut.

A scenario runs the real daemon with ``state_dir``, ``cache_dir`` and ``release_dir``
on the recording filesystem (:mod:`support.powerfs`). For each cut point the crash
state (:mod:`support.crashstate`) is written to a plain directory, as if the disk had
been mounted there after the power came back, and a fresh daemon is started on it.
Cut points whose crash states are byte-identical are checked once and counted each.

The checks, on the crash state as the power cut left it (before any repair):

- every state file that is present parses;
- every build recorded ``installed`` has a tree identical to its build (not only the
  files the bundle wrote: the clone too);
- every promise already made holds: a scenario marks the log (``ok-NAME``) when the
  daemon has acknowledged a step (an install reported done, a BootSuccess answered), and
  from that cut on, what was acknowledged must be on disk. A crash state that merely
  lies between two writes of one transition is not a failure: start-up repairs those;

then :func:`invariants.check_after_restart` (READY, the boot target's tree is
byte-identical, an update resumes and completes to the newest eligible build, no
leftovers after a boot, state files parse, ``release_dir`` untouched), plus: ``current``
points at the boot target's tree, and no installed build's tree is incomplete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invariants import (
    build_states,
    check_after_restart,
    check_state_files,
    diff_listings,
    listing,
)

from patchd.core.model import Build, Installed
from support.crashstate import crash_states, cut_points, digest, materialise, read_log
from support.daemon import DaemonProcess
from support.powerfs import PowerFs

Trees = dict[Build, Path]


class CutFailure(AssertionError):
    """A crash state broke an invariant; the message names the cut and the step."""


def daemon_on(root: Path, work: Path, manifest_url: str, keys: list[str],
              extra: str = "", env: dict[str, str] | None = None) -> DaemonProcess:
    """A daemon whose state, cache and release live under ``root`` (the mount, or a
    crash state) while its config, log and socket stay off it (they are not state)."""
    d = DaemonProcess(work, manifest_url=manifest_url, keys=keys,
                      release_dir=root / "opt" / "kiosk", extra=extra, env=env)
    d.state_dir, d.cache_dir = root / "state", root / "cache"
    d.write_config(manifest_url, keys, extra)
    return d


@dataclass
class Recording:
    """One scenario as recorded: the snapshot its log starts from, and the log."""

    name: str
    snapshot: Path
    log: Path
    mount: Path
    ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuts(self) -> int:
        return len(cut_points(self.ops))

    def labels(self) -> list[tuple[int, str]]:
        """(op index, label) of every mark."""
        return [(i, op["label"]) for i, op in enumerate(self.ops) if op["op"] == "mark"]

    def promise_cuts(self) -> dict[str, int]:
        """mark label → the first cut at which every change made before the mark is
        applied (opens and releases between the last change and the mark do not count)."""
        cuts = cut_points(self.ops)
        return {label: max(c for c in cuts if c <= i) for i, label in self.labels()}

    def label_at(self, cut: int) -> str:
        """The step a cut falls in (the last step mark before it; promises aside)."""
        found = "start"
        for i, label in self.labels():
            if i < cut and not label.startswith("ok-"):
                found = label
        return found


@contextlib.contextmanager
def recorder(tmp: Path, name: str, seed_tree: Callable[[Path], None]) -> Iterator[PowerFs]:
    """A fresh backing directory (``seed_tree`` lays out the release) mounted through
    powerfs at a short path; unmounted on exit."""
    backing = tmp / f"{name}-backing"
    backing.mkdir()
    seed_tree(backing)
    mount = Path(tempfile.mkdtemp(prefix=f"pc-{name}-", dir="/tmp"))
    try:
        with PowerFs(backing, mount, tmp / f"{name}.log") as fs:
            yield fs
    finally:
        with contextlib.suppress(OSError):
            mount.rmdir()


def finish(fs: PowerFs, name: str) -> Recording:
    rec = Recording(name, fs.snapshot, fs.log, fs.mount)
    rec.ops = read_log(fs.log)
    return rec


@dataclass
class CutResult:
    """What the campaign found for one scenario."""

    scenario: str
    model: str
    cuts: int = 0
    states: int = 0
    failures: list[str] = field(default_factory=list)
    by_label: dict[str, int] = field(default_factory=dict)


@dataclass
class Checker:
    """Starts a fresh daemon on each crash state and checks it (thread-safe)."""

    work: Path
    manifest_url: str
    keys: list[str]
    trees: Trees
    repo: Path
    release: str
    release_listing: dict[str, tuple[Any, ...]]
    expect: Callable[[DaemonProcess], None] | None = None
    extra_pre: Callable[[Path], None] | None = None
    #: mark label (``ok-NAME``) → what must be on disk at every cut after it
    promises: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    _n: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, root: Path, where: str, promised: frozenset[str] = frozenset()) -> None:
        with self._lock:
            self._n += 1
            n = self._n
        pre_checks(root, self.trees, where)
        try:
            if self.extra_pre is not None:
                self.extra_pre(root)
            for label in sorted(promised):
                self.promises[label](root)
        except AssertionError as exc:
            raise CutFailure(f"{where}: before restart: {exc}") from None
        d = daemon_on(root, self.work / f"d{n}", self.manifest_url, self.keys,
                      extra='[install]\nmin_free = "0"\n')
        try:
            # (a)–(f): READY, boot target, newest installed, no leftovers, state, release.
            check_after_restart(d, self.trees, self.repo, self.release, self.release_listing)
            check_current(d)
            check_installed_trees(root / "state", self.trees, where)
            if self.expect is not None:
                self.expect(d)
            d.stop()
        except AssertionError as exc:
            raise CutFailure(f"{where}: {exc}") from None
        finally:
            d.close()


def pre_checks(root: Path, trees: Trees, where: str) -> None:
    """The crash state as the power cut left it: parseable, no incomplete install."""
    state = root / "state"
    try:
        check_state_files(state, None, require=False)
    except AssertionError as exc:
        raise CutFailure(f"{where}: before restart: {exc}") from None
    check_installed_trees(state, trees, f"{where}: before restart")


def check_installed_trees(state: Path, trees: Trees, where: str) -> None:
    """Every build recorded installed has the whole tree of its build, byte for byte."""
    for build, st in build_states(state).items():
        if not isinstance(st, Installed) or build not in trees:
            continue
        tree = state / "builds" / build.release / str(build.patch) / "tree"
        if not tree.is_dir():
            raise CutFailure(f"{where}: {build} is installed but {tree} is missing")
        delta = diff_listings(listing(trees[build]), listing(tree))
        if delta:
            raise CutFailure(f"{where}: {build} is installed but its tree is incomplete: "
                             f"{delta}")


def check_current(d: DaemonProcess) -> None:
    """``current`` names the tree GetBootTarget names, and it exists."""
    reply = d.call("GetBootTarget")
    link = d.state_dir / "current"
    target = Path(os.readlink(link))
    resolved = target if target.is_absolute() else d.state_dir / target
    if not resolved.is_dir() or resolved.resolve() != Path(reply["path"]).resolve():
        raise AssertionError(f"current -> {target}, but the boot target is {reply['path']}")


def run_cuts(rec: Recording, checker: Checker, out: Path, *, model: str = "strict",
             seed: int | None = None, sample: list[int] | None = None,
             workers: int = 2) -> CutResult:
    """Check the crash state of every cut point of ``rec`` (or only ``sample``'s)."""
    result = CutResult(rec.name, model)
    todo: dict[tuple[str, frozenset[str]], tuple[Path, list[int], frozenset[str]]] = {}
    wanted = None if sample is None else set(sample)
    for cut, root in crash_states(rec.snapshot, rec.ops, seed=seed, only=wanted):
        result.cuts += 1
        label = rec.label_at(cut)
        result.by_label[label] = result.by_label.get(label, 0) + 1
        promised = frozenset(label for label, at in rec.promise_cuts().items()
                             if cut >= at and label in checker.promises)
        key = (digest(root), promised)
        if key in todo:
            todo[key][1].append(cut)
            continue
        # The seed keeps rounds of the weak model apart (each round numbers from 0).
        tag = model if seed is None else f"{model}-{seed}"
        dest = out / f"{rec.name}-{tag}-{len(todo):04d}"
        materialise(root, dest, relocate=(str(rec.mount), str(dest)))
        todo[key] = (dest, [cut], promised)
    result.states = len({k[0] for k in todo})

    def one(item: tuple[Path, list[int], frozenset[str]]) -> str | None:
        dest, cuts, promised = item
        where = (f"{rec.name} [{model}] cut after op {cuts[0]} ({rec.label_at(cuts[0])}; "
                 f"{len(cuts)} cut point(s) share this state; op: "
                 f"{json.dumps(rec.ops[cuts[0] - 1])[:160] if cuts[0] else 'none'})")
        try:
            checker.check(dest, where, promised)
        except CutFailure as exc:
            return str(exc)[:3000]
        shutil.rmtree(dest, ignore_errors=True)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        result.failures = [f for f in pool.map(one, todo.values()) if f]
    return result
