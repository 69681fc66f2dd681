"""``client.json``: this host's identity and what it accepted from the repository.

``client_id`` seeds the rollout buckets and tags events; ``manifest_serial`` (and the
hash of the manifest accepted at that serial) is what refuses a rollback attack across
restarts; the HTTP validators let the next check be a cheap conditional GET.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from patchd.core.fsio import atomic_write_json, read_json
from patchd.state.layout import Layout

__all__ = ["ClientState", "accepted", "load_client_state", "save_client_state"]


@dataclass(frozen=True)
class ClientState:
    client_id: str
    manifest_serial: int | None = None
    manifest_sha256: str | None = None
    validators: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "manifest_serial": self.manifest_serial,
                "manifest_sha256": self.manifest_sha256, "validators": self.validators}


def load_client_state(layout: Layout) -> ClientState:
    """Read client.json, creating a new client id when absent or unreadable."""
    doc = read_json(layout.client)
    if isinstance(doc, dict) and isinstance(doc.get("client_id"), str) and doc["client_id"]:
        serial = doc.get("manifest_serial")
        digest = doc.get("manifest_sha256")
        validators = doc.get("validators")
        state = ClientState(
            client_id=doc["client_id"],
            manifest_serial=serial if isinstance(serial, int) and not isinstance(serial, bool)
            else None,
            manifest_sha256=digest if isinstance(digest, str) else None,
            validators={k: v for k, v in validators.items()
                        if isinstance(k, str) and isinstance(v, str)}
            if isinstance(validators, dict) else {},
        )
        return state
    state = ClientState(client_id=str(uuid.uuid4()))
    save_client_state(layout, state)
    return state


def save_client_state(layout: Layout, state: ClientState) -> None:
    atomic_write_json(layout.client, state.to_json())


def accepted(state: ClientState, serial: int, sha256: str,
             validators: dict[str, str]) -> ClientState:
    return replace(state, manifest_serial=serial, manifest_sha256=sha256,
                   validators=dict(validators))
