"""The real daemon against a real nginx repository made with patchd's publisher."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess, Publisher, state_of, write_tree
from support.nginx import NginxRepo, nginx_repo  # noqa: F401 (fixture)


@dataclass
class Env:
    tmp: Path
    nginx: NginxRepo
    publisher: Publisher
    release_dir: Path
    daemons: list[DaemonProcess]

    @property
    def manifest_url(self) -> str:
        return self.nginx.url("stable/manifest.json")

    def tree(self, name: str, files: dict[str, str]) -> Path:
        target = self.tmp / "trees" / f"{name}-{len(list(self.tmp.glob('trees/*')))}"
        shutil.copytree(self.release_dir, target, symlinks=True)
        return write_tree(target, files)

    def patch(self, number: int, text: str | None = None, **kw: object) -> Path:
        target = self.tree(f"p{number}", {"lib/app.py": text or f"print('patch {number}')\n"})
        return self.publisher.bundle("1.4.0", number, self.release_dir, target, **kw)  # type: ignore[arg-type]

    def daemon(self, extra: str = "", env: dict[str, str] | None = None,
               start: bool = True) -> DaemonProcess:
        d = DaemonProcess(self.tmp / f"d{len(self.daemons)}", manifest_url=self.manifest_url,
                          keys=[self.publisher.public], release_dir=self.release_dir,
                          extra=extra, env=env)
        self.daemons.append(d)
        if start:
            d.start()
        return d


@pytest.fixture
def env(tmp_path: Path, nginx_repo: NginxRepo) -> Iterator[Env]:  # noqa: F811
    release = write_tree(tmp_path / "opt" / "kiosk",
                         {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "print('1.4.0')\n"},
                         version="1.4.0")
    publisher = Publisher(tmp_path, nginx_repo.root / "stable")
    e = Env(tmp_path, nginx_repo, publisher, release, [])
    try:
        yield e
    finally:
        for d in e.daemons:
            d.close()


def boot(d: DaemonProcess) -> dict[str, object]:
    """Boot next_boot as the host would and report success."""
    reply = d.call("BootStart", {})
    d.call("BootSuccess", {})
    return reply


def test_first_and_newer_patch_installed(env: Env) -> None:
    """A published patch is installed as next_boot; a newer one replaces it."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    assert d.check_and_wait()["strategy"] == "patch"
    status = d.status()
    assert status["next_boot"] == {"release": "1.4.0", "patch": 1}
    tree = Path(d.call("GetBootTarget")["path"])
    assert (tree / "lib/app.py").read_text() == "print('patch 1')\n"
    assert (env.release_dir / "lib/app.py").read_text() == "print('1.4.0')\n"
    boot(d)
    env.publisher.publish(env.patch(2))
    d.check_and_wait()
    assert d.status()["next_boot"] == {"release": "1.4.0", "patch": 2}


def test_rollback_falls_back_and_roll_forward_reinstalls(env: Env) -> None:
    """A server rollback forgets the patch and falls back; publishing it again reinstalls it."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    d.check_and_wait()
    boot(d)
    env.publisher.publish(env.patch(2))
    d.check_and_wait()
    assert d.status()["next_boot"]["patch"] == 2
    env.publisher.roll_back("1.4.0", 2)
    assert d.check_and_wait()["strategy"] == "none"
    status = d.status()
    assert status["next_boot"] == {"release": "1.4.0", "patch": 1}
    assert state_of(status, "1.4.0", 2) is None
    queued = json.loads((d.state_dir / "events.json").read_text())["events"]
    rollbacks = [e for e in queued if e["type"] == "rollback"]
    assert [(e["patch"], e["message"]) for e in rollbacks] == [
        (2, "rolled back by the server")], rollbacks  # one event, not one per layer
    env.publisher.publish(env.patch(2))  # re-publishing clears the rolled_back flag
    manifest = json.loads((env.publisher.repo / "manifest.json").read_text())
    entry = next(r for r in manifest["releases"] if r["release"] == "1.4.0")
    if 2 in entry.get("rolled_back", []):
        pytest.fail("publisher kept 2 in rolled_back after re-publishing it")
    assert d.check_and_wait()["strategy"] == "patch"
    assert d.status()["next_boot"]["patch"] == 2


def test_full_upgrade(env: Env) -> None:
    """A full bundle of a newer release installs as (R', 0) and becomes the release once booted."""
    target = write_tree(env.tmp / "trees" / "full",
                        {"bin/kiosk": "#!/bin/sh\n", "lib/app.py": "print('1.5.0')\n"},
                        version="1.5.0")
    env.publisher.publish(env.publisher.bundle("1.5.0", 0, None, target))
    d = env.daemon()
    reply = d.check_and_wait()
    assert reply == {"strategy": "full", "build": {"release": "1.5.0", "patch": 0}}
    target_reply = d.call("GetBootTarget")
    assert Path(target_reply["path"]) == d.state_dir / "builds/1.5.0/0/tree"
    assert (Path(target_reply["path"]) / "lib/app.py").read_text() == "print('1.5.0')\n"
    boot(d)
    assert d.status()["release"] == "1.5.0"


def test_rollout_zero_not_taken_hundred_taken(env: Env) -> None:
    """rollout 0 leaves the host alone; raising it to 100 installs."""
    bundle = env.patch(1)
    env.publisher.publish(bundle, rollout=0)
    d = env.daemon()
    assert d.check_and_wait()["strategy"] == "none"
    env.publisher.publish(bundle, rollout=100)
    assert d.check_and_wait()["strategy"] == "patch"


def _refused(d: DaemonProcess, needle: str) -> None:
    d.expected_errors.add("check.failed")  # the refusal is the point
    with pytest.raises(VarlinkError) as info:
        d.call("CheckNow")
    assert info.value.name == "io.patchd.Updater.UpdateFailed"
    assert needle in info.value.parameters["reason"], info.value.parameters
    d.wait_log(needle)
    status = d.status()
    assert status["builds"] == [] or all(b["state"] != "installed" for b in status["builds"])
    assert status["next_boot"] == {"release": "1.4.0", "patch": 0}
    assert needle in (status["last_error"] or "")


def test_expired_manifest_refused(env: Env) -> None:
    """An expired manifest (freeze attack) is refused with a clear reason; nothing installed."""
    env.publisher.publish(env.patch(1), expires=timedelta(seconds=-60))
    _refused(env.daemon(), "expired")


def test_lower_serial_refused(env: Env) -> None:
    """After serial N is accepted, an older manifest (rollback attack) is refused."""
    env.publisher.publish(env.patch(1))
    old = {n: (env.publisher.repo / n).read_bytes()
           for n in ("manifest.json", "manifest.json.sig")}
    env.publisher.roll_back("1.4.0", 1)
    d = env.daemon()
    assert d.check_and_wait()["strategy"] == "none"
    for name, data in old.items():
        (env.publisher.repo / name).write_bytes(data)
    _refused(d, "lower than the accepted")


def test_wrong_channel_refused(env: Env) -> None:
    """A manifest for another channel is refused."""
    (env.tmp / "beta").mkdir()
    beta = Publisher(env.tmp / "beta", env.publisher.repo, channel="beta")
    beta.key, beta.public = env.publisher.key, env.publisher.public
    beta.publish(env.patch(1))
    _refused(env.daemon(), "channel 'beta'")


def test_bad_signature_refused(env: Env) -> None:
    """A manifest signed by an untrusted key is refused."""
    (env.tmp / "mallory").mkdir()
    mallory = Publisher(env.tmp / "mallory", env.publisher.repo)
    mallory.publish(env.patch(1))
    _refused(env.daemon(), "manifest signature")


def test_config_edit_changes_manifest_url_without_restart(env: Env) -> None:
    """Editing manifest_url takes effect live (watchfiles), with RELOADING=1 then READY=1."""
    d = env.daemon(extra='[server]\nmanifest_url = "' + env.nginx.url("nowhere/manifest.json")
                   + '"\n')
    d.expected_errors.add("check.failed")  # checks against the 404 URL
    with pytest.raises(VarlinkError):
        d.call("CheckNow")
    mark = len(d.notifications)
    d.write_config(env.manifest_url, [env.publisher.public])
    reloading = d.wait_notify("RELOADING=1", after=mark)
    assert any(line.startswith("MONOTONIC_USEC=") for line in
               d.notifications[reloading].splitlines())
    d.wait_notify("READY=1", after=reloading)
    env.publisher.publish(env.patch(1))
    assert d.check_and_wait()["strategy"] == "patch"
    assert d.proc is not None and d.proc.poll() is None


def test_invalid_config_edit_keeps_old_config(env: Env) -> None:
    """An invalid edit is logged with its reason and the running config stays."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    d.expected_errors.add("config.reload_failed")  # the invalid edit
    mark = len(d.notifications)
    d.config_path.write_text(d.config_path.read_text() + "\n[bogus]\nx = 1\n")
    d.wait_notify("READY=1", after=d.wait_notify("RELOADING=1", after=mark))
    d.wait_log("config.reload_failed")
    assert "unknown section" in d.log()
    assert d.check_and_wait()["strategy"] == "patch"


def test_sighup_reloads(env: Env) -> None:
    """SIGHUP reloads the config (RELOADING=1 … READY=1)."""
    import signal

    d = env.daemon()
    mark = len(d.notifications)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("READY=1", after=d.wait_notify("RELOADING=1", after=mark))


def test_sigterm_mid_download_then_restart_resumes(env: Env) -> None:
    """SIGTERM while downloading exits 0 within 5 s with STOPPING=1; restart resumes by Range."""
    target = env.tree("big", {"lib/blob.bin": os.urandom(1_500_000).hex()})
    env.publisher.publish(env.publisher.bundle("1.4.0", 1, env.release_dir, target))
    d = env.daemon(extra='[install]\nmax_download_rate = "400KB"\n')
    d.call("CheckNow")
    d.wait_status(lambda s: s["activity"]["phase"] == "downloading"
                  and s["activity"]["done"] > 200_000, "download under way")
    mark = len(d.notifications)
    assert d.stop(timeout=5) == 0
    d.wait_notify("STOPPING=1", after=mark)
    partial = d.cache_dir / "downloads" / "1.4.0-1.patchd"
    assert partial.exists() and partial.stat().st_size > 200_000
    d.write_config(env.manifest_url, [env.publisher.public])  # full speed now
    d.start()
    d.check_and_wait()
    assert d.status()["next_boot"] == {"release": "1.4.0", "patch": 1}
    bundle_requests = [r for r in env.nginx.barrier() if r.path.endswith(".patchd")]
    assert len(bundle_requests) == 2
    assert bundle_requests[1].range.startswith("bytes=") and \
        not bundle_requests[1].range.startswith("bytes=0-"), bundle_requests


def test_channel_change_stops_the_old_channels_update(env: Env) -> None:
    """A reload to another channel stops the update the old channel's manifest started:
    nothing of the old channel is installed, and the next check asks the new one."""
    target = env.tree("big", {"lib/blob.bin": os.urandom(1_500_000).hex()})
    env.publisher.publish(env.publisher.bundle("1.4.0", 1, env.release_dir, target))
    slow = '[install]\nmax_download_rate = "400KB"\n'
    d = env.daemon(extra=slow)
    d.expected_errors.add("check.failed")  # the new channel's check: this repo is stable's
    d.call("CheckNow")
    d.wait_status(lambda s: s["activity"]["phase"] == "downloading"
                  and s["activity"]["done"] > 100_000, "download under way")
    mark = len(d.notifications)
    d.write_config(env.manifest_url, [env.publisher.public],
                   slow + '[server]\nchannel = "beta"\n')
    d.wait_notify("READY=1", after=d.wait_notify("RELOADING=1", after=mark))
    d.wait_log("channel 'beta'")  # the check that follows the reload asks for beta
    status = d.wait_status(lambda s: s["activity"]["phase"] == "idle", "update stopped")
    assert status["next_boot"] == {"release": "1.4.0", "patch": 0}, status
    assert all(b["state"] != "installed" for b in status["builds"]), status["builds"]


def test_status_line_and_ready_notifications(env: Env) -> None:
    """READY=1 comes with a STATUS= summary; a download updates STATUS= with a percentage."""
    target = env.tree("big", {"lib/blob.bin": os.urandom(600_000).hex()})
    env.publisher.publish(env.publisher.bundle("1.4.0", 1, env.release_dir, target))
    d = env.daemon(extra='[install]\nmax_download_rate = "1MB"\n')
    d.wait_notify("STATUS=idle; next boot 1.4.0+0")  # a datagram of its own after READY
    d.check_and_wait()
    statuses = [m for m in d.notifications if m.startswith("STATUS=downloading 1.4.0+1: ")]
    assert statuses, d.notifications
    assert any(m.startswith("STATUS=installing 1.4.0+1") for m in d.notifications)


def test_watchdog_pings_at_half_the_interval(env: Env) -> None:
    """With WATCHDOG_USEC=400ms the daemon sends WATCHDOG=1 about every 200 ms."""
    import time

    d = env.daemon(env={"WATCHDOG_USEC": "400000"}, start=False)
    d.start()
    first = d.wait_notify("WATCHDOG=1")
    started = time.monotonic()
    fifth = first
    for _ in range(5):
        fifth = d.wait_notify("WATCHDOG=1", after=fifth + 1)
    elapsed = time.monotonic() - started
    assert 0.7 < elapsed < 2.0, elapsed


def test_second_daemon_on_same_state_dir_exits_with_clear_error(env: Env) -> None:
    """A second daemon for the same app refuses to start, naming the lock."""
    d = env.daemon()
    second = DaemonProcess(env.tmp / "second", manifest_url=env.manifest_url,
                           keys=[env.publisher.public], release_dir=env.release_dir)
    env.daemons.append(second)
    second.config_path.write_text(d.config_path.read_text().replace(
        str(d.socket), str(second.socket)))
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=30) == 2
    assert "locked" in second.log().lower() or "another" in second.log().lower()
