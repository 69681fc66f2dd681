"""Shared fixtures. Fixture modules with more weight live in tests/support/."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """patchd runs on asyncio only (anyio on top); tests pin it."""
    return "asyncio"
