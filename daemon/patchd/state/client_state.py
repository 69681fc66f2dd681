"""``client.json``: this host's identity and what it accepted from each channel.

``client_id`` seeds the rollout buckets and tags events. For every channel the host
has followed, the highest manifest serial accepted (and the hash of the manifest
accepted at that serial) is what refuses a rollback attack across restarts, and the
HTTP validators let the next check be a cheap conditional GET.

Serials are kept per channel, not per host: each channel's manifests are one signed
sequence (the channel's name is inside the signed document, so one channel's manifest
is never accepted for another), and only the operator switches channels, through the
config. Switching to another channel starts at that channel's own record; switching
back finds the old channel's record, so a replayed older manifest of it is still
refused. They are not kept per manifest URL: a mirror of the same channel must not
reset the protection.

An old ``client.json`` with one top-level ``manifest_serial`` (before channels had a
record each) is read as the record of the channel configured when it is first loaded,
and written back in the new form at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from patchd.core.fsio import atomic_write_json, read_json
from patchd.state.layout import Layout

__all__ = ["Accepted", "ClientState", "accepted", "load_client_state", "save_client_state"]


@dataclass(frozen=True)
class Accepted:
    """The last manifest a host accepted on one channel."""

    serial: int | None = None
    sha256: str | None = None
    validators: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"manifest_serial": self.serial, "manifest_sha256": self.sha256,
                "validators": self.validators}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Accepted:
        """Lenient: a field of the wrong type counts as absent."""
        serial = doc.get("manifest_serial")
        digest = doc.get("manifest_sha256")
        validators = doc.get("validators")
        return cls(
            serial=serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
            sha256=digest if isinstance(digest, str) else None,
            validators={k: v for k, v in validators.items()
                        if isinstance(k, str) and isinstance(v, str)}
            if isinstance(validators, dict) else {},
        )


@dataclass(frozen=True)
class ClientState:
    client_id: str
    #: channel name → what this host accepted on it.
    channels: dict[str, Accepted] = field(default_factory=dict)

    def channel(self, name: str) -> Accepted:
        """What this host accepted on channel ``name`` (nothing yet: all None)."""
        return self.channels.get(name, Accepted())

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id,
                "channels": {name: rec.to_json() for name, rec in sorted(self.channels.items())}}


def load_client_state(layout: Layout, channel: str) -> ClientState:
    """Read client.json, creating a new client id when absent or unreadable.

    ``channel`` is the configured channel: an old file's single accepted serial is
    taken as that channel's (and the file rewritten in the per-channel form).
    """
    doc = read_json(layout.client)
    if isinstance(doc, dict) and isinstance(doc.get("client_id"), str) and doc["client_id"]:
        records = doc.get("channels")
        if isinstance(records, dict):
            channels = {name: Accepted.from_json(rec) for name, rec in records.items()
                        if isinstance(name, str) and isinstance(rec, dict)}
            return ClientState(client_id=doc["client_id"], channels=channels)
        legacy = Accepted.from_json(doc)
        state = ClientState(client_id=doc["client_id"],
                            channels={channel: legacy} if legacy != Accepted() else {})
        save_client_state(layout, state)  # migrated: a later switch keeps it with its channel
        return state
    state = ClientState(client_id=str(uuid.uuid4()))
    save_client_state(layout, state)
    return state


def save_client_state(layout: Layout, state: ClientState) -> None:
    atomic_write_json(layout.client, state.to_json())


def accepted(state: ClientState, channel: str, serial: int, sha256: str,
             validators: dict[str, str]) -> ClientState:
    """``state`` with the manifest accepted on ``channel``; other channels unchanged."""
    record = Accepted(serial=serial, sha256=sha256, validators=dict(validators))
    return replace(state, channels={**state.channels, channel: record})
