"""What a hostile repository says never reaches an operator unescaped, and no document
it serves can freeze a check or flood the journal (issue #15, items 3, 6 and 7).

Each test runs the real ``patchd run`` against the misbehaving server and reads what
the daemon sent where an operator looks: the ``STATUS=`` datagrams (as systemd would
split them), the log, and the socket's error replies.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.trust.signing import key_id, public_raw
from patchd.varlink import VarlinkError
from support.attacks import manifest_doc, sign
from support.daemon import DaemonProcess
from support.hostile import RELEASE, HostileRepo, hostile_world, log_events, start_daemon
from support.trees import new_key

# Any C0/C1 control character or the Unicode line separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
INJECTED = "\nWATCHDOG=trigger\nSTATUS=all good"


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[HostileRepo]:
    yield from hostile_world(tmp_path)


def _check_error(d: DaemonProcess) -> dict[str, object]:
    """CheckNow's error reply parameters (it must fail)."""
    with pytest.raises(VarlinkError) as info:
        d.call("CheckNow")
    return dict(info.value.parameters)


def _assignments(d: DaemonProcess) -> list[str]:
    """Every assignment systemd would read from the daemon's notify datagrams."""
    return [line for msg in d.notifications for line in msg.split("\n")]


def _publish_with_sig(repo: HostileRepo, sig_file: bytes) -> None:
    repo.serial += 1
    data, _ = sign(manifest_doc(serial=repo.serial, release=RELEASE, patches=[]), [repo.key])
    repo.files["/manifest.json"] = data
    repo.files["/manifest.json.sig"] = sig_file


def test_untrusted_keyid_never_reaches_status_log_or_socket(
        tmp_path: Path, repo: HostileRepo) -> None:
    """A served keyid carrying newlines and assignments is counted, never echoed."""
    stranger = key_id(public_raw(new_key()))  # well-formed, unknown: may be named
    sig = json.dumps({"signatures": [
        {"keyid": INJECTED, "sig": "AAAA"},
        {"keyid": stranger, "sig": "AAAA"},
        {"keyid": "\x1b]2;pwned\x07" + "x" * 5000, "sig": "AAAA"},
    ]}).encode()
    _publish_with_sig(repo, sig)
    d = start_daemon(tmp_path, repo)
    d.expected_errors.add("check.failed")  # the refusal each test provokes
    reason = str(_check_error(d)["reason"])
    assert "no signature by a trusted key" in reason
    assert stranger in reason and "2 malformed" in reason
    assert "WATCHDOG" not in reason and not _CONTROL.search(reason)
    assert len(reason) < 600

    d.wait_status(lambda s: bool(s.get("last_error")), "the failure recorded")
    d.wait_notify_where(lambda line: line.startswith("STATUS=") and "last error" in line)
    assignments = _assignments(d)
    assert "WATCHDOG=trigger" not in assignments and "STATUS=all good" not in assignments
    assert all(line.partition("=")[0].isupper() for line in assignments if line), assignments
    status = d.status()
    assert not _CONTROL.search(str(status["last_error"]))

    text = d.log()
    assert "WATCHDOG=trigger" not in text and "pwned" not in text
    for line in log_events(d):
        for value in line.values():
            if isinstance(value, str) and line.get("event") != "task.failed":
                assert not _CONTROL.search(value), line


def test_deeply_nested_signature_file_is_refused_logged_and_recorded(
        tmp_path: Path, repo: HostileRepo) -> None:
    """200,000 ``[`` is a refusal naming the signature file, not an internal error."""
    _publish_with_sig(repo, b"[" * 200_000)
    d = start_daemon(tmp_path, repo)
    d.expected_errors.add("check.failed")  # the refusal each test provokes
    reason = str(_check_error(d)["reason"])
    assert "signature file is not valid JSON: nested too deeply" in reason, reason
    assert "internal error" not in reason
    status = d.wait_status(lambda s: bool(s.get("last_error")), "the failure recorded")
    assert str(status["last_error"]).startswith("ManifestSignatureInvalid: ")
    failed = [e for e in log_events(d) if e.get("error_class") == "ManifestSignatureInvalid"]
    assert len(failed) == 1, failed
    assert not [e for e in log_events(d) if e.get("event") == "varlink.handler_failed"]


def test_unforeseen_exception_in_a_check_is_logged_once_and_recorded(
        tmp_path: Path, repo: HostileRepo) -> None:
    """Whatever a check raises is logged once with its class, recorded in last_error,
    and answered as a named internal error; the next check runs normally."""
    repo.publish([])
    d = start_daemon(tmp_path, repo, env={"PATCHD_TASK_FAULT": "check"})
    d.expected_errors.add("check.failed")  # the refusal each test provokes
    reason = str(_check_error(d)["reason"])
    assert reason.startswith("internal error (RuntimeError: fault injected into check")
    status = d.status()
    assert str(status["last_error"]).startswith("RuntimeError: fault injected into check")
    logged = [e for e in log_events(d) if e.get("error_class") == "RuntimeError"]
    assert len(logged) == 1 and "take_fault" in str(logged[0].get("exception")), logged
    assert not [e for e in log_events(d) if e.get("event") == "varlink.handler_failed"]
    assert d.call("CheckNow") == {"strategy": "none", "build": None}


def test_signature_file_with_many_entries_is_refused_with_one_line(
        tmp_path: Path, repo: HostileRepo) -> None:
    """32,263 entries naming the trusted key: one refusal, one log line, no stall."""
    trusted = key_id(public_raw(repo.key))
    entry = {"keyid": trusted, "sig": "A" * 86 + "=="}
    sig = json.dumps({"signatures": [entry] * 32_263}).encode()
    assert len(sig) < 4 * 1024 * 1024
    _publish_with_sig(repo, sig)
    d = start_daemon(tmp_path, repo)
    d.expected_errors.add("check.failed")  # the refusal each test provokes
    started = time.monotonic()
    reason = str(_check_error(d)["reason"])
    elapsed = time.monotonic() - started
    assert "signature file has 32263 entries, more than the 16" in reason, reason
    assert not log_events(d, "signing.bad_signature")
    refusals = [e for e in log_events(d) if "32263 entries" in str(e.get("error", ""))]
    assert len(refusals) == 1, refusals
    assert elapsed < 5, elapsed
