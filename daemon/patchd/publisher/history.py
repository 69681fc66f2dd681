"""The channel's full history and the bounded manifest served from it (docs/publishing.md).

``publish`` and ``--roll-back`` change the *history*: every patch of every kept
release, rolled back or not, kept by the publisher in
``REPO/patchd-publish.history.json`` (the manifest format; hosts never read it). The
``manifest.json`` hosts fetch is :func:`bounded` of it: per release only the patches a
host could still take (docs/formats.md#what-the-manifest-keeps):

- for each host arch, the newest patch offered to every host of that arch (rollout
  100, not rolled back, a bundle for the arch or ``any``) is its *floor*; a host of
  that arch stops there (it takes it, or already has it or something newer), so
  patches below it are never looked at — they are left out, bundle by bundle;
- rolled-back patches keep only their number in ``rolled_back`` (hosts must forget
  them), not their entry;
- only the ``keep_releases`` newest releases are kept.

A host reaches the same decision from the bounded manifest as from the history, with
one exception: a host that tombstoned its floor (and may take nothing above it) takes
nothing (or a patch below its floor still listed for another arch), where the history
would offer it the newest patch below the floor. Because the served manifest
is always computed from the history, rolling back a floor brings the patch below it
back (``tests/test_manifest_bound.py`` proves both with hypothesis).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from patchd.core.errors import ManifestInvalid, UsageError
from patchd.core.fsio import atomic_write_bytes
from patchd.core.model import release_key
from patchd.trust.manifest import (
    BundleRef,
    FullEntry,
    Manifest,
    PatchEntry,
    ReleaseEntry,
    manifest_to_json,
    parse_manifest,
)

__all__ = ["DEFAULT_KEEP_RELEASES", "HISTORY", "bounded", "floors", "load_history",
           "with_bundle", "with_rolled_back", "write_history"]

HISTORY = "patchd-publish.history.json"
#: Releases the manifest keeps when neither ``--keep-releases`` nor the defaults file says.
DEFAULT_KEEP_RELEASES = 5
#: The arch of hosts named by no bundle of a release: they can only take ``any`` bundles.
OTHER = ""


def _bundle(patch: PatchEntry, arch: str) -> BundleRef | None:
    """The bundle a host of ``arch`` takes from ``patch`` (as ``PatchEntry.bundle_for``)."""
    return patch.bundle_for(arch) if arch != OTHER else next(
        (b for b in patch.bundles if b.arch == "any"), None)


def floors(entry: ReleaseEntry) -> dict[str, int]:
    """Per host arch (``OTHER``: an arch no bundle names), the newest patch every host of
    that arch is offered; 0 when there is none (then it may need any patch)."""
    live = [p for p in entry.patches if p.patch not in entry.rolled_back]
    archs = {b.arch for p in live for b in p.bundles if b.arch != "any"} | {OTHER}
    return {arch: max((p.patch for p in live
                       if p.rollout == 100 and _bundle(p, arch) is not None), default=0)
            for arch in archs}


def _bounded_release(entry: ReleaseEntry) -> ReleaseEntry:
    floor = floors(entry)
    patches = []
    for p in entry.patches:
        if p.patch in entry.rolled_back:
            continue
        # The bundles some host arch would take here, at or above that arch's floor.
        kept = {ref for arch, lowest in floor.items()
                if p.patch >= lowest and (ref := _bundle(p, arch)) is not None}
        if any(ref.arch == "any" for ref in kept):
            # Where ``any`` stays, so do the arches' own bundles: a host below its floor
            # (it tombstoned the floor) never gets ``any`` in place of its own bundle.
            kept.update(p.bundles)
        if kept:  # a patch with no bundle for any host is offered to none
            patches.append(replace(p, bundles=tuple(b for b in p.bundles if b in kept)))
    return ReleaseEntry(entry.release, tuple(patches), entry.rolled_back)


def kept_releases(history: Manifest, keep_releases: int) -> list[str]:
    """The ``keep_releases`` newest releases of the history, oldest first."""
    return sorted(history.releases, key=release_key)[-keep_releases:] if keep_releases else []


def bounded(history: Manifest, keep_releases: int = DEFAULT_KEEP_RELEASES) -> Manifest:
    """The manifest hosts are served: see the module docstring."""
    return replace(history, releases={
        name: _bounded_release(history.releases[name])
        for name in kept_releases(history, keep_releases)})


def trimmed(history: Manifest, keep_releases: int) -> Manifest:
    """The history without the releases the manifest no longer keeps."""
    return replace(history, releases={
        name: history.releases[name] for name in kept_releases(history, keep_releases)})


# --- changes --------------------------------------------------------------------------


def _with_ref(refs: tuple[BundleRef, ...], ref: BundleRef) -> tuple[BundleRef, ...]:
    return tuple(sorted([r for r in refs if r.arch != ref.arch] + [ref], key=lambda r: r.arch))


def with_bundle(history: Manifest, release: str, patch: int, ref: BundleRef,
                rollout: int | None, new_rollout: int) -> Manifest:
    """Add (or replace) one bundle; ``patch`` 0 is a full bundle. A patch already in
    the history keeps its rollout unless ``rollout`` is given; a new one gets
    ``new_rollout``. Publishing a rolled-back patch again is a roll-forward."""
    if patch == 0:
        full = history.full
        bundles = full.bundles if full is not None and full.release == release else ()
        return replace(history, full=FullEntry(release, _with_ref(bundles, ref)))
    releases = dict(history.releases)
    entry = releases.get(release) or ReleaseEntry(release, (), frozenset())
    old = entry.patch(patch)
    new = PatchEntry(patch,
                     rollout if rollout is not None else (old.rollout if old else new_rollout),
                     _with_ref(old.bundles if old else (), ref))
    patches = tuple(sorted([p for p in entry.patches if p.patch != patch] + [new],
                           key=lambda p: p.patch))
    releases[release] = ReleaseEntry(release, patches, entry.rolled_back - {patch})
    return replace(history, releases=releases)


def with_rolled_back(history: Manifest, release: str, patch: int) -> Manifest:
    """Mark ``release`` patch ``patch`` rolled back (it need not be in the history)."""
    entry = history.releases.get(release)
    if entry is None:
        raise UsageError(f"release {release!r} is not in the manifest")
    releases = dict(history.releases)
    releases[release] = replace(entry, rolled_back=entry.rolled_back | {patch})
    return replace(history, releases=releases)


# --- the file -------------------------------------------------------------------------


def load_history(repo: Path, served: Manifest) -> Manifest:
    """The history of ``repo``, or the served manifest itself when there is none yet (a
    repository published before the manifest was bounded: its manifest is the history).

    A history behind the manifest means another tool wrote the manifest; publishing
    from it would lose that change, so it is refused. One ahead of it is a publish
    that stopped between the two writes: its change goes out with this one.
    """
    path = Path(repo) / HISTORY
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return served
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        history = parse_manifest(data)
    except ManifestInvalid as exc:
        raise UsageError(f"{path} is not a patchd history: {exc}") from None
    if (history.app, history.channel) != (served.app, served.channel):
        raise UsageError(f"{path} is for app {history.app!r} channel {history.channel!r}, "
                         f"the manifest for {served.app!r} {served.channel!r}")
    if history.serial < served.serial:
        raise UsageError(f"{path} has serial {history.serial}, behind manifest.json's "
                         f"{served.serial}: the manifest was written without it; remove "
                         "the history file to start again from the manifest")
    return history


def write_history(repo: Path, history: Manifest) -> None:
    """Atomically, before the manifest (see :func:`load_history`)."""
    data = json.dumps(manifest_to_json(history), separators=(",", ":")) + "\n"
    atomic_write_bytes(Path(repo) / HISTORY, data.encode())
