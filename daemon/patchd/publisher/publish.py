"""Publisher commands: keygen, pack and publish, as plain functions the CLI wires up.

A repository is a directory served as static files, one per channel::

    REPO/manifest.json  REPO/manifest.json.sig
    REPO/RELEASE/N-ARCH.patchd  REPO/RELEASE/full-ARCH.patchd

Every change goes into the channel's full history (``REPO/patchd-publish.history.json``,
``history.py``), and ``manifest.json`` is that history bounded: only what a host could
still take. Order of writes on publish: bundles first (a manifest never names a missing
file), then the history, then ``manifest.json.sig``, then ``manifest.json``, each
atomically (temp, fsync, rename).
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
import math
import os
import time
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
from patchd.publisher.history import (
    DEFAULT_KEEP_RELEASES,
    bounded,
    load_history,
    trimmed,
    with_bundle,
    with_rolled_back,
    write_history,
)
from patchd.publisher.pack import pack
from patchd.trust import BundleHeader, BundleReader
from patchd.trust.manifest import (
    BundleRef,
    Manifest,
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


def _publishing_root(repo: Path) -> Root | None:
    """The newest complete root in ``repo``: what hosts will trust after this publish."""
    root = roots.newest_complete(repo)
    if roots.versions(repo) and root is None:
        raise UsageError(f"{repo / roots.ROOT_DIR}: root version 1 is not signed by its "
                         "own root keys; run 'patchd root sign'")
    return root


def _write(repo: Path, history: Manifest, keys: list[Signer], root: Root | None,
           keep_releases: int) -> Manifest:
    """Sign and write the manifest of the history under the newest complete root.

    The manifest is the history bounded (``history.py``); the history is written
    first, so a publish that stops between the writes is completed by the next one.
    With a root in the repository, the manifest names its version and the signatures
    must meet that root's updates threshold: a publish with a revoked or unknown key
    fails here instead of on every host. The document is parsed back by the host's
    parser first (types, names, size limit).
    """
    history = trimmed(replace(history, root_version=root.version if root else 1),
                      keep_releases)
    manifest = bounded(history, keep_releases)
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
    write_history(repo, history)
    atomic_write_bytes(repo / SIGNATURE, sig)
    when = _fresh_mtime(repo / MANIFEST)
    with atomic_file(repo / MANIFEST, 0o644) as f:
        f.write(data)
        f.flush()
        os.utime(f.fileno(), (when, when))
    log.info("publish.manifest_written", repo=str(repo), serial=manifest.serial,
             root_version=manifest.root_version, size=len(data))
    return manifest


def _fresh_mtime(path: Path) -> float:
    """An mtime for the new manifest in a later whole second than the one it replaces.

    Static servers (nginx, Apache) derive ``ETag`` and ``Last-Modified`` from the
    file's mtime in whole seconds and its size. A bounded manifest often keeps its
    size from one publish to the next, so a manifest rewritten within the same second
    would look unchanged to a host that polled in between: it would get 304 and miss
    the publish until the next one. At most a second ahead of the clock per publish
    made within one second; the clock catches up by itself.
    """
    now = time.time()
    try:
        previous = path.stat().st_mtime
    except FileNotFoundError:
        return now
    return max(now, math.floor(previous) + 1.0)


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
            new_rollout: int = 100, keep_releases: int = DEFAULT_KEEP_RELEASES) -> Manifest:
    """Add bundles to the channel directory ``repo``, bump the serial and re-sign; the
    manifest written (and returned) is the history bounded (``history.py``).

    ``rollout`` applies to every patch published now; without it a patch already in
    the history keeps its percentage and a new one gets ``new_rollout``.
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
    _check_keep(keep_releases)
    history = load_history(repo, _load_manifest(repo, app, channel, now))
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
        history = with_bundle(history, header.release,
                              header.patch if header.kind != "full" else 0,
                              BundleRef(header.arch, url, size, sha), rollout, new_rollout)
        log.info("publish.bundle_added", bundle=str(path), url=url)
    history = replace(history, serial=history.serial + 1, expires=now + expires)
    return _write(repo, history, private, root, keep_releases)


def roll_back(repo: Path, app: str, channel: str, keys: Sequence[Key], release: str,
              patch: int, expires: timedelta, *, now: datetime | None = None,
              keep_releases: int = DEFAULT_KEEP_RELEASES) -> Manifest:
    """Mark ``release`` patch ``patch`` rolled back, bump the serial and re-sign (the
    patch below it comes back into the manifest if it is now a floor)."""
    checks.check_name(app, "--app", "app")
    checks.check_name(channel, "--channel", "channel")
    repo = Path(repo)
    checks.check_keys_outside(repo, keys)
    private = load_signers(keys)
    now = now or datetime.now(UTC)
    if not (repo / MANIFEST).exists():
        raise UsageError(f"{repo / MANIFEST} does not exist; nothing to roll back")
    _check_keep(keep_releases)
    history = load_history(repo, _load_manifest(repo, app, channel, now))
    if release not in history.releases:
        raise UsageError(f"release {release!r} is not in {repo / MANIFEST}")
    history = with_rolled_back(history, release, patch)
    history = replace(history, serial=history.serial + 1, expires=now + expires)
    return _write(repo, history, private, _publishing_root(repo), keep_releases)


def _check_keep(keep_releases: int) -> None:
    if isinstance(keep_releases, bool) or not isinstance(keep_releases, int) \
            or keep_releases < 1:
        raise UsageError(f"keep_releases must be a whole number of at least 1, got "
                         f"{keep_releases!r}")


def parse_roll_back(text: str) -> tuple[str, int]:
    """``RELEASE:PATCH`` → (release, patch); UsageError when malformed."""
    release, sep, number = text.rpartition(":")
    if not sep or not is_valid_release(release) or not number.isdigit() or int(number) < 1:
        raise UsageError(f"--roll-back wants RELEASE:PATCH (e.g. 1.4.0:3), got {text!r}")
    return release, int(number)
