"""The update strategy of docs/lifecycle.md, as pure decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from patchd.core.model import Build
from patchd.trust.manifest import BundleRef, FullEntry, Manifest, PatchEntry, ReleaseEntry
from patchd.trust.strategy import HostView, decide, in_rollout, rolled_back_builds

SHA = "a" * 64


def ref(arch: str = "x86_64", url: str = "b.patchd") -> BundleRef:
    return BundleRef(arch=arch, url=url, size=10, sha256=SHA)


def manifest(patches: dict[int, int] | None = None, rolled_back: frozenset[int] = frozenset(),
             full: str | None = None, arch: str = "x86_64") -> Manifest:
    entries = tuple(PatchEntry(n, rollout, (ref(arch),))
                    for n, rollout in sorted((patches or {}).items()))
    return Manifest(app="kiosk", channel="stable", serial=1,
                    expires=datetime.now(UTC) + timedelta(days=1),
                    releases={"1.4.0": ReleaseEntry("1.4.0", entries, rolled_back)},
                    full=FullEntry(full, (ref("any"),)) if full else None)


def host(next_boot: int = 0, bad: frozenset[Build] = frozenset(), arch: str = "x86_64",
         full_upgrades: bool = True, client_id: str = "c1") -> HostView:
    return HostView(release="1.4.0", next_boot=Build("1.4.0", next_boot), bad=bad, arch=arch,
                    client_id=client_id, full_upgrades=full_upgrades)


def test_highest_eligible_patch_wins() -> None:
    """Patches are cumulative: the highest one newer than next_boot is taken."""
    d = decide(manifest({1: 100, 2: 100, 3: 100}), host(next_boot=1))
    assert (d.kind, d.build) == ("patch", Build("1.4.0", 3))


def test_nothing_newer_than_next_boot_is_no_upgrade() -> None:
    """A host already at the newest patch does nothing."""
    assert decide(manifest({1: 100, 2: 100}), host(next_boot=2)).kind == "none"


def test_rolled_back_and_bad_patches_are_skipped() -> None:
    """A rolled-back patch and a locally bad one are passed over for the next lower one."""
    m = manifest({1: 100, 2: 100, 3: 100}, rolled_back=frozenset({3}))
    d = decide(m, host(bad=frozenset({Build("1.4.0", 2)})))
    assert d.build == Build("1.4.0", 1)


def test_rollout_zero_is_never_taken_and_hundred_always() -> None:
    """rollout 0 excludes every host; 100 includes every host."""
    for cid in ("a", "b", "c", "d"):
        assert decide(manifest({1: 0}), host(client_id=cid)).kind == "none"
        assert decide(manifest({1: 100}), host(client_id=cid)).kind == "patch"


@given(st.text(min_size=1, max_size=20), st.integers(0, 100), st.integers(0, 100))
def test_raising_rollout_only_adds_hosts(client_id: str, low: int, high: int) -> None:
    """A host in the bucket at a lower percentage stays in at any higher one."""
    low, high = min(low, high), max(low, high)
    if in_rollout(client_id, "1.4.0", 3, low):
        assert in_rollout(client_id, "1.4.0", 3, high)


def test_arch_must_match_or_be_any() -> None:
    """A bundle for another arch is not taken; `any` is."""
    assert decide(manifest({1: 100}, arch="aarch64"), host()).kind == "none"
    assert decide(manifest({1: 100}, arch="any"), host()).kind == "patch"


def test_full_upgrade_comes_first() -> None:
    """A full bundle of a newer release is preferred over patches of the current one."""
    d = decide(manifest({1: 100}, full="1.5.0"), host())
    assert (d.kind, d.build) == ("full", Build("1.5.0", 0))


def test_full_upgrade_skipped_when_disabled_bad_or_not_newer() -> None:
    """full_upgrades=false, a bad (R', 0) or an older full release fall through to patches."""
    assert decide(manifest({1: 100}, full="1.5.0"), host(full_upgrades=False)).kind == "patch"
    bad = frozenset({Build("1.5.0", 0)})
    assert decide(manifest({1: 100}, full="1.5.0"), host(bad=bad)).kind == "patch"
    assert decide(manifest({1: 100}, full="1.3.0"), host()).kind == "patch"


def test_full_upgrade_waiting_for_its_boot_is_no_upgrade() -> None:
    """Once (R', 0) is next_boot, there is nothing more to do until it boots."""
    view = HostView(release="1.4.0", next_boot=Build("1.5.0", 0), bad=frozenset(),
                    arch="x86_64", client_id="c")
    assert decide(manifest({1: 100}, full="1.5.0"), view).kind == "none"


def test_rolled_back_builds_lists_only_the_current_release() -> None:
    """Rollbacks are read for the release the host runs."""
    m = manifest({1: 100, 2: 100}, rolled_back=frozenset({2}))
    assert rolled_back_builds(m, "1.4.0") == [Build("1.4.0", 2)]
    assert rolled_back_builds(m, "9.9") == []


def test_rollout_bucket_matches_the_spec_formula() -> None:
    """The bucket is int(sha256(client:release:patch)[:8], 16) % 100."""
    import hashlib

    digest = hashlib.sha256(b"c1:1.4.0:3").hexdigest()
    bucket = int(digest[:8], 16) % 100
    assert in_rollout("c1", "1.4.0", 3, bucket + 1)
    assert not in_rollout("c1", "1.4.0", 3, bucket)
