"""structlog set-up, in one place: console lines, JSON lines, or journald's native protocol.

Reconfiguring is cheap and takes effect for every module's logger at once (loggers are
not cached), so a config reload can change the level or format of a running daemon.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
import structlog.tracebacks

from patchd.core.text import printable
from patchd.host.journal import DEFAULT_SOCKET, JournalLogger, JournalRenderer, JournalWriter

FORMATS = ("auto", "console", "json", "journal")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

_journal_writer: JournalWriter | None = None

# Keys whose values are ours and multi-line on purpose (a traceback), or structlog's.
#: Characters kept of one field's value: bounds the journal volume of one line.
_MAX_FIELD = 2048
_RAW_KEYS = frozenset({"exc_info", "stack_info", "exception"})


def _plain(value: object) -> object:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(printable(v, 200) for v in value)
    return printable(value, _MAX_FIELD)


def plain_values(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Every field as a plain, escaped value, whatever the format.

    Values often carry outside text (a URL, a server's reason, a key id); escaped here,
    none can forge a console line or a journal assignment. A None field is left out
    rather than shown as Python's ``None``.
    """
    return {k: v if k in _RAW_KEYS else _plain(v)
            for k, v in event_dict.items() if v is not None or k in _RAW_KEYS}


def resolve_format(fmt: str, journal_path: str = DEFAULT_SOCKET) -> str:
    """``auto`` means journal under systemd (``JOURNAL_STREAM`` set), else console.

    A journal that is asked for but absent falls back to console on stderr, so a
    misconfigured host still shows its logs somewhere.
    """
    if fmt == "auto":
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") else "console"
    if fmt == "journal" and not JournalWriter.available(journal_path):
        return "console"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info", *, stream: TextIO | None = None,
                      journal_path: str = DEFAULT_SOCKET) -> str:
    """Configure structlog for the whole process; returns the format actually used."""
    global _journal_writer
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")
    used = resolve_format(fmt, journal_path)
    out = stream if stream is not None else sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        plain_values,
    ]
    logger_factory: Any
    if used == "journal":
        if _journal_writer is None or _journal_writer.path != journal_path:
            if _journal_writer is not None:
                _journal_writer.close()
            _journal_writer = JournalWriter(journal_path)
        writer = _journal_writer
        processors = [*shared, structlog.processors.format_exc_info, JournalRenderer()]
        logger_factory = lambda *args: JournalLogger(writer)  # noqa: E731
    elif used == "json":
        processors = [*shared, structlog.processors.TimeStamper(fmt="iso", utc=True),
                      
                      # Without frame locals: they may hold a token or a header.
                      structlog.processors.ExceptionRenderer(
                          structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
                      structlog.processors.JSONRenderer()]
        logger_factory = structlog.PrintLoggerFactory(out)
    else:
        processors = [*shared, structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                      structlog.dev.ConsoleRenderer(colors=False)]
        logger_factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    if used != fmt and fmt in ("journal",):
        structlog.get_logger("patchd.host.logs").warning(
            "log.journal_unavailable", socket=journal_path, fallback="console")
    return used
