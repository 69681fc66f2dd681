"""Roots of trust in a repository: create, sign, and find the newest complete one.

``REPO/root/N.json`` and ``REPO/root/N.json.sig`` (docs/formats.md#the-root-of-trust).
A new version starts from the previous one (keys and thresholds not given are kept)
and is written with whatever signatures the signers given could make; holders of
offline root keys then add theirs with ``patchd root sign``, one after the other.
A version is *complete* when a threshold of the previous version's root keys and a
threshold of its own signed it: only then do hosts accept it, so ``publish`` names
the newest complete version in the manifest and refuses keys it does not trust.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from patchd.core.errors import RootRejected, SignatureInvalid, UsageError
from patchd.core.fsio import atomic_write_bytes
from patchd.trust.root import Role, Root, parse_root, root_bytes, verify_next
from patchd.trust.signing import (
    Signer,
    TrustedKeys,
    parse_public_key,
    sign_document,
    verify_document,
)

log = structlog.get_logger("patchd.publisher.roots")

ROOT_DIR = "root"
_NAME_RE = re.compile(r"^([1-9][0-9]*)\.json$")


@dataclass(frozen=True)
class RootStatus:
    """Where one root version stands: signatures by the previous root and by itself."""

    root: Root
    by_previous: int
    needed_previous: int
    by_own: int
    needed_own: int

    @property
    def complete(self) -> bool:
        return self.by_previous >= self.needed_previous and self.by_own >= self.needed_own

    def __str__(self) -> str:
        what = "complete" if self.complete else "incomplete"
        prev = (f"{self.by_previous} of {self.needed_previous} needed keys of version "
                f"{self.root.version - 1}, " if self.root.version > 1 else "")
        return (f"root version {self.root.version}: signed by {prev}{self.by_own} of "
                f"{self.needed_own} of its own root keys; {what}")


def root_path(repo: Path, version: int) -> Path:
    return Path(repo) / ROOT_DIR / f"{version}.json"


def _sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def versions(repo: Path) -> list[int]:
    """Root versions present in ``repo``, ascending."""
    folder = Path(repo) / ROOT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _NAME_RE.match(p.name)))


def load(repo: Path, version: int) -> tuple[bytes, bytes, Root]:
    path = root_path(repo, version)
    data = path.read_bytes()
    sig_path = _sig_path(path)
    sig = sig_path.read_bytes() if sig_path.exists() else b'{"signatures": []}\n'
    return data, sig, parse_root(data)


def _count(data: bytes, sig: bytes, role: Role) -> int:
    try:
        return len(verify_document(data, sig, TrustedKeys.from_raw(role.keys, 1)))
    except SignatureInvalid:
        return 0


def status(repo: Path, version: int) -> RootStatus:
    data, sig, root = load(repo, version)
    if version > 1:
        prev = load(repo, version - 1)[2]
        by_prev, need_prev = _count(data, sig, prev.root), prev.root.threshold
    else:
        by_prev = need_prev = 0
    return RootStatus(root, by_prev, need_prev, _count(data, sig, root.root), root.root.threshold)


def newest_complete(repo: Path) -> Root | None:
    """The newest version hosts would accept, walking from version 1 as a host does."""
    found = versions(repo)
    if not found:
        return None
    current = load(repo, found[0])[2]
    if not status(repo, found[0]).complete:
        return None
    for version in range(found[0] + 1, found[-1] + 1):
        try:
            data, sig, _ = load(repo, version)
            current = verify_next(current, data, sig)
        except (OSError, RootRejected):
            break
    return current


def create(repo: Path, *, root_keys: Sequence[str], root_threshold: int | None,
           updates_keys: Sequence[str], updates_threshold: int | None,
           expires: timedelta, signers: Sequence[Signer], now: datetime) -> RootStatus:
    """Write the next root version (1 when there is none) and sign it with ``signers``."""
    repo = Path(repo)
    found = versions(repo)
    prev = load(repo, found[-1])[2] if found else None
    if prev is None and not (root_keys and updates_keys):
        raise UsageError("the first root needs --root-key and --updates-key")

    def role(keys: Sequence[str], threshold: int | None, old: Role | None) -> Role:
        try:
            raws = tuple(parse_public_key(k) for k in keys) if keys else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if raws is None:
            assert old is not None
            raws = old.keys
        return Role(raws, threshold if threshold is not None else
                    (old.threshold if old is not None and old.threshold <= len(raws) else 1))

    new = Root(prev.version + 1 if prev else 1, now + expires,
               role(root_keys, root_threshold, prev.root if prev else None),
               role(updates_keys, updates_threshold, prev.updates if prev else None))
    data = root_bytes(new)
    try:
        parse_root(data)  # the host's rules: thresholds, duplicate keys
    except RootRejected as exc:
        raise UsageError(str(exc)) from None
    path = root_path(repo, new.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    sig = sign_document(data, signers) if signers else b'{\n  "signatures": []\n}\n'
    atomic_write_bytes(_sig_path(path), sig)
    atomic_write_bytes(path, data)
    log.info("root.created", repo=str(repo), version=new.version)
    return status(repo, new.version)


def sign(repo: Path, version: int | None, signers: Sequence[Signer]) -> RootStatus:
    """Add the signatures of ``signers`` to root ``version`` (default: the newest)."""
    found = versions(repo)
    if not found:
        raise UsageError(f"{Path(repo) / ROOT_DIR} holds no root; run 'patchd root create'")
    version = found[-1] if version is None else version
    if version not in found:
        raise UsageError(f"there is no root version {version} in {Path(repo) / ROOT_DIR}")
    if not signers:
        raise UsageError("give --key KEYFILE or --sign-cmd CMD to sign with")
    data, sig, _root = load(repo, version)
    path = root_path(repo, version)
    atomic_write_bytes(_sig_path(path), sign_document(data, signers, existing=sig))
    return status(repo, version)
