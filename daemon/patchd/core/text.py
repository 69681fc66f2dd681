"""Text from outside made safe to echo: one line, no control characters, bounded.

Keyids, URLs, server replies and file names reach ``STATUS=``, log fields, console
lines and socket error strings. systemd splits a notify datagram at each newline into
assignments, a terminal obeys escape sequences, and a console log line can be forged
with an embedded newline; so every such sink passes text through :func:`printable`.
Escaping is visible (``\\x0a``) rather than silent, so an operator sees that something
odd was sent.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ECHO", "printable", "shown_keyids"]

#: Characters echoed at most from one piece of outside text (the rest becomes ``…``).
MAX_ECHO = 512

# C0 and C1 controls, DEL, the Unicode line/paragraph separators, bidi overrides and
# isolates (which reorder what a terminal shows), and lone surrogates (not encodable).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

_KEYID = re.compile(r"[0-9a-f]{16}")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int = MAX_ECHO) -> str:
    """``text`` as one line of visible characters, at most ``limit`` of them kept."""
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return _UNSAFE.sub(_escape, s)


def shown_keyids(keyids: object, limit: int = 8) -> str:
    """Key ids named by an untrusted signature file, as a message may show them.

    Only well-formed key ids (16 lowercase hex digits) are echoed, at most ``limit``
    of them; anything else is counted, never shown, so a served file cannot choose
    what our messages say.
    """
    seen = sorted({k for k in keyids if isinstance(k, str)} if isinstance(keyids, (
        list, set, frozenset, tuple)) else set())
    good = [k for k in seen if _KEYID.fullmatch(k)]
    odd = len(seen) - len(good)
    parts = good[:limit]
    if len(good) > limit:
        parts.append(f"{len(good) - limit} more")
    if odd:
        parts.append(f"{odd} malformed")
    return ", ".join(parts) or "none"
