"""The root a host accepted, kept in its state directory, and the walk to a newer one.

The one place in :mod:`patchd.trust` that touches the disk: a root accepted from the
repository must outlive a restart (or a replayed old root would be believed again),
so :class:`RootKeeper` writes it, durably and atomically (:mod:`patchd.core.fsio`),
to the state directory's ``root.json`` (``patchd.state.Layout.root``) before anything
signed under it is used.
A failed walk writes nothing: the accepted root stays as it was.

The file also records which bootstrap (config keys or pinned root file) the chain
started from. When the operator changes the bootstrap, the chain is walked again from
the new one: the operator's config is the anchor, the state file only a cache of
where the walk got to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import structlog

from patchd.core.errors import RootInvalid, RootVersionInvalid
from patchd.core.fsio import atomic_write_json, read_json
from patchd.trust.root import (
    MAX_ROOT_STEPS,
    Root,
    implicit_root,
    parse_root,
    revoked_by,
    verify_next,
)
from patchd.trust.signing import TrustedKeys, key_id

log = structlog.get_logger("patchd.trust.root_store")

#: The accepted root, in the state directory beside ``client.json`` (docs/formats.md).

#: Fetches root version N: (document bytes, signature file bytes).
FetchRoot = Callable[[int], Awaitable[tuple[bytes, bytes]]]


@dataclass(frozen=True)
class Bootstrap:
    """Where a host's chain starts: version 1 from the config's keys, or a pinned root."""

    root: Root
    #: Identifies the bootstrap, so a changed config restarts the walk.
    digest: str

    @classmethod
    def from_keys(cls, raw_keys: tuple[bytes, ...], threshold: int) -> Bootstrap:
        ids = ",".join(sorted({key_id(k) for k in raw_keys}))
        digest = hashlib.sha256(f"keys:{ids}:{threshold}".encode()).hexdigest()
        return cls(implicit_root(raw_keys, threshold), digest)

    @classmethod
    def from_document(cls, data: bytes, root: Root) -> Bootstrap:
        return cls(root, hashlib.sha256(b"file:" + data).hexdigest())


@dataclass(frozen=True)
class Accepted:
    """A root this host believes, with the update keys revoked on the way to it."""

    root: Root
    revoked: frozenset[str] = field(default_factory=frozenset)
    document: bytes = b""
    signatures: bytes = b""


class RootKeeper:
    """The accepted root of one host: load, walk forward, persist."""

    def __init__(self, path: Path, bootstrap: Bootstrap) -> None:
        #: Where the accepted root is kept (``Layout.root``: the state layer names it).
        self.path = path
        self.bootstrap = bootstrap
        self.accepted = self._load()

    def __repr__(self) -> str:
        return f"<RootKeeper version={self.version} {self.path}>"

    @property
    def version(self) -> int:
        return self.accepted.root.version

    @property
    def root(self) -> Root:
        return self.accepted.root

    def updates_trust(self) -> TrustedKeys:
        """What manifests and bundle headers must be signed by, revoked keys named."""
        return self.root.updates.trusted(self.accepted.revoked)

    def _load(self) -> Accepted:
        start = Accepted(self.bootstrap.root)
        doc = read_json(self.path)
        if doc is None:
            return start
        try:
            if not isinstance(doc, dict) or doc.get("bootstrap") != self.bootstrap.digest:
                log.info("trust.root_rebootstrap", path=str(self.path),
                         version=self.bootstrap.root.version)
                return start
            data = str(doc["document"]).encode()
            root = parse_root(data)
            revoked = frozenset(str(k) for k in doc.get("revoked", []))
            sigs = str(doc.get("signatures", "")).encode()
        except (KeyError, TypeError, RootInvalid) as exc:
            log.warning("trust.root_file_unusable", path=str(self.path), error=str(exc))
            return start
        if root.version <= self.bootstrap.root.version:
            return start
        return Accepted(root, revoked, data, sigs)

    def _save(self, accepted: Accepted) -> None:
        atomic_write_json(self.path, {
            "bootstrap": self.bootstrap.digest,
            "version": accepted.root.version,
            "document": accepted.document.decode(),
            "signatures": accepted.signatures.decode(),
            "revoked": sorted(accepted.revoked),
        })

    async def advance(self, target: int, fetch: FetchRoot, now: datetime) -> bool:
        """Walk from the accepted version to ``target``, one signed step at a time.

        The newest root must not have expired (intermediate ones may: a host offline
        for months catches up). Persists the result once, after the last check; any
        failure raises a :class:`patchd.core.errors.RootRejected` and leaves the
        accepted root as it was. True when the root changed.
        """
        if target <= self.version:
            return False
        if target - self.version > MAX_ROOT_STEPS:
            raise RootVersionInvalid(
                f"manifest names root version {target}, more than {MAX_ROOT_STEPS} "
                f"versions past the accepted {self.version}; refused")
        current = self.accepted
        while current.root.version < target:
            data, sig = await fetch(current.root.version + 1)
            new = await anyio.to_thread.run_sync(verify_next, current.root, data, sig)
            current = Accepted(new, (current.revoked | revoked_by(current.root, new))
                               - new.updates.key_ids, data, sig)
            log.info("trust.root_verified", version=new.version,
                     updates_keys=sorted(new.updates.key_ids),
                     revoked=sorted(current.revoked))
        current.root.check_current(now)
        await anyio.to_thread.run_sync(self._save, current)
        self.accepted = current
        log.info("trust.root_accepted", version=current.root.version,
                 expires=current.root.expires.isoformat() if current.root.expires else None)
        return True

    def check_current(self, now: datetime) -> None:
        """RootExpired when the accepted root has expired."""
        self.root.check_current(now)
