"""The invariants every campaign checks after a fault (issue 10).

After the daemon was killed (SIGKILL, a failpoint, a full disk) and restarted:

(a) it reaches ``READY=1``;
(b) ``GetBootTarget`` names a tree that is complete and byte-identical to that build's
    expected tree (the publisher's target tree, or ``release_dir`` for ``(R, 0)``);
(c) once a check completes, the newest eligible patch (published, not rolled back,
    not bad here) is installed as ``next_boot``;
(d) after a ``BootSuccess``, no staging trees, ``.patchd-tmp-`` files, state-less
    build directories or orphan downloads remain under ``state_dir``/``cache_dir``;
(e) ``release_dir`` is unchanged (a SHA-256 listing of every file, link and mode);
(f) every state file parses.

Each check raises AssertionError with the daemon's log appended, so a failure explains
itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchd.build.verify import verify_tree
from patchd.core.fsio import TEMP_PREFIX
from patchd.core.model import Bad, Build, Downloaded, Downloading, Installed, State, state_from_json
from patchd.state import Pointers
from patchd.state.layout import DOWNLOAD_SUFFIX, STAGING_DIR, STATE_FILE, TRASH_PREFIX, TREE_DIR
from support.daemon import DaemonProcess

Listing = dict[str, tuple[Any, ...]]


def listing(root: Path) -> Listing:
    """Every entry under ``root`` (and root itself): type, SHA-256, mode, link target."""
    out: Listing = {".": ("dir", stat.S_IMODE(root.lstat().st_mode))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(full.read_bytes()).hexdigest(), mode)
            else:
                out[rel] = ("special", st.st_mode)
    return out


def diff_listings(want: Listing, got: Listing, limit: int = 8) -> str:
    """A short human description of how two listings differ ('' when equal)."""
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    problems += [f"differs {k}: {want[k]} != {got[k]}"
                 for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _fail(d: DaemonProcess | None, msg: str) -> None:
    tail = "" if d is None else "\n--- daemon log (tail) ---\n" + d.log()[-6000:]
    raise AssertionError(msg + tail)


def build_of(obj: Mapping[str, Any]) -> Build:
    return Build(str(obj["release"]), int(obj["patch"]))


# --- (b) the boot target -----------------------------------------------------------------


def check_boot_target(d: DaemonProcess, trees: Mapping[Build, Path]) -> Build:
    """(b) GetBootTarget's tree equals the expected tree of that build, byte for byte."""
    reply = d.call("GetBootTarget")
    build = build_of(reply["build"])
    if build not in trees:
        _fail(d, f"boot target {build} is not a build this campaign published: {reply}")
    got = Path(reply["path"])
    if not got.is_dir():
        _fail(d, f"boot target {build} names {got}, which is not a directory")
    delta = diff_listings(listing(trees[build]), listing(got))
    if delta:
        _fail(d, f"boot target {build} at {got} differs from its build: {delta}")
    return build


# --- (c) the newest eligible patch -------------------------------------------------------


def published_patches(repo: Path, release: str) -> set[int]:
    """Patches of ``release`` in the repository's manifest that are not rolled back."""
    doc = json.loads((repo / "manifest.json").read_text())
    for entry in doc.get("releases", []):
        if entry["release"] == release:
            rolled = set(entry.get("rolled_back", []))
            return {p["patch"] for p in entry.get("patches", [])} - rolled
    return set()


def expected_next_boot(status: Mapping[str, Any], repo: Path, release: str) -> Build | None:
    """The newest published patch that is not bad here, or None when there is none."""
    bad = {build_of(b["build"]) for b in status["builds"] if b["state"] == "bad"}
    eligible = [p for p in published_patches(repo, release) if Build(release, p) not in bad]
    return Build(release, max(eligible)) if eligible else None


def check_newest_installed(d: DaemonProcess, repo: Path, release: str,
                           timeout: float = 120) -> Build:
    """(c) after a complete check, next_boot is the newest eligible patch, installed."""
    d.check_and_wait(timeout=timeout)
    status = d.status()
    if status["activity"]["phase"] != "idle":  # a check joined a still-running update
        status = d.wait_status(lambda s: s["activity"]["phase"] == "idle", "idle", timeout)
    want = expected_next_boot(status, repo, release)
    got = build_of(status["next_boot"])
    if want is not None and got != want:
        _fail(d, f"next_boot is {got}, expected the newest eligible patch {want}; "
                 f"last_error={status['last_error']}; builds={status['builds']}")
    if want is not None:
        states = {build_of(b["build"]): b["state"] for b in status["builds"]}
        if states.get(want) != "installed":
            _fail(d, f"{want} is next_boot but its state is {states.get(want)}")
    return got


# --- (d) no leftovers --------------------------------------------------------------------


def wait_trash_emptied(state_dir: Path, d: DaemonProcess | None, timeout: float = 30) -> None:
    """A running daemon deletes what a transition dropped (``builds/.trash-*``) in its
    worker thread just after the call returned: wait until that work is done."""
    deadline = time.monotonic() + timeout
    while trash := sorted((state_dir / "builds").glob(f"{TRASH_PREFIX}*")):
        if time.monotonic() > deadline:
            _fail(d, f"the daemon never emptied its trash: {trash}")
        time.sleep(0.02)


def check_no_leftovers(state_dir: Path, cache_dir: Path, d: DaemonProcess | None = None) -> None:
    """(d) no temp files, staging trees, state-less build dirs, trash or orphan downloads
    (with a running daemon ``d``, once it has emptied its trash)."""
    if d is not None:
        wait_trash_emptied(state_dir, d)
    for top in (state_dir, cache_dir):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                if name.startswith(TEMP_PREFIX) or name == STAGING_DIR:
                    _fail(d, f"leftover {Path(dirpath) / name}")
            if Path(dirpath).name == TREE_DIR:
                dirnames.clear()  # the inside of a tree is the app's business
    states = build_states(state_dir)
    pointers = read_pointers(state_dir)
    protected = {pointers.next_boot, pointers.last_booted, pointers.currently_booting}
    builds_dir = state_dir / "builds"
    for rel in sorted(os.listdir(builds_dir)) if builds_dir.is_dir() else []:
        if rel.startswith(TRASH_PREFIX):
            _fail(d, f"trash left {builds_dir / rel}")
        for patch in sorted(os.listdir(builds_dir / rel)):
            bdir = builds_dir / rel / patch
            build = Build(rel, int(patch))
            entries = set(os.listdir(bdir))
            if STATE_FILE not in entries and build not in protected:
                _fail(d, f"orphan build directory {bdir}: {sorted(entries)}")
            if entries - {STATE_FILE, TREE_DIR}:
                _fail(d, f"unexpected entries in {bdir}: {sorted(entries)}")
            state = states.get(build)
            if TREE_DIR in entries and not isinstance(state, Installed) and build not in protected:
                _fail(d, f"tree of {build} kept while it is {state}")
    wanted: set[str] = set()
    for build, state in states.items():
        if isinstance(state, Downloading | Downloaded):
            name = f"{build.release}-{build.patch}{DOWNLOAD_SUFFIX}"
            wanted |= {name, name + ".meta"}
    downloads = cache_dir / "downloads"
    for name in sorted(os.listdir(downloads)) if downloads.is_dir() else []:
        if name not in wanted:
            _fail(d, f"orphan download {downloads / name} (states: {states})")


# --- (f) state files parse ---------------------------------------------------------------


def read_pointers(state_dir: Path) -> Pointers:
    return Pointers.from_json(json.loads((state_dir / "pointers.json").read_text()))


def build_states(state_dir: Path) -> dict[Build, State]:
    """Every builds/R/N/state.json, parsed strictly (a parse error fails the check)."""
    out: dict[Build, State] = {}
    for path in sorted((state_dir / "builds").glob(f"*/*/{STATE_FILE}")):
        build = Build(path.parent.parent.name, int(path.parent.name))
        out[build] = state_from_json(json.loads(path.read_text()))
    return out


def check_state_files(state_dir: Path, d: DaemonProcess | None = None,
                      require: bool = True) -> Pointers | None:
    """(f) pointers.json, every state.json, client.json and events.json parse; installed
    builds' trees still hold the files they were installed with; ``current`` points at
    next_boot's tree. ``require=False`` allows absent files (a kill before the first
    write); a present file must always parse."""
    if not require and not (state_dir / "pointers.json").exists():
        return None
    try:
        pointers = read_pointers(state_dir)
        states = build_states(state_dir)
        client_path = state_dir / "client.json"
        if require or client_path.exists():
            client = json.loads(client_path.read_text())
            assert isinstance(client, dict) and isinstance(client.get("client_id"), str), client
        events_path = state_dir / "events.json"
        if events_path.exists():
            events = json.loads(events_path.read_text())
            assert isinstance(events, dict) and isinstance(events.get("events"), list), events
    except (ValueError, AssertionError, OSError, KeyError) as exc:
        _fail(d, f"a state file does not parse: {exc!r}")
        raise
    for build, state in states.items():
        tree = state_dir / "builds" / build.release / str(build.patch) / TREE_DIR
        if isinstance(state, Installed):
            problem = verify_tree(tree, state.files) if tree.is_dir() else f"{tree} missing"
            if problem:
                _fail(d, f"installed {build} is damaged: {problem}")
    current = state_dir / "current"
    if require and current.is_symlink():  # start-up re-points it after a crash
        nb = pointers.next_boot
        target = Path(os.readlink(current))
        want_tree = state_dir / "builds" / nb.release / str(nb.patch) / TREE_DIR
        resolved = target if target.is_absolute() else state_dir / target
        if isinstance(states.get(nb), Installed) and resolved != want_tree:
            _fail(d, f"current -> {target}, but next_boot {nb} lives at {want_tree}")
    return pointers


# --- all of them -------------------------------------------------------------------------


@dataclass
class Report:
    """What one restart's checks saw (for the campaign's printout)."""

    boot_target: Build | None = None
    next_boot: Build | None = None
    notes: list[str] = field(default_factory=list)


def check_after_restart(d: DaemonProcess, trees: Mapping[Build, Path], repo: Path,
                        release: str, release_before: Listing,
                        host_pid: int | None = None) -> Report:
    """(a)–(f) in order on a stopped daemon: start it, check, boot, check again.

    ``host_pid`` is the pid reported with BootStart (a live process: the test itself).
    """
    report = Report()
    check_state_files(d.state_dir, d, require=False)  # (f) as the crash left them
    d.start()  # (a) raises unless READY=1 arrives
    report.boot_target = check_boot_target(d, trees)  # (b)
    report.next_boot = check_newest_installed(d, repo, release)  # (c)
    check_boot_target(d, trees)
    d.call("BootStart", {"pid": host_pid if host_pid is not None else os.getpid()})
    d.call("BootSuccess", {})
    check_no_leftovers(d.state_dir, d.cache_dir, d)  # (d)
    check_state_files(d.state_dir, d)  # (f)
    after = listing(d.release_dir)  # (e)
    delta = diff_listings(release_before, after)
    if delta:
        _fail(d, f"release_dir changed: {delta}")
    states = build_states(d.state_dir)
    report.notes = [f"{b.patch}:{s.name}" for b, s in sorted(
        states.items(), key=lambda kv: kv[0].sort_key()) if isinstance(s, Bad | Installed)]
    return report
