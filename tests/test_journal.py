"""The journald native-protocol writer, tested against a real AF_UNIX datagram socket."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from patchd.host.journal import JournalWriter, decode_entry, encode_entry, field_name
from patchd.host.logs import configure_logging


@pytest.fixture
def journal_socket() -> Iterator[tuple[str, socket.socket]]:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = os.path.join(tmp, "journal.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        try:
            yield path, sock
        finally:
            sock.close()
            configure_logging("console", "info")


def receive(sock: socket.socket) -> dict[str, bytes]:
    data, ancdata, _, _ = sock.recvmsg(1 << 20, 1024)
    if ancdata:  # a large entry arrives as a memfd
        fd = int.from_bytes(ancdata[0][2][:4], "little")
        with os.fdopen(fd, "rb") as f:
            f.seek(0)  # the sender's write moved the shared offset; journald maps it
            data = f.read()
    return decode_entry(data)


def test_entry_fields_priority_identifier_and_event_fields(journal_socket) -> None:
    """A log call arrives with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and PATCHD_* fields."""
    path, sock = journal_socket
    assert configure_logging("journal", "debug", journal_path=path) == "journal"
    structlog.get_logger().warning("boot_crash", release="1.4.0", patch=3)
    fields = receive(sock)
    assert fields["PRIORITY"] == b"4"
    assert fields["SYSLOG_IDENTIFIER"] == b"patchd"
    assert fields["PATCHD_EVENT"] == b"boot_crash"
    assert fields["PATCHD_RELEASE"] == b"1.4.0"
    assert fields["PATCHD_PATCH"] == b"3"
    assert fields["MESSAGE"] == b"boot_crash release=1.4.0 patch=3"


def test_control_characters_are_escaped_and_non_ascii_survives(journal_socket) -> None:
    """A field's newline (outside text may carry one) arrives escaped; UTF-8 intact;
    a traceback keeps its lines (the length-prefixed form)."""
    path, sock = journal_socket
    configure_logging("journal", "info", journal_path=path)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("install.failed", detail="line one\nline two",
                                         who="Jürgen ✓")
    fields = receive(sock)
    assert fields["PATCHD_DETAIL"] == b"line one\\x0aline two"
    assert fields["PATCHD_WHO"] == "Jürgen ✓".encode()
    assert fields["PRIORITY"] == b"3"
    assert b"\n" not in fields["MESSAGE"].partition(b" exception=")[0]
    assert fields["PATCHD_EXCEPTION"].startswith(b"Traceback") and b"\n" in fields[
        "PATCHD_EXCEPTION"]


def test_levels_map_to_priorities_and_filter(journal_socket) -> None:
    """debug→7, info→6, error→3; below the configured level nothing is sent."""
    path, sock = journal_socket
    configure_logging("journal", "info", journal_path=path)
    log = structlog.get_logger()
    log.debug("hidden")
    log.info("shown")
    log.error("bad")
    assert receive(sock)["PRIORITY"] == b"6"
    assert receive(sock)["PRIORITY"] == b"3"
    configure_logging("journal", "debug", journal_path=path)
    log.debug("now shown")
    assert receive(sock)["PATCHD_EVENT"] == b"now shown"


def test_entry_larger_than_a_datagram_goes_through_memfd(journal_socket) -> None:
    """An entry above the socket's datagram limit is passed as a sealed memfd."""
    path, sock = journal_socket
    configure_logging("journal", "info", journal_path=path)
    # Field values are cut at 2 KiB; a traceback is ours and kept whole.
    big = "x" * (4 * 1024 * 1024)
    try:
        raise ValueError(big)
    except ValueError:
        structlog.get_logger().exception("big", blob=big)
    fields = receive(sock)
    assert big.encode() in fields["PATCHD_EXCEPTION"]
    assert len(fields["PATCHD_BLOB"]) < 2100


def test_field_names_are_sanitised() -> None:
    """Field names hold only A–Z, 0–9 and _, prefixed PATCHD_."""
    assert field_name("release") == "PATCHD_RELEASE"
    assert field_name("bytes-done.total") == "PATCHD_BYTES_DONE_TOTAL"


def test_encode_decode_round_trip() -> None:
    """The binary-safe form round-trips arbitrary bytes."""
    fields = {"A": b"x=y", "B": b"\n\x00\n", "C": "ü"}
    decoded = decode_entry(encode_entry(fields))
    assert decoded == {"A": b"x=y", "B": b"\n\x00\n", "C": "ü".encode()}


def test_missing_journal_socket_falls_back_to_console(tmp_path: Path) -> None:
    """With no journal socket the writer falls back to console lines on stderr."""
    stream = io.StringIO()
    used = configure_logging("journal", "info", stream=stream,
                             journal_path=str(tmp_path / "missing.sock"))
    assert used == "console"
    structlog.get_logger().info("hello", release="1.0")
    assert "hello" in stream.getvalue() and "release=1.0" in stream.getvalue()
    configure_logging("console", "info")


def test_auto_picks_journal_when_journal_stream_set(journal_socket, monkeypatch) -> None:
    """`auto` logs to the journal when JOURNAL_STREAM is set (running under systemd)."""
    path, _sock = journal_socket
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    assert configure_logging("auto", "info", journal_path=path) == "journal"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert configure_logging("auto", "info", journal_path=path) == "console"


def test_json_format_is_one_object_per_line() -> None:
    """The json format writes one parseable JSON object per line with level and event."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    structlog.get_logger().info("download.complete", release="1.4.0", patch=3)
    record = json.loads(stream.getvalue().strip())
    assert record["event"] == "download.complete" and record["level"] == "info"
    assert record["patch"] == 3
    configure_logging("console", "info")


def test_writer_never_raises_when_journald_is_gone(tmp_path: Path) -> None:
    """A vanished journal socket drops the entry instead of crashing the daemon."""
    writer = JournalWriter(str(tmp_path / "gone.sock"))
    try:
        writer.send(b"MESSAGE=x\n")
    finally:
        writer.close()
