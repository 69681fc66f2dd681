"""Parsing a JSON document from outside with every failure as the caller's refusal.

A document from the repository (manifest, signature file, root, bundle header) may be
anything: not UTF-8, not JSON, nested deep enough to exhaust the parser's recursion,
or large enough to exhaust memory. Each of these must become the refusal that the
caller names (``ManifestInvalid``, ``SignatureInvalid`` …), never a bare exception
that escapes into a check as an "internal error".
"""

from __future__ import annotations

import json
from typing import Any

from patchd.core.errors import PatchdError
from patchd.core.text import printable

__all__ = ["load_document"]


def load_document(data: bytes, *, limit: int, what: str, error: type[PatchdError]) -> Any:
    """The parsed JSON of ``data``; ``error`` naming ``what`` when it cannot be had."""
    if len(data) > limit:
        raise error(f"{what} is over {limit} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{what} is not valid JSON: nested too deeply") from None
    except MemoryError:
        raise error(f"{what} is too large to parse") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not JSON: {printable(exc, 200)}") from None
