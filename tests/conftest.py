"""Shared fixtures. Fixture modules with more weight live in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """patchd runs on asyncio only (anyio on top); tests pin it."""
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_journal() -> Iterator[None]:
    """No daemon logs at error level in a normal flow (operators alert on
    ``journalctl -p err``): any error-level line a daemon wrote during the test fails
    it, unless the test listed its event in that daemon's ``expected_errors``. A daemon
    made during the test and left running is closed (killed) afterwards."""
    from support.daemon import DaemonProcess

    marks = {id(d): d.log_size() for d in DaemonProcess.instances}
    yield
    problems = []
    for d in DaemonProcess.instances:
        for line in d.unexpected_errors(since=marks.get(id(d), 0)):
            problems.append(f"{d.work}: {line}")
    for d in DaemonProcess.instances:
        if id(d) not in marks and not d.closed:
            # Made during this test and never closed: nothing else would stop it (an
            # orphan daemon polling for the rest of the run, found by ps after CI).
            d.close()
    DaemonProcess.instances[:] = [d for d in DaemonProcess.instances if not d.closed]
    if problems:
        pytest.fail("unexpected error-level log lines:\n" + "\n".join(problems[:20]),
                    pytrace=False)
