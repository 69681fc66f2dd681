"""The bounded manifest (docs/formats.md#what-the-manifest-keeps): at every point of a
publishing history, any host decides the same from the bounded manifest as from the full
history, except a host that tombstoned every patch kept for it (then it takes nothing)
or whose release was dropped; and the real publisher serves exactly that manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchd.core.errors import UsageError
from patchd.core.model import Build
from patchd.publisher.history import HISTORY, bounded, with_bundle, with_rolled_back
from patchd.publisher.publish import keygen, pack_command, publish, roll_back
from patchd.trust.manifest import BundleRef, Manifest, parse_manifest
from patchd.trust.strategy import Decision, HostView, decide, rolled_back_builds
from support.trees import write_tree

RELEASES = ("1.0", "1.1", "1.2")
ARCHS = ("x86_64", "aarch64", "any")
HOST_ARCHS = ("x86_64", "aarch64", "riscv64")  # riscv64: named by no bundle
NOW = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Publish:
    release: int
    patch: int  # 0: the next new patch number of the release
    archs: frozenset[str]
    rollout: int | None


@dataclass(frozen=True)
class RollBack:
    release: int
    patch: int


Op = Publish | RollBack

ops = st.lists(st.one_of(
    st.builds(Publish, st.integers(0, len(RELEASES) - 1), st.sampled_from([0, 0, 0, 1, 2, 3, 4]),
              st.frozensets(st.sampled_from(ARCHS), min_size=1),
              st.one_of(st.none(), st.sampled_from([0, 10, 50, 100]), st.integers(0, 100))),
    st.builds(RollBack, st.integers(0, len(RELEASES) - 1), st.integers(1, 6)),
), min_size=1, max_size=40)


def apply(history: Manifest, op: Op, counter: int) -> Manifest:
    """One publisher step on the history, as ``publish`` and ``--roll-back`` make it."""
    release = RELEASES[op.release]
    entry = history.releases.get(release)
    if isinstance(op, RollBack):
        return with_rolled_back(history, release, op.patch) if entry else history
    patch = op.patch or 1 + max((p.patch for p in entry.patches) if entry else (), default=0)
    for arch in sorted(op.archs):
        sha = hashlib.sha256(f"{release}:{patch}:{arch}:{counter}".encode()).hexdigest()
        ref = BundleRef(arch, f"{release}/{patch}-{arch}.patchd", 1000 + patch, sha)
        history = with_bundle(history, release, patch, ref, op.rollout, 100)
    return history


#: What varies between hosts besides their release, next boot and arch (which every
#: step tries exhaustively): tombstones, client ids (rollout buckets), a next boot of
#: another release (a full upgrade waiting for its first boot).
hosts = st.lists(st.tuples(
    st.frozensets(st.integers(1, 8), max_size=3),
    st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"]),
    st.sampled_from([False] * 7 + [True]),
), min_size=1, max_size=3)


def _above(build: Build) -> frozenset[Build]:
    """Every patch above ``build`` of its release (to ask the history for it alone)."""
    return frozenset(Build(build.release, n) for n in range(build.patch + 1, 20))


def host_view(release: str, patch: int, elsewhere: bool, bad: frozenset[int], arch: str,
              client: str) -> HostView:
    next_release = "0.9" if elsewhere else release
    return HostView(release=release, next_boot=Build(next_release, patch),
                    bad=frozenset(Build(release, n) for n in bad), arch=arch,
                    client_id=client, full_upgrades=True)


def tombstoned_floor(served: Manifest, host: HostView, full: Decision,
                     bounded_decision: Decision) -> bool:
    """The documented exception: the host tombstoned a patch the bounded manifest offers
    it at 100 % (its floor) above what the full history gives it; the bounded manifest
    then gives it an older patch of the history (with the same bundle) or nothing."""
    assert full.build is not None
    entry = served.releases[host.release]
    floor_bad = any(p.patch > full.build.patch and p.rollout == 100
                    and p.patch not in entry.rolled_back and p.bundle_for(host.arch)
                    and Build(host.release, p.patch) in host.bad for p in entry.patches)
    older = bounded_decision == Decision("none") or (
        bounded_decision.build is not None and bounded_decision.build.patch < full.build.patch)
    return floor_bad and older


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_ops=ops, host_specs=hosts, keep=st.integers(1, 3))
def test_bounded_manifest_decides_as_the_full_history(
        history_ops: list[Op], host_specs: list[tuple[frozenset[int], str, bool]],
        keep: int) -> None:
    """After every step of a random history (patches for some arches, rollout steps,
    rollbacks, roll-forwards), every host's rollbacks and decision from the bounded
    manifest equal the full history's, but for the two documented exceptions. Every
    release, next boot (0 to past the newest patch) and arch is tried at every step."""
    history = Manifest("kiosk", "stable", 0, NOW, {})
    for step, op in enumerate(history_ops):
        history = apply(history, op, step)
        served = bounded(history, keep)
        newest = sorted(history.releases, key=RELEASES.index)[-keep:]
        for release, entry in history.releases.items():
            if release not in served.releases:
                # Dropped: older than the keep_releases newest; nothing of it is offered.
                assert release not in newest
                continue
            assert rolled_back_builds(served, release) == rolled_back_builds(history, release)
            top = max((p.patch for p in entry.patches), default=0)
            for patch in range(top + 2):
                for arch in HOST_ARCHS:
                    for bad, client, elsewhere in host_specs:
                        host = host_view(release, patch, elsewhere, bad, arch, client)
                        full_decision = decide(history, host)
                        served_decision = decide(served, host)
                        if served_decision != full_decision:
                            assert tombstoned_floor(served, host, full_decision,
                                                    served_decision), (
                                history, served, host, full_decision, served_decision)
                            if served_decision.build is not None:  # the history's bundle
                                assert served_decision == decide(history, replace(
                                    host, bad=host.bad | _above(served_decision.build)))


def test_a_host_that_tombstoned_its_floor_takes_nothing() -> None:
    """The documented exception: patches 1 and 2 at 100 %; a host that tombstoned 2 would
    take 1 from the full history; the bounded manifest offers it nothing (it stays)."""
    history = Manifest("kiosk", "stable", 0, NOW, {})
    for step, op in enumerate([Publish(0, 1, frozenset({"any"}), 100),
                               Publish(0, 2, frozenset({"any"}), 100)]):
        history = apply(history, op, step)
    served = bounded(history)
    assert [p.patch for p in served.releases["1.0"].patches] == [2]
    host = host_view("1.0", 0, False, frozenset({2}), "x86_64", "a")
    assert decide(history, host).build == Build("1.0", 1)
    assert decide(served, host) == Decision("none")
    assert tombstoned_floor(served, host, decide(history, host), Decision("none"))


def test_a_floor_per_arch_keeps_what_each_arch_needs() -> None:
    """x86_64 hosts stop at patch 3; aarch64 hosts, whose newest full-rollout patch is 1,
    keep seeing 1 and 2; a host of an arch no bundle names sees only ``any`` bundles."""
    history = Manifest("kiosk", "stable", 0, NOW, {})
    for step, op in enumerate([Publish(0, 1, frozenset({"aarch64", "x86_64"}), 100),
                               Publish(0, 2, frozenset({"aarch64", "x86_64"}), 20),
                               Publish(0, 3, frozenset({"x86_64"}), 100),
                               Publish(0, 4, frozenset({"any"}), 0)]):
        history = apply(history, op, step)
    kept = {p.patch: sorted(b.arch for b in p.bundles)
            for p in bounded(history).releases["1.0"].patches}
    assert kept == {1: ["aarch64"], 2: ["aarch64"], 3: ["x86_64"], 4: ["any"]}


# --- the real publisher ----------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    for release in ("1.0", "2.0", "3.0"):
        write_tree(tmp_path / f"base-{release}", {"app": ("file", b"v0", 0o755),
                                                  "VERSION": ("file", f"{release}\n".encode(),
                                                              0o644)})
    key = tmp_path / "key.pem"
    keygen(key)
    return {"root": tmp_path, "key": key, "repo": tmp_path / "repo"}


def bundle(env: dict[str, Path], patch: int, release: str = "1.0") -> Path:
    target = env["root"] / f"target-{release}-{patch}"
    write_tree(target, {"app": ("file", f"v{patch}".encode(), 0o755),
                        "VERSION": ("file", f"{release}\n".encode(), 0o644)})
    out = env["root"] / f"{release}-{patch}.patchd"
    pack_command(app="kiosk", release=release, patch=patch, full=False,
                 base=env["root"] / f"base-{release}", target=target, keys=[env["key"]],
                 out=out)
    return out


def pub(env: dict[str, Path], *bundles: Path, rollout: int | None = None,
        keep: int = 5) -> Manifest:
    return publish(env["repo"], "kiosk", "stable", [env["key"]], list(bundles), rollout,
                   timedelta(days=1), now=NOW, keep_releases=keep)


def on_disk(env: dict[str, Path], name: str = "manifest.json") -> Manifest:
    return parse_manifest((env["repo"] / name).read_bytes())


def patches(m: Manifest, release: str = "1.0") -> list[tuple[int, int]]:
    return [(p.patch, p.rollout) for p in m.releases[release].patches]


def test_publish_serves_the_bounded_history_and_a_rolled_back_floor_returns(
        env: dict[str, Path]) -> None:
    """publish writes the history and serves it bounded; rolling back the newest
    full-rollout patch brings the one below it back, and hosts are told to forget it."""
    pub(env, bundle(env, 1))
    pub(env, bundle(env, 2), rollout=10)
    assert patches(on_disk(env)) == [(1, 100), (2, 10)]
    pub(env, env["repo"] / "1.0/2-any.patchd", rollout=100)
    assert patches(on_disk(env)) == [(2, 100)]
    assert patches(on_disk(env, HISTORY)) == [(1, 100), (2, 100)]
    m = roll_back(env["repo"], "kiosk", "stable", [env["key"]], "1.0", 2, timedelta(days=1),
                  now=NOW)
    assert patches(m) == [(1, 100)] and m.releases["1.0"].rolled_back == {2}
    assert on_disk(env) == m and m.serial == on_disk(env, HISTORY).serial == 4
    m = pub(env, bundle(env, 2))  # roll forward: back at its percentage
    assert patches(m) == [(2, 100)] and m.releases["1.0"].rolled_back == frozenset()


def test_only_the_newest_releases_are_kept(env: dict[str, Path]) -> None:
    """keep_releases: older releases leave the manifest and the history."""
    pub(env, bundle(env, 1, "1.0"))
    pub(env, bundle(env, 1, "2.0"))
    m = pub(env, bundle(env, 1, "3.0"), keep=2)
    assert sorted(m.releases) == ["2.0", "3.0"]
    assert sorted(on_disk(env, HISTORY).releases) == ["2.0", "3.0"]


def test_a_repository_from_before_is_its_own_history(env: dict[str, Path]) -> None:
    """A manifest with every patch and no history file (an older publisher): the next
    publish starts the history from it and serves it bounded."""
    pub(env, bundle(env, 1))
    pub(env, bundle(env, 2))
    (env["repo"] / HISTORY).unlink()
    doc = json.loads((env["repo"] / "manifest.json").read_text())
    doc["releases"][0]["patches"].insert(0, {**doc["releases"][0]["patches"][0], "patch": 1})
    (env["repo"] / "manifest.json").write_text(json.dumps(doc))
    m = pub(env, bundle(env, 3), rollout=50)
    assert patches(m) == [(2, 100), (3, 50)]
    assert patches(on_disk(env, HISTORY)) == [(1, 100), (2, 100), (3, 50)]


def test_a_history_behind_the_manifest_is_refused_and_one_ahead_completed(
        env: dict[str, Path]) -> None:
    """A manifest newer than the history was written by something else: refused with the
    way out. A history ahead of the manifest (a publish cut between its writes) goes out
    with the next publish."""
    pub(env, bundle(env, 1))
    old = (env["repo"] / HISTORY).read_bytes()
    pub(env, bundle(env, 2), rollout=10)
    ahead = (env["repo"] / HISTORY).read_bytes()
    (env["repo"] / HISTORY).write_bytes(old)
    with pytest.raises(UsageError, match=r"behind manifest.json's 2: .*remove the history"):
        pub(env, bundle(env, 3))
    (env["repo"] / HISTORY).write_bytes(ahead.replace(b'"serial":2', b'"serial":3'))
    m = pub(env)
    assert m.serial == 4 and patches(m) == [(1, 100), (2, 10)]
