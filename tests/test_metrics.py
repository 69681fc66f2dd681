"""Metrics (docs/operations.md#metrics): the real daemon's text, read by prometheus-client's
own parser, after a real update over nginx, a boot, a crash and a failed check; the
node_exporter textfile; and label values that cannot break the format."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from patchd.config import config_from_dict
from patchd.core.errors import ConfigErrors
from patchd.core.text import printable
from patchd.service.metrics import Metrics, Snapshot, render
from support.cli import run_patchd
from support.daemon import DaemonProcess, Publisher, write_tree
from support.nginx import NginxRepo, nginx_repo  # noqa: F401 (fixture)

R = "1.4.0"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample, by name and labels, as prometheus-client's parser reads it."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    want = {"app": "kiosk", **labels}
    found = [v for (n, ls), v in samples.items() if n == name and dict(ls) == want]
    assert len(found) == 1, (name, labels, sorted(k for k in samples if k[0] == name))
    return found[0]


def labels_of(samples: Samples, name: str) -> dict[str, str]:
    found = [dict(ls) for (n, ls) in samples if n == name]
    assert len(found) == 1, found
    return found[0]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path: Path, nginx_repo: NginxRepo,  # noqa: F811
          ) -> Iterator[tuple[Publisher, DaemonProcess, Path, NginxRepo]]:
    release = write_tree(tmp_path / "opt" / "kiosk", {"lib/app.py": "print('1.4.0')\n"},
                         version=R)
    repo = nginx_repo.root / "stable"
    repo.mkdir()
    publisher = Publisher(tmp_path, repo)
    textfile = tmp_path / "textfile" / "patchd-kiosk.prom"
    textfile.parent.mkdir()
    d = DaemonProcess(tmp_path / "d", manifest_url=nginx_repo.url("stable/manifest.json"),
                      keys=[publisher.public], release_dir=release,
                      extra=f'[metrics]\ntextfile = "{textfile}"\n')
    d.expected_errors.add("check.failed")  # a check before anything is published: 404
    d.start()
    try:
        yield publisher, d, textfile, nginx_repo
    finally:
        d.close()


def patch(publisher: Publisher, release: Path, number: int, size: int) -> Path:
    target = release.parent / f"t{number}"
    shutil.copytree(release, target)
    (target / "lib" / "app.py").write_text(f"print('patch {number}')\n")
    (target / "lib" / "data.bin").write_bytes(os.urandom(size))
    return publisher.bundle(R, number, release, target)


def test_metrics_of_a_real_update_boot_crash_and_failure_parse(
        setup: tuple[Publisher, DaemonProcess, Path, NginxRepo]) -> None:
    """After an update over nginx, a boot, a crashed boot and a failed check, `patchd
    metrics` and the textfile parse with prometheus-client and count what happened."""
    publisher, d, textfile, nginx = setup
    first = patch(publisher, d.release_dir, 1, 200_000)
    publisher.publish(first)
    assert d.check_and_wait()["strategy"] == "patch"
    d.call("BootStart", {"pid": os.getpid()})
    d.call("BootSuccess")

    out = run_patchd("metrics", "--socket", str(d.socket), check=True)
    samples = parse(out.stdout)
    info = labels_of(samples, "patchd_build_info")
    assert info == {"app": "kiosk", "channel": "stable", "release": R,
                    "next_boot": f"{R}+1", "last_booted": f"{R}+1", "currently_booting": ""}
    assert value(samples, "patchd_held") == 0
    assert value(samples, "patchd_installs_total") == 1
    assert value(samples, "patchd_downloads_total") == 1
    assert value(samples, "patchd_boot_successes_total") == 1
    # Exactly the bundle's bytes came from the repository (nginx logged what it sent).
    sent = sum(r.body_bytes for r in nginx.barrier() if r.path.endswith(".patchd"))
    assert value(samples, "patchd_download_bytes_total") == first.stat().st_size == sent
    assert value(samples, "patchd_boot_failures_total", reason="boot_crash") == 0
    assert value(samples, "patchd_tombstones", reason="boot_crash") == 0
    assert value(samples, "patchd_builds", state="installed") == 1
    now = time.time()
    checked = value(samples, "patchd_last_successful_check_timestamp_seconds")
    assert now - 120 < checked <= now
    # The check began (last_check) before it verified the manifest (last_successful),
    # seconds at most before it, and timestamps are whole seconds.
    assert checked - 10 <= value(samples, "patchd_last_check_timestamp_seconds") <= checked
    assert value(samples, "patchd_last_attempt_failed") == 0
    assert value(samples, "patchd_event_queue_depth") == 3  # download, install, boot_success
    assert value(samples, "patchd_event_queue_dropped_total") == 0
    assert not [k for k in samples if k[0] == "patchd_update_failures_total"]

    # The textfile follows within a few seconds and parses alike.
    wait_for(lambda: 'last_booted="1.4.0+1"' in _read(textfile), "the textfile")
    assert value(parse(_read(textfile)), "patchd_installs_total") == 1
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"  # node_exporter may read it

    # A patch whose boot crashes (the booting process is killed), then a failed check.
    publisher.publish(patch(publisher, d.release_dir, 2, 1000))
    assert d.check_and_wait()["strategy"] == "patch"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    d.call("BootStart", {"pid": child.pid})
    child.kill()
    child.wait()
    d.wait_status(lambda s: s["next_boot"]["patch"] == 1, "the crash to be noticed")
    (publisher.repo / "manifest.json").unlink()
    with pytest.raises(Exception, match="UpdateFailed"):
        d.call("CheckNow")

    samples = parse(run_patchd("metrics", "--socket", str(d.socket), check=True).stdout)
    assert value(samples, "patchd_boot_failures_total", reason="boot_crash") == 1
    assert value(samples, "patchd_boot_failures_total", reason="boot_timeout") == 0
    assert value(samples, "patchd_tombstones", reason="boot_crash") == 1
    assert value(samples, "patchd_builds", state="bad") == 1
    assert value(samples, "patchd_installs_total") == 2
    assert value(samples, "patchd_update_failures_total", **{"class": "RepositoryError",
                                                           "kind": "config"}) == 1
    assert value(samples, "patchd_last_attempt_failed") == 1
    assert value(samples, "patchd_last_check_timestamp_seconds") >= value(
        samples, "patchd_last_successful_check_timestamp_seconds")
    wait_for(lambda: 'reason="boot_crash"} 1' in _read(textfile), "the textfile to follow")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_a_textfile_that_cannot_be_written_is_one_warning(tmp_path: Path) -> None:
    """A textfile in a missing directory: the daemon serves on, logs one warning, and
    `patchd metrics` still answers."""
    release = write_tree(tmp_path / "opt" / "kiosk", {"lib/app.py": "x\n"}, version=R)
    publisher = Publisher(tmp_path, tmp_path / "repo")
    d = DaemonProcess(tmp_path / "d", manifest_url=f"file://{tmp_path}/repo/manifest.json",
                      keys=[publisher.public], release_dir=release,
                      extra=f'[metrics]\ntextfile = "{tmp_path}/missing/kiosk.prom"\n')
    try:
        d.start()
        d.wait_log("metrics.write_failed")
        samples = parse(run_patchd("metrics", "--socket", str(d.socket), check=True).stdout)
        assert value(samples, "patchd_installs_total") == 0
        assert d.log().count("metrics.write_failed") == 1
        assert '"level": "error"' not in d.log()
    finally:
        d.close()


def test_label_values_cannot_break_the_format() -> None:
    """Quotes, backslashes, newlines and escape sequences in a label value come back from
    the parser as the visible text, and no line of the output is forged."""
    hostile = 'a"b\\c\nd\x1b[2J}e'
    status = {"app": "kiosk", "channel": hostile, "release": hostile,
              "next_boot": {"release": R, "patch": 1}, "builds": [],
              "last_check": "not a time",
              "hold": {"reason": "trade show", "since": "2026-12-07T10:00:00Z"}}
    text = render(status, Snapshot(0.0), last_attempt=None, queue_depth=0, queue_dropped=0)
    samples = parse(text)
    info = labels_of(samples, "patchd_build_info")
    assert info["channel"] == info["release"] == printable(hostile)
    assert "\x1b" not in text
    assert sum(line.startswith("patchd_build_info") for line in text.splitlines()) == 1
    assert value(samples, "patchd_held") == 1
    assert value(samples, "patchd_last_successful_check_timestamp_seconds") == 0


def test_counters_count_bytes_boots_and_failures() -> None:
    """Bytes count each rise of the download's progress (a restart from zero is not
    counted twice); boot failures go by the reason their event names."""
    from patchd.core.errors import NetworkError

    metrics = Metrics(clock=lambda: 100.0)
    seen: list[int] = []
    report = metrics.counting(lambda done, total: seen.append(done), offset=300)
    for done in (300, 500, 1000, 0, 400, 1000):
        report(done, 1000)
    metrics.event("boot_failure", None, "boot_timeout: no BootSuccess within 5 s")
    metrics.event("boot_failure", None, "something: odd")
    metrics.failure(NetworkError("down"))
    snap = metrics.snapshot()
    assert snap.download_bytes == 700 + 1000
    assert seen == [300, 500, 1000, 0, 400, 1000]
    assert snap.boot_failures == {"boot_timeout": 1, "other": 1}
    assert snap.failures == {("NetworkError", "transient"): 1}


@pytest.mark.parametrize(("textfile", "problem"), [
    ("metrics/kiosk.prom", "expected an absolute path"),
    ("/var/lib/node_exporter/textfile/kiosk.txt", "ending in .prom"),
    (42, "expected a string"),
])
def test_metrics_textfile_is_checked(textfile: object, problem: str) -> None:
    """[metrics] textfile must be an absolute *.prom path; it is off by default."""
    base = {"app": {"name": "kiosk", "release_dir": "/opt/kiosk"},
            "server": {"manifest_url": "https://u.example/m.json"},
            "trust": {"keys": ["ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="]}}
    assert config_from_dict(base).metrics.textfile == ""
    with pytest.raises(ConfigErrors, match=f"metrics.textfile: .*{problem}"):
        config_from_dict({**base, "metrics": {"textfile": textfile}})
