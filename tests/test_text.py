"""Escaping outside text for every sink: STATUS=, the log formats and the CLI's lines."""

from __future__ import annotations

import io
import json

import structlog

from patchd.core.error_table import describe_socket_error, to_socket_error
from patchd.core.errors import ManifestSignatureInvalid
from patchd.core.text import printable, shown_keyids
from patchd.host.journal import decode_entry, entry_fields
from patchd.host.logs import configure_logging, plain_values
from patchd.host.systemd import Notifier

HOSTILE = "key\nWATCHDOG=trigger\r\x1b[2J\u2028\u202e\udcff"


def test_printable_escapes_every_control_and_bounds_length() -> None:
    out = printable(HOSTILE)
    assert out == "key\\x0aWATCHDOG=trigger\\x0d\\x1b[2J\\u2028\\u202e\\udcff"
    assert printable("x" * 600).endswith("…") and len(printable("x" * 600)) == 513
    out.encode("utf-8")  # no lone surrogate left


def test_shown_keyids_names_only_well_formed_ids() -> None:
    assert shown_keyids([HOSTILE, "0123456789abcdef", "0123456789ABCDEF"]) == (
        "0123456789abcdef, 2 malformed")
    many = [f"{i:016x}" for i in range(20)]
    assert shown_keyids(many).endswith(", 12 more")
    assert shown_keyids([]) == "none"


def test_log_fields_are_plain_escaped_values_in_every_format() -> None:
    fields = plain_values(None, "info", {"event": "x", "keyid": HOSTILE, "previous": None,
                                         "keys": ["a", "b\n"], "n": 3})
    assert fields == {"event": "x", "keyid": printable(HOSTILE), "keys": "a,b\\x0a", "n": 3}
    for fmt in ("console", "json"):
        out = io.StringIO()
        configure_logging(fmt, "info", stream=out)
        structlog.get_logger("t").warning("odd.keyid", keyid=HOSTILE, previous=None)
        line = out.getvalue()
        assert line.count("\n") == 1 and "previous" not in line, line
        if fmt == "json":
            assert json.loads(line)["keyid"] == printable(HOSTILE)
    journal = entry_fields(plain_values(None, "info", {"event": "e", "keyid": HOSTILE}))
    assert "\n" not in journal["MESSAGE"] and "\n" not in journal["PATCHD_KEYID"]


def test_status_datagram_is_one_line() -> None:
    sent: list[str] = []

    class Recording(Notifier):
        def _send(self, message: str) -> None:
            sent.append(message)

    Recording().status(f"last error: {HOSTILE}")
    assert sent == [f"STATUS=last error: {printable(HOSTILE)}"] and "\n" not in sent[0]


def test_socket_error_reason_and_cli_line_are_escaped() -> None:
    name, params = to_socket_error(ManifestSignatureInvalid(f"signed by {HOSTILE}"))
    assert "\n" not in params["reason"] and "\x1b" not in params["reason"]
    raw = {"reason": "a\nb\x1b[31m", "transient": False}
    line = str(describe_socket_error(name, raw))
    assert "\n" not in line and "\x1b" not in line


def test_journal_decode_roundtrip_keeps_tracebacks_multiline() -> None:
    fields = entry_fields(plain_values(None, "error", {"event": "e",
                                                       "exception": "Traceback\n  x"}))
    assert fields["PATCHD_EXCEPTION"] == "Traceback\n  x"
    from patchd.host.journal import encode_entry
    assert decode_entry(encode_entry(fields))["PATCHD_EXCEPTION"] == b"Traceback\n  x"
