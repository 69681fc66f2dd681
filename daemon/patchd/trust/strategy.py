"""What to do with a verified manifest (docs/lifecycle.md): pure functions, no I/O.

Keeping the decision pure means every branch — rollouts, arch matching, tombstones,
rollbacks, full upgrades — is tested without a network or a disk, and the update task
only carries out what was decided here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Set
from dataclasses import dataclass
from typing import Literal

from patchd.core.model import Build, release_newer
from patchd.trust.manifest import BundleRef, Manifest

Kind = Literal["none", "patch", "full"]


@dataclass(frozen=True)
class HostView:
    """What the strategy needs to know about the host."""

    release: str  # pointers.release: the base of patches, last release booted successfully
    next_boot: Build
    bad: Set[Build]
    arch: str
    client_id: str
    full_upgrades: bool = True


@dataclass(frozen=True)
class Decision:
    kind: Kind
    build: Build | None = None
    bundle: BundleRef | None = None

    def __str__(self) -> str:
        return self.kind if self.build is None else f"{self.kind} {self.build}"


NO_UPGRADE = Decision("none")


def in_rollout(client_id: str, release: str, patch: int, rollout: int) -> bool:
    """The rollout bucket (docs/formats.md): stable per host and patch, so raising the
    percentage only adds hosts."""
    digest = hashlib.sha256(f"{client_id}:{release}:{patch}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < rollout


def rolled_back_builds(manifest: Manifest, release: str) -> list[Build]:
    """Builds of ``release`` the server withdrew: to be forgotten (never unbanned)."""
    entry = manifest.releases.get(release)
    return [Build(release, n) for n in sorted(entry.rolled_back) if n > 0] if entry else []


def decide(manifest: Manifest, host: HostView) -> Decision:
    """Full upgrade first, else the highest eligible patch, else nothing.

    The caller applies :func:`rolled_back_builds` first, so ``host.next_boot`` is
    already the fallback when the server withdrew the build it pointed at.
    """
    full = manifest.full
    if full is not None and host.full_upgrades and release_newer(full.release, host.release):
        build = Build(full.release, 0)
        bundle = full.bundle_for(host.arch)
        if build not in host.bad and bundle is not None:
            if host.next_boot == build:  # installed already, waiting for its first boot
                return NO_UPGRADE
            return Decision("full", build, bundle)

    entry = manifest.releases.get(host.release)
    if entry is None or host.next_boot.release != host.release:
        return NO_UPGRADE
    for patch in sorted(entry.patches, key=lambda p: p.patch, reverse=True):
        build = Build(host.release, patch.patch)
        if patch.patch <= host.next_boot.patch:
            break
        if patch.patch in entry.rolled_back or build in host.bad:
            continue
        if not in_rollout(host.client_id, host.release, patch.patch, patch.rollout):
            continue
        bundle = patch.bundle_for(host.arch)
        if bundle is not None:
            return Decision("patch", build, bundle)
    return NO_UPGRADE
