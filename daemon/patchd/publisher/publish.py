"""Publisher commands: keygen, pack and publish, as plain functions the CLI wires up.

A repository is a directory served as static files, one per channel::

    REPO/manifest.json  REPO/manifest.json.sig
    REPO/RELEASE/N-ARCH.patchd  REPO/RELEASE/full-ARCH.patchd

Order of writes on publish: bundles first (a manifest never names a missing file), then
``manifest.json.sig``, then ``manifest.json``, each atomically (temp, fsync, rename).
Two files cannot change in one step, so whichever goes first, a client polling between
the two renames may pair an old file with a new one. That pair fails verification,
which is harmless by design: the client logs it, keeps what it has and gets the
consistent pair at its next poll. Signature first means the manifest a client reads is
never newer than the newest signature, so the window closes with the manifest rename.

CLI arguments expected (docs/cli.md):
  keygen  -o KEYFILE                          → keygen(out)
  pack    --app A --release R (--patch N | --full) [--base DIR] --target DIR
          --key KEYFILE... [--arch ARCH, default any] [--no-delta] -o BUNDLE
                                              → pack_command(...)
  publish --repo DIR --app A --channel C --key KEYFILE... [--rollout P]
          [--expires 30d] BUNDLE...           → publish(...)
          (--app, --channel, --key, --expires: defaults in DIR/patchd-publish.toml)
  publish ... --roll-back RELEASE:PATCH       → roll_back(...)
  (every --key KEYFILE may also be --sign-cmd CMD; root create|sign: publisher/roots.py)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patchd.core.errors import ManifestInvalid, SignatureInvalid, UsageError
from patchd.core.fsio import atomic_file, atomic_write_bytes
from patchd.core.model import is_valid_release
from patchd.publisher import checks, roots
from patchd.publisher.pack import pack
from patchd.trust import BundleHeader, BundleReader
from patchd.trust.manifest import (
    BundleRef,
    FullEntry,
    Manifest,
    PatchEntry,
    ReleaseEntry,
    manifest_to_json,
    parse_manifest,
)
from patchd.trust.root import Root
from patchd.trust.signing import (
    Signer,
    generate_key,
    load_private_key,
    sign_document,
    verify_document,
)

log = structlog.get_logger("patchd.publisher.publish")

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
#: A key file, a loaded key, or any signer (``--sign-cmd``: :mod:`patchd.publisher.signer`).
Key = Path | Ed25519PrivateKey | Signer


def load_signers(keys: Sequence[Key]) -> list[Signer]:
    if not keys:
        raise UsageError("at least one --key or --sign-cmd is needed")
    return [load_private_key(k) if isinstance(k, Path | str) else k for k in keys]


def keygen(out: Path) -> str:
    """Write a new private key to ``out`` (0600); return the ``ed25519:`` public key."""
    return generate_key(Path(out))


def pack_command(*, app: str, release: str, patch: int | None, full: bool, base: Path | None,
                 target: Path, keys: Sequence[Key], arch: str = "any", out: Path,
                 delta: bool = True) -> BundleHeader:
    """``patchd pack``: check the arguments as a host would check the bundle, then write it.

    Names follow the host's rules; the base is the release itself and the target a
    tree of the same release, so both ``VERSION`` files must name ``--release``.
    """
    checks.check_name(app, "--app", "app")
    checks.check_release(release)
    checks.check_arch(arch)
    if full == (patch is not None):
        raise UsageError("give exactly one of --patch N or --full")
    if full and base is not None:
        raise UsageError("--full bundles have no --base")
    if not full and (base is None or patch is None or patch < 1):
        raise UsageError("a patch bundle needs --base DIR and --patch N (N >= 1)")
    for tree in (base, target):
        if tree is not None and not Path(tree).is_dir():
            raise UsageError(f"{tree} is not a directory")
    checks.check_tree_versions(release, base, Path(target))
    return pack(app=app, release=release, patch=0 if full else int(patch or 0),
                kind="full" if full else "patch", arch=arch, base=base, target=Path(target),
                private_keys=load_signers(keys), out=Path(out), delta=delta)


def _load_manifest(repo: Path, app: str, channel: str, now: datetime) -> Manifest:
    path = repo / MANIFEST
    if not path.exists():
        return Manifest(app, channel, 0, now, {}, None)
    manifest = parse_manifest(path.read_bytes())
    if (manifest.app, manifest.channel) != (app, channel):
        raise UsageError(f"{path} is for app {manifest.app!r} channel {manifest.channel!r}, "
                         f"not {app!r} {channel!r}")
    return manifest


def _copy_bundle(src: Path, dest: Path) -> tuple[int, str]:
    """Copy atomically; return (size, sha256) of the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, atomic_file(dest, 0o644) as fout:
        while chunk := fin.read(1024 * 1024):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return size, h.hexdigest()


def _with_bundle(refs: tuple[BundleRef, ...], ref: BundleRef) -> tuple[BundleRef, ...]:
    return tuple(sorted([r for r in refs if r.arch != ref.arch] + [ref], key=lambda r: r.arch))


def _add(manifest: Manifest, header: BundleHeader, ref: BundleRef, rollout: int | None,
         new_rollout: int) -> Manifest:
    if header.kind == "full":
        full = manifest.full
        bundles = full.bundles if full is not None and full.release == header.release else ()
        return replace(manifest, full=FullEntry(header.release, _with_bundle(bundles, ref)))
    releases = dict(manifest.releases)
    entry = releases.get(header.release) or ReleaseEntry(header.release, (), frozenset())
    old = entry.patch(header.patch)
    new = PatchEntry(
        header.patch,
        rollout if rollout is not None else (old.rollout if old else new_rollout),
        _with_bundle(old.bundles if old else (), ref),
    )
    patches = tuple(sorted([p for p in entry.patches if p.patch != header.patch] + [new],
                           key=lambda p: p.patch))
    # Publishing a rolled-back patch again is a roll-forward.
    releases[header.release] = ReleaseEntry(header.release, patches,
                                            entry.rolled_back - {header.patch})
    return replace(manifest, releases=releases)


def _publishing_root(repo: Path) -> Root | None:
    """The newest complete root in ``repo``: what hosts will trust after this publish."""
    root = roots.newest_complete(repo)
    if roots.versions(repo) and root is None:
        raise UsageError(f"{repo / roots.ROOT_DIR}: root version 1 is not signed by its "
                         "own root keys; run 'patchd root sign'")
    return root


def _write(repo: Path, manifest: Manifest, keys: list[Signer], root: Root | None
           ) -> Manifest:
    """Sign and write the manifest under the repository's newest complete root.

    With a root in the repository, the manifest names its version and the signatures
    must meet that root's updates threshold: a publish with a revoked or unknown key
    fails here instead of on every host. The document is parsed back by the host's
    parser first (types, names, size limit).
    """
    manifest = replace(manifest, root_version=root.version if root else 1)
    data = (json.dumps(manifest_to_json(manifest), indent=2) + "\n").encode()
    try:
        parse_manifest(data)
    except ManifestInvalid as exc:
        raise UsageError(f"hosts would refuse this manifest: {exc}") from None
    sig = sign_document(data, keys)
    if root is not None:
        try:
            verify_document(data, sig, root.updates.trusted())
        except SignatureInvalid as exc:
            raise UsageError(f"these keys do not sign for root version {root.version}'s "
                             f"updates role: {exc}") from None
    atomic_write_bytes(repo / SIGNATURE, sig)
    atomic_write_bytes(repo / MANIFEST, data)
    log.info("publish.manifest_written", repo=str(repo), serial=manifest.serial,
             root_version=manifest.root_version)
    return manifest


def _read_bundle(path: Path, app: str, root: Root | None) -> BundleHeader:
    """The header of a bundle to publish, refused where every host would refuse it: for
    another app, or (with a root of trust) not signed for the root's updates role."""
    trust = root.updates.trusted() if root is not None else None
    try:
        with BundleReader(path, trust, None) as reader:
            header = reader.header
    except SignatureInvalid as exc:
        assert root is not None
        raise UsageError(f"{path}: hosts would refuse this bundle: its header is not signed "
                         f"for root version {root.version}'s updates role ({exc}); "
                         "re-pack it with the current updates key") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    if header.app != app:
        raise UsageError(f"{path} is a bundle for app {header.app!r}; this repository is "
                         f"for app {app!r}")
    return header


def publish(repo: Path, app: str, channel: str, keys: Sequence[Key], bundles: Sequence[Path],
            rollout: int | None, expires: timedelta, *, now: datetime | None = None,
            new_rollout: int = 100) -> Manifest:
    """Add bundles to the channel directory ``repo``, bump the serial and re-sign.

    ``rollout`` applies to every patch published now; without it a patch already in
    the manifest keeps its percentage and a new one gets ``new_rollout``.
    """
    checks.check_name(app, "--app", "app")
    checks.check_name(channel, "--channel", "channel")
    for value, flag in ((rollout, "--rollout"), (new_rollout, "rollout")):
        if value is not None and not 0 <= value <= 100:
            raise UsageError(f"{flag} must be 0..100, got {value}")
    repo = Path(repo)
    if not bundles and not (repo / MANIFEST).exists():
        raise UsageError(f"{repo / MANIFEST} does not exist: name a bundle to publish")
    checks.check_keys_outside(repo, keys)
    # No bundles: re-sign the manifest with a new serial and expiry (a renewal before
    # the current one expires), changing nothing else.
    private = load_signers(keys)
    now = now or datetime.now(UTC)
    manifest = _load_manifest(repo, app, channel, now)
    root = _publishing_root(repo)
    headers = [(Path(path), _read_bundle(Path(path), app, root)) for path in bundles]
    seen: dict[tuple[str, int, str], Path] = {}
    for path, header in headers:
        first = seen.setdefault((header.release, header.patch, header.arch), path)
        if first != path:
            raise UsageError(f"{first} and {path} are both {header.release}+{header.patch} "
                             f"for arch {header.arch}; publish one of them")
    repo.mkdir(parents=True, exist_ok=True)
    for path, header in headers:
        stem = "full" if header.kind == "full" else str(header.patch)
        url = f"{header.release}/{stem}-{header.arch}.patchd"
        size, sha = _copy_bundle(path, repo / url)
        manifest = _add(manifest, header, BundleRef(header.arch, url, size, sha), rollout,
                        new_rollout)
        log.info("publish.bundle_added", bundle=str(path), url=url)
    manifest = replace(manifest, serial=manifest.serial + 1, expires=now + expires)
    return _write(repo, manifest, private, root)


def roll_back(repo: Path, app: str, channel: str, keys: Sequence[Key], release: str,
              patch: int, expires: timedelta, *, now: datetime | None = None) -> Manifest:
    """Mark ``release`` patch ``patch`` rolled back, bump the serial and re-sign."""
    checks.check_name(app, "--app", "app")
    checks.check_name(channel, "--channel", "channel")
    repo = Path(repo)
    checks.check_keys_outside(repo, keys)
    private = load_signers(keys)
    now = now or datetime.now(UTC)
    if not (repo / MANIFEST).exists():
        raise UsageError(f"{repo / MANIFEST} does not exist; nothing to roll back")
    manifest = _load_manifest(repo, app, channel, now)
    entry = manifest.releases.get(release)
    if entry is None:
        raise UsageError(f"release {release!r} is not in {repo / MANIFEST}")
    releases = dict(manifest.releases)
    releases[release] = replace(entry, rolled_back=entry.rolled_back | {patch})
    manifest = replace(manifest, releases=releases, serial=manifest.serial + 1,
                       expires=now + expires)
    return _write(repo, manifest, private, _publishing_root(repo))


def parse_roll_back(text: str) -> tuple[str, int]:
    """``RELEASE:PATCH`` → (release, patch); UsageError when malformed."""
    release, sep, number = text.rpartition(":")
    if not sep or not is_valid_release(release) or not number.isdigit() or int(number) < 1:
        raise UsageError(f"--roll-back wants RELEASE:PATCH (e.g. 1.4.0:3), got {text!r}")
    return release, int(number)
