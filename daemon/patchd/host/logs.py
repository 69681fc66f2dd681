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

from patchd.host.journal import DEFAULT_SOCKET, JournalLogger, JournalRenderer, JournalWriter

FORMATS = ("auto", "console", "json", "journal")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

_journal_writer: JournalWriter | None = None


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
                      structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
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
