"""Power-cut campaign: every cut point of five scenarios of the real daemon, on powerfs.

Each scenario runs ``patchd run`` with its state, cache and release directories on the
recording filesystem; then, for every cut point, the tree a power cut there would have
left (strict model; a sample under the weak model) is started by a fresh daemon and
checked (tests/e2e/powercut.py). Scenarios, small trees so that "every" stays exhaustive:

- update: first start, manifest check, a rate-limited download killed half-way and
  resumed, the install of a bundle with every op type (file, delta, dir, symlink,
  delete) onto a hard-link clone, promotion;
- boot: a boot that crashes (the host's pid exits) and falls back, a boot success, an
  install of a newer patch and a boot failure reported by the launcher;
- rollback: the server rolls back next_boot; the daemon forgets it and falls back;
- full: a full-release upgrade, installed, promoted and booted;
- tombstone: an operator's rollback writes a tombstone.

``PATCHD_FULL=1``: every scenario, every cut, and a larger weak-model sample. Default
(CI): the update and tombstone scenarios exhaustively, 13–17 cut points spread over each
of the others, and a small weak sample. Needs root and /dev/fuse; skips with the reason if not.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from invariants import build_states, listing, read_pointers
from powercut import Checker, CutResult, daemon_on, finish, recorder, run_cuts

from patchd.core.model import Bad, Build, Installed, State
from patchd.state.lifecycle import Pointers
from support.crashstate import cut_points
from support.daemon import DaemonProcess, Publisher, write_tree
from support.nginx import NGINX, run_nginx
from support.powerfs import unavailable

RELEASE, NEXT = "1.4.0", "1.5.0"
FULL = os.environ.get("PATCHD_FULL") == "1"
WEAK_SAMPLE = int(os.environ.get("PATCHD_POWERCUT_WEAK", "40" if FULL else "4"))
#: Rounds of the weak sample, each with its own seed (another random subset of the
#: unsynced operations at the same cuts): 6 rounds of up to 40 cuts in 5 scenarios is
#: 1,188 weak states in full (tombstone has 38 cut points).
WEAK_ROUNDS = int(os.environ.get("PATCHD_POWERCUT_WEAK_ROUNDS", "6" if FULL else "1"))
SEED = int(os.environ.get("PATCHD_POWERCUT_SEED", str(random.randrange(1 << 30))))
RECORD_EXTRA = '[install]\nmin_free = "0"\nmax_download_rate = "48KB"\n'
APP_TXT = "".join(f"line {i:04d} of the app's main file\n" for i in range(300))


def release_files(version: str) -> dict[str, str]:
    return {"bin/kiosk": "#!/bin/sh\necho kiosk\n", "lib/app.txt": APP_TXT,
            "lib/d0/a.txt": f"a of {version}\n", "lib/d1/b.txt": "b\n",
            "share/doc.txt": "the manual\n"}


def make_patch_tree(release: Path, dest: Path, patch: int) -> Path:
    """The release with every op type a bundle has: an edited big file (a delta), a new
    file, a new directory, a symlink, a deletion; plus a blob so downloads take a while."""
    shutil.copytree(release, dest, symlinks=True)
    (dest / "lib/app.txt").write_text(APP_TXT.replace("line 0100", f"line 0100 (patch {patch})"))
    write_tree(dest, {"lib/new.txt": f"new in {patch}\n",
                      f"share/p{patch}/notes.txt": f"patch {patch}\n"})
    (dest / "share/doc.txt").unlink()
    os.symlink("../lib/app.txt", dest / "share/app-link")
    (dest / "share/blob.bin").write_bytes(random.Random(patch).randbytes(256 * 1024))
    return dest


class Campaign:
    """nginx, a publisher, the release and the expected trees; one scenario at a time."""

    def __init__(self, tmp: Path, nginx: Any) -> None:
        self.tmp, self.nginx = tmp, nginx
        self.pristine = write_tree(tmp / "pristine", release_files(RELEASE), version=RELEASE)
        os.chmod(self.pristine / "bin/kiosk", 0o755)
        self.trees: dict[Build, Path] = {Build(RELEASE, 0): self.pristine}
        self.publisher = Publisher(tmp, nginx.root / "repo")
        self.bundles: dict[Build, Path] = {}
        for patch in (1, 2, 3):
            tree = make_patch_tree(self.pristine, tmp / "trees" / f"p{patch}", patch)
            self.trees[Build(RELEASE, patch)] = tree
            self.bundles[Build(RELEASE, patch)] = self.publisher.bundle(
                RELEASE, patch, self.pristine, tree)
        full = write_tree(tmp / "trees" / "full", release_files(NEXT) | {"lib/v2.txt": "2\n"},
                          version=NEXT)
        self.trees[Build(NEXT, 0)] = full
        self.bundles[Build(NEXT, 0)] = self.publisher.bundle(NEXT, 0, None, full)
        self.results: list[CutResult] = []

    def use_repo(self, name: str) -> None:
        self.publisher.repo = self.nginx.root / name

    @property
    def url(self) -> str:
        return self.nginx.url(f"{self.publisher.repo.name}/manifest.json")

    def publish(self, *builds: Build) -> None:
        self.publisher.publish(*(self.bundles[b] for b in builds))

    def seed(self, backing: Path) -> None:
        """The disk before the daemon first runs: the release, and the (empty) state and
        cache directories, which systemd's StateDirectory=/CacheDirectory= create."""
        shutil.copytree(self.pristine, backing / "opt" / "kiosk", symlinks=True)
        (backing / "state").mkdir(mode=0o755)
        (backing / "cache").mkdir(mode=0o750)

    def daemon(self, root: Path, name: str) -> DaemonProcess:
        return daemon_on(root, self.tmp / "rec" / name, self.url, [self.publisher.public],
                         RECORD_EXTRA)

    def checker(self, name: str, extra_pre: Callable[[Path], None] | None = None,
                expect: Callable[[DaemonProcess], None] | None = None,
                release: str = RELEASE,
                promises: dict[str, Callable[[Path], None]] | None = None) -> Checker:
        return Checker(self.tmp / "cuts" / name, self.url, [self.publisher.public],
                       self.trees, self.publisher.repo, release, listing(self.pristine),
                       expect=expect, extra_pre=extra_pre, promises=promises or {})


def on_disk(root: Path) -> tuple[Pointers | None, dict[Build, State]]:
    state = root / "state"
    pointers = read_pointers(state) if (state / "pointers.json").exists() else None
    return pointers, build_states(state)


def promise(next_boot: Build | None = None, installed: Build | None = None,
            bad: Build | None = None, gone: Build | None = None,
            last_booted: Build | None = None, either: Build | None = None
            ) -> Callable[[Path], None]:
    """What an acknowledged step put on disk, as a check of a crash state."""
    def check(root: Path) -> None:
        p, states = on_disk(root)
        want = (f"next_boot={next_boot} installed={installed} bad={bad} gone={gone} "
                f"last_booted={last_booted} either={either}")
        got = f"pointers={p} states={states}"
        assert p is not None, f"acknowledged {want}, but pointers.json is gone"
        assert next_boot is None or p.next_boot == next_boot, f"acknowledged {want}; {got}"
        assert last_booted is None or p.last_booted == last_booted, f"acknowledged {want}; {got}"
        assert installed is None or isinstance(states.get(installed), Installed), \
            f"acknowledged {want}; {got}"
        assert bad is None or isinstance(states.get(bad), Bad), f"acknowledged {want}; {got}"
        assert gone is None or not isinstance(states.get(gone), Installed), \
            f"acknowledged {want}; {got}"
        assert either is None or isinstance(states.get(either), Installed | Bad), \
            f"acknowledged {want}; {got}"
    return check


def install(d: DaemonProcess, build: Build) -> None:
    """CheckNow until ``build`` is next_boot (an event: the status says so)."""
    d.check_and_wait(timeout=120)
    status = d.status()
    assert status["next_boot"] == build.to_json(), (status, d.log()[-3000:])


def boot_ok(d: DaemonProcess) -> None:
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootSuccess", {})


def setup_booted(c: Campaign, mount: Path, *patches: int) -> None:
    """Before the checkpoint: install each patch in turn, booting all but the last."""
    d = c.daemon(mount, "setup")
    d.start()
    for i, patch in enumerate(patches):
        c.publish(*(Build(RELEASE, p) for p in patches[: i + 1]))
        install(d, Build(RELEASE, patch))
        if i < len(patches) - 1:
            boot_ok(d)
    d.stop()
    d.close()


# --- the scenarios: each records on powerfs and returns its checker ---------------------


def scenario_update(c: Campaign, fs: Any) -> Checker:
    c.publish(Build(RELEASE, 1))
    fs.checkpoint()
    d = c.daemon(fs.mount, "update")
    fs.mark("first-start")
    d.start()
    fs.mark("download")
    d.call("CheckNow")
    d.wait_status(lambda s: s["activity"]["phase"] == "downloading"
                  and 0 < s["activity"]["done"] < s["activity"]["total"], "half a download")
    d.kill()  # a crash of the process (the page cache survives), then a resume
    fs.mark("resume")
    d.start()
    install(d, Build(RELEASE, 1))
    fs.mark("ok-installed")
    d.stop()
    d.close()
    return c.checker("update", promises={
        "ok-installed": promise(next_boot=Build(RELEASE, 1), installed=Build(RELEASE, 1))})


def scenario_boot(c: Campaign, fs: Any) -> Checker:
    setup_booted(c, fs.mount, 1, 2)
    fs.checkpoint()
    d = c.daemon(fs.mount, "boot")
    fs.mark("start")
    d.start()
    fs.mark("boot-crash")
    host = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    d.call("BootStart", {"pid": host.pid})
    host.kill()
    host.wait()
    d.wait_status(lambda s: s["next_boot"] == Build(RELEASE, 1).to_json(), "fallback to p1")
    fs.mark("ok-crash")
    fs.mark("boot-success")
    boot_ok(d)
    fs.mark("ok-booted")
    fs.mark("install-p3")
    c.publish(Build(RELEASE, 1), Build(RELEASE, 2), Build(RELEASE, 3))
    install(d, Build(RELEASE, 3))
    fs.mark("ok-p3")
    fs.mark("boot-failure")
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootFailure", {"reason": "crashed"})
    fs.mark("ok-failed")
    d.stop()
    d.close()
    p1, p2, p3 = (Build(RELEASE, n) for n in (1, 2, 3))
    return c.checker("boot", promises={
        "ok-crash": promise(bad=p2), "ok-booted": promise(last_booted=p1),
        "ok-p3": promise(either=p3), "ok-failed": promise(next_boot=p1, bad=p3)})


def scenario_rollback(c: Campaign, fs: Any) -> Checker:
    setup_booted(c, fs.mount, 1, 2)
    fs.checkpoint()
    d = c.daemon(fs.mount, "rollback")
    d.start()
    fs.mark("server-rollback")
    c.publisher.roll_back(RELEASE, 2)
    d.check_and_wait()
    assert d.status()["next_boot"] == Build(RELEASE, 1).to_json()
    fs.mark("ok-rolled-back")
    d.stop()
    d.close()
    return c.checker("rollback", promises={
        "ok-rolled-back": promise(next_boot=Build(RELEASE, 1), gone=Build(RELEASE, 2))})


def scenario_full(c: Campaign, fs: Any) -> Checker:
    setup_booted(c, fs.mount, 1)
    d = c.daemon(fs.mount, "full")
    d.start()
    boot_ok(d)  # p1 booted: the base of the upgrade
    d.stop()
    fs.checkpoint()
    d.start()
    fs.mark("full-upgrade")
    c.publish(Build(RELEASE, 1), Build(NEXT, 0))
    install(d, Build(NEXT, 0))
    fs.mark("ok-installed")
    fs.mark("boot-new-release")
    boot_ok(d)
    fs.mark("ok-booted")
    d.stop()
    d.close()

    def expect(dd: DaemonProcess) -> None:
        status = dd.status()
        assert status["next_boot"] == Build(NEXT, 0).to_json(), status

    full = Build(NEXT, 0)
    return c.checker("full", expect=expect, release=NEXT, promises={
        "ok-installed": promise(next_boot=full, installed=full),
        "ok-booted": promise(last_booted=full)})


def scenario_tombstone(c: Campaign, fs: Any) -> Checker:
    setup_booted(c, fs.mount, 1, 2)
    fs.checkpoint()
    d = c.daemon(fs.mount, "tombstone")
    d.start()
    fs.mark("manual-rollback")
    d.call("Rollback")
    fs.mark("ok-rolled-back")
    d.stop()
    d.close()

    def tombstone_kept(root: Path) -> None:
        """Once next_boot left p2 on disk, p2's tombstone must be on disk too."""
        state = root / "state"
        if not (state / "pointers.json").exists():
            return
        if read_pointers(state).next_boot != Build(RELEASE, 2) and \
                not isinstance(build_states(state).get(Build(RELEASE, 2)), Bad):
            raise AssertionError(f"next_boot moved off p2 but its tombstone is lost: "
                                 f"{build_states(state)}")

    return c.checker("tombstone", extra_pre=tombstone_kept, promises={
        "ok-rolled-back": promise(next_boot=Build(RELEASE, 1), bad=Build(RELEASE, 2))})


SCENARIOS: dict[str, Callable[[Campaign, Any], Checker]] = {
    "update": scenario_update, "boot": scenario_boot, "rollback": scenario_rollback,
    "full": scenario_full, "tombstone": scenario_tombstone,
}
#: CI: these run exhaustively, the others on a spread of their cut points.
CI_EXHAUSTIVE = {"update", "tombstone"}
CI_SPREAD = 12


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """nginx, the publisher, the release and every bundle, once for all scenarios."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not Path(NGINX).exists():
        pytest.skip(f"nginx not installed at {NGINX} (CI installs it)")
    tmp = tmp_path_factory.mktemp("powercut")
    with run_nginx(tmp / "www", tmp / "nginx") as nginx:
        c = Campaign(tmp, nginx)
        yield c
    print(f"\npower-cut campaign (seed {SEED}):")
    for r in c.results:
        print(f"  {r.scenario:10} {r.model:6} {r.cuts:4} cut points, {r.states:3} distinct "
              f"states, {len(r.failures)} failing; by step {r.by_label}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_power_cut_keeps_the_invariants(campaign: Campaign, name: str) -> None:
    """Every cut point's crash state (strict; a weak sample too) keeps every invariant."""
    c = campaign
    c.use_repo(f"repo-{name}")
    started = time.monotonic()
    with recorder(c.tmp, name, c.seed) as fs:
        checker = SCENARIOS[name](c, fs)
    rec = finish(fs, name)
    cuts = cut_points(rec.ops)
    sample = None
    if not FULL and name not in CI_EXHAUSTIVE:
        sample = [*cuts[:: max(1, len(cuts) // CI_SPREAD)], cuts[-1]]
    out = c.tmp / "states"
    strict = run_cuts(rec, checker, out, sample=sample)
    rng = random.Random(SEED ^ zlib.crc32(name.encode()))  # stable across processes
    weak_cuts = sorted(rng.sample(cuts, min(WEAK_SAMPLE, len(cuts))))
    weak = [run_cuts(rec, checker, out, model="weak", seed=SEED + k, sample=weak_cuts)
            for k in range(WEAK_ROUNDS)]
    c.results += [strict, *weak]
    print(f"{name}: {rec.cuts} cut points ({'all' if sample is None else len(sample)} "
          f"checked: {strict.states} distinct strict states), weak sample "
          f"{sum(w.cuts for w in weak)} in {WEAK_ROUNDS} round(s) "
          f"({sum(w.states for w in weak)} states), {time.monotonic() - started:.0f} s")
    failures = strict.failures + [f for w in weak for f in w.failures]
    assert not failures, f"{len(failures)} crash states broke an invariant:\n\n" + \
        "\n\n".join(failures[:6])
