"""A manual check that failed transiently is retried on the backoff schedule (#16 item 8).

Before, ``patchd check`` said "will be retried" but nothing was scheduled: the next try
was the normal poll, an hour later by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.varlink import VarlinkError
from support.badserver import Conn, Request
from support.hostile import HostileRepo, hostile_world, start_daemon, wait_event


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    yield from hostile_world(tmp_path)


def test_transient_failure_of_a_manual_check_is_retried_with_backoff(
        tmp_path: Path, repo: HostileRepo) -> None:
    repo.publish([])
    manifest = repo.files.pop("/manifest.json")
    asked: list[str] = []

    def flaky(req: Request, conn: Conn) -> object:
        asked.append(req.path)
        if len(asked) == 1:
            return conn.respond(503, b"try later")
        return conn.respond(200, manifest)

    repo.routes["/manifest.json"] = flaky
    # The first poll is an hour away (PATCHD_FIRST_CHECK_DELAY): only a scheduled
    # retry can ask again within the test.
    d = start_daemon(tmp_path, repo, '[server]\npoll_interval = "2s"\n')
    with pytest.raises(VarlinkError) as info:
        d.call("CheckNow")
    assert info.value.parameters["transient"] is True
    scheduled = wait_event(d, "check.retry_scheduled")
    assert 0 < scheduled["in_seconds"] <= 2
    d.wait_status(lambda s: s["last_check"] is not None and not s["last_error"],
                  "the retried check succeeded", timeout=15)
    assert len(asked) >= 2
