"""Hardening against hostile repositories and collectors, on the real daemon (issue #15).

Each test stages a misbehaving server (:mod:`support.badserver`) and runs ``patchd run``
against it: what the network sends may cost a retry, never a good patch, the daemon's
memory or its liveness.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon import state_of
from support.hostile import RELEASE, HostileRepo, hostile_world, start_daemon, wait_event
from support.trees import new_key


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    """A repository on the misbehaving server."""
    yield from hostile_world(tmp_path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build(patch: int) -> dict[str, object]:
    return {"release": RELEASE, "patch": patch}


def test_corrupt_transfer_is_retried_and_a_reissued_bundle_gets_a_fresh_try(
        tmp_path: Path, repo: HostileRepo) -> None:
    """Bytes that are not the signed ones are retried, never tombstoned; a bad signed
    bundle bans only its own sha256."""
    good = repo.bundle(2)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    repo.files["/b/2.patchd"] = bytes(flipped)
    repo.publish([(2, [repo.ref("/b/2.patchd", good)])])
    d = start_daemon(tmp_path, repo)
    assert d.call("CheckNow")["build"] == _build(2)
    failed = wait_event(d, "download.failed", where=lambda e: "manifest says" in e["error"])
    assert failed["url"] == repo.url("/b/2.patchd")
    assert _sha(good) in failed["error"] and _sha(bytes(flipped)) in failed["error"]
    wait_event(d, "check.retry_scheduled")
    assert state_of(d.status(), RELEASE, 2) == "downloading"
    repo.files["/b/2.patchd"] = good  # the mirror heals: the backoff retry installs it
    d.wait_status(lambda s: s["next_boot"] == _build(2), "patch 2 installed on retry")

    evil = repo.bundle(3, keys=[new_key()])  # the signed bytes, but a bad inner signature
    repo.files["/b/3.patchd"] = evil
    repo.publish([(2, [repo.ref("/b/2.patchd", good)]), (3, [repo.ref("/b/3.patchd", evil)])])
    assert d.call("CheckNow")["build"] == _build(3)
    d.wait_status(lambda s: state_of(s, RELEASE, 3) == "bad", "patch 3 tombstoned")
    tomb = json.loads((d.state_dir / "builds" / RELEASE / "3" / "state.json").read_text())
    assert (tomb["reason"], tomb["sha256"]) == ("signature_invalid", _sha(evil))
    assert d.call("CheckNow") == {"strategy": "none", "build": None}

    fixed = repo.bundle(3, text="patch 3, re-issued\n")
    repo.files["/b/3b.patchd"] = fixed
    repo.publish([(2, [repo.ref("/b/2.patchd", good)]), (3, [repo.ref("/b/3b.patchd", fixed)])])
    assert d.call("CheckNow")["build"] == _build(3)
    status = d.wait_status(lambda s: s["next_boot"] == _build(3), "re-issued patch 3 installed")
    assert state_of(status, RELEASE, 3) == "installed"
