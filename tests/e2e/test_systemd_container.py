"""patchd under a real systemd: the .deb installed in a booted Debian container (#16).

A minimal Debian (the host's release, so the package's python3.X dependency holds) is
bootstrapped once per run with mmdebstrap while the .deb is built, then booted with
systemd-nspawn; systemd is its PID 1. The tests run in file order, one stage each, on
that one machine, like an operator would: install the package, configure an app and
a local repository made with the publisher, start, break, reload, crash, reboot,
upgrade and purge. Each stage also asserts which error-priority lines patchd wrote
(`journalctl -p err`): none in a normal flow, exactly the expected ones otherwise.

Runs as root with CI=true (.ci/run) or PATCHD_SYSTEMD_E2E=1; skips elsewhere, saying
why. Cold, the module takes 2-4 minutes: the bootstrap and the .deb build run side by
side (0.5-3 min, depending on the mirror and the machine's load), the stages about one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.nspawn import Container, build_rootfs, missing_tools

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = REPO / "docs" / "host-integration.md"
APP = "kiosk"
KEY = "/root/publisher.key"
REPO_DIR = "/srv/repo/stable"
CONFIG = f"/etc/patchd/{APP}.toml"
UNIT = f"patchd@{APP}.service"


def _why_skip() -> str | None:
    if (why := missing_tools()) is not None:
        return why
    if shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists():
        return "building the .deb needs dpkg-deb and Debian's /usr/bin/python3"
    if os.environ.get("CI") != "true" and os.environ.get("PATCHD_SYSTEMD_E2E") != "1":
        return ("boots a Debian container (2-4 min, needs a Debian mirror): runs with "
                "CI=true (.ci/run) or PATCHD_SYSTEMD_E2E=1")
    return None


WHY_SKIP = _why_skip()
pytestmark = [pytest.mark.skipif(WHY_SKIP is not None, reason=WHY_SKIP or ""),
              pytest.mark.timeout(600)]


# --- the machine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """The root file system and the .deb, made at the same time; and an upgrade .deb.

    For working on these tests only: PATCHD_DEB=FILE uses a .deb built earlier and
    PATCHD_E2E_ROOTFS=DIR copies a pristine root file system made earlier (CI sets
    neither: nothing is cached across runs).
    """
    work = tmp_path_factory.mktemp("systemd-e2e")
    started = time.monotonic()
    deb_dir = work / "deb"
    builder: subprocess.Popen[bytes] | None = None
    if not os.environ.get("PATCHD_DEB"):
        with open(work / "build-deb.log", "wb") as deb_log:
            builder = subprocess.Popen(
                [sys.executable, str(REPO / "packaging" / "build-deb"), "--out", str(deb_dir)],
                stdout=deb_log, stderr=subprocess.STDOUT)
    rootfs = work / "rootfs"
    try:
        if pristine := os.environ.get("PATCHD_E2E_ROOTFS"):
            subprocess.run(["cp", "-a", pristine, str(rootfs)], check=True)
        else:
            build_rootfs(rootfs, work / "mmdebstrap.log")
        print(f"\nsystemd-e2e: root file system ready in {time.monotonic() - started:.0f} s")
        if builder is not None:
            assert builder.wait(timeout=600) == 0, (work / "build-deb.log").read_text()
            (deb,) = deb_dir.glob("patchd_*.deb")
        else:
            deb = Path(os.environ["PATCHD_DEB"])
        upgrade = repack_with_newer_version(deb, work / "upgrade")
        print(f"systemd-e2e: rootfs and .deb ready in {time.monotonic() - started:.0f} s")
        yield rootfs, deb, upgrade
    finally:
        if builder is not None and builder.poll() is None:
            builder.kill()
            builder.wait()
        shutil.rmtree(work, ignore_errors=True)


def repack_with_newer_version(deb: Path, work: Path) -> Path:
    """The same package as version X+e2e1: what an upgrade looks like to dpkg."""
    tree = work / "tree"
    work.mkdir()
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.+)$", text, re.MULTILINE)
    assert version is not None
    control.write_text(text.replace(version.group(0), f"Version: {version.group(1)}+e2e1"))
    out = work / f"patchd_{version.group(1)}+e2e1.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(out)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return out


@pytest.fixture(scope="module")
def c(built: tuple[Path, Path, Path]) -> Iterator[Container]:
    rootfs, deb, upgrade = built
    shutil.copy(deb, rootfs / "root" / "patchd.deb")
    shutil.copy(upgrade, rootfs / "root" / "patchd-upgrade.deb")
    container = Container(rootfs, rootfs.parent / "console.log")
    started = time.monotonic()
    try:
        container.boot()
        print(f"\nsystemd-e2e: container booted in {time.monotonic() - started:.1f} s")
        yield container
    finally:
        container.close()


# --- helpers -----------------------------------------------------------------------------


def status(c: Container) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(c.out(f"patchd status {APP} --json"))
    return result


def wait_status(c: Container, what: str, predicate: Callable[[dict[str, Any]], bool],
                timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        now = status(c)
        if predicate(now):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}: {now}\n"
                                 f"{c.out(f'journalctl -n 40 --no-pager -u {UNIT} -u {APP}')}")
        time.sleep(0.2)


def build(release: str, patch: int) -> dict[str, Any]:
    return {"release": release, "patch": patch}


def state(s: dict[str, Any], patch: int) -> str | None:
    return next((b["state"] for b in s["builds"] if b["build"] == build("1.0", patch)), None)


def wait_journal(c: Container, cursor: str, what: str,
                 predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = 30) -> list[dict[str, Any]]:
    """Wait until an entry after ``cursor`` satisfies ``predicate``; those entries."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in c.journal(cursor) if predicate(e)]
        if entries:
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"no journal entry: {what}\n"
                                 f"{c.out(f'journalctl -n 40 --no-pager -u {UNIT}')}")
        time.sleep(0.1)


def doc_block(start: str, holding: str = "") -> str:
    """The fenced code block of docs/host-integration.md that begins with ``start``
    (and holds ``holding``: the docs show one app unit per way of launching)."""
    for block in re.findall(r"```\w*\n(.*?)```", DOCS.read_text(), re.DOTALL):
        if block.startswith(start) and holding in block:
            return str(block)
    raise AssertionError(f"docs/host-integration.md has no block starting {start!r}"
                         f" holding {holding!r}")


def app_script(message: str, crash: bool = False) -> str:
    """The app: says which tree runs, reports BootSuccess, then serves (sleeps)."""
    if crash:
        return f'#!/bin/sh\necho "kiosk: {message}" >&2\nexit 1\n'
    return (f'#!/bin/sh\necho "kiosk: {message}"\n'
            f"patchd boot success {APP} || exit 1\nexec sleep infinity\n")


def write_config(c: Container, public: str, extra: str = "") -> None:
    """The app's config, replaced atomically (as an editor that renames does)."""
    text = (f'[app]\nname = "{APP}"\nrelease_dir = "/opt/{APP}"\n\n'
            f'[server]\nmanifest_url = "{REPO_DIR}/manifest.json"\npoll_interval = "1h"\n'
            f'{extra}\n'
            f'[trust]\nkeys = ["{public}"]\n\n[api]\nsocket_group = "{APP}"\n')
    c.write(CONFIG + ".new", text)
    os.replace(c.path(CONFIG + ".new"), c.path(CONFIG))


def publish_patch(c: Container, patch: int, message: str, crash: bool = False,
                  app: str | None = None, files: dict[str, str] | None = None) -> None:
    tree = c.path(f"/root/trees/p{patch}")
    shutil.copytree(c.path(f"/opt/{APP}"), tree, symlinks=True)
    (tree / "bin" / APP).write_text(app if app is not None else app_script(message, crash))
    for rel, text in (files or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
        (tree / rel).chmod(0o755)
    bundle = f"/root/{APP}-1.0+{patch}.patchd"
    c.run(f"mkdir -p {REPO_DIR}")
    c.run(f"patchd pack --app {APP} --release 1.0 --patch {patch} --base /opt/{APP} "
          f"--target /root/trees/p{patch} --key {KEY} -o {bundle}")
    c.run(f"patchd publish --repo {REPO_DIR} --app {APP} --channel stable --key {KEY} {bundle}")


class Memo:
    """What one stage leaves for the next: the publisher's key."""

    public = ""


# --- the stages ----------------------------------------------------------------------------


def test_package_installs_into_a_booted_system(c: Container) -> None:
    """dpkg -i: the patchd user, the unit, /etc/patchd; nothing started. Then the app
    (user, release 1.0, the launcher from the docs) and a repository with patch 1."""
    assert c.out("cat /proc/1/comm") == "systemd"
    with c.expect_errors():
        c.run("dpkg -i /root/patchd.deb")
    etc_made = c.path("/etc/patchd").is_dir()
    c.run(f"groupadd --system {APP} && useradd --system -g {APP} -d /nonexistent "
          f"-s /usr/sbin/nologin {APP}")
    c.write(f"/opt/{APP}/VERSION", "1.0\n")
    c.write(f"/opt/{APP}/bin/{APP}", app_script("release 1.0"), 0o755)
    c.write(f"/opt/{APP}/bin/launch", doc_block("#!/bin/sh\n# Boot whatever patchd says"),
            0o755)
    Memo.public = c.out(f"patchd keygen -o {KEY}")
    publish_patch(c, 1, "patch 1")
    # The stages decide when the daemon checks (`patchd check`), not its random first
    # check 0-60 s after start.
    c.write(f"/etc/systemd/system/{UNIT}.d/test.conf",
            "[Service]\nEnvironment=PATCHD_FIRST_CHECK_DELAY=3600\n")
    assert c.out("id -nG patchd") == "patchd"
    assert c.out("systemctl list-units --all --no-legend 'patchd@*'") == ""
    assert etc_made, "the package makes /etc/patchd for the admin's APP.toml"


def test_config_error_at_start_fails_the_unit_at_error_priority(c: Container) -> None:
    """A config error: the unit goes to "failed" without restarting, and the reason is
    at error priority. Then the fixed config starts."""
    write_config(c, Memo.public, extra='poll_intervall = "1h"\n')
    with c.expect_errors("server.poll_intervall"):
        start = c.run(f"systemctl start {UNIT}", check=False)
    assert start.returncode != 0
    shown = c.out(f"journalctl -p err -u {UNIT} -o cat --no-pager")
    assert f"patchd: {CONFIG}: server.poll_intervall" in shown, shown
    # Not "activating (auto-restart)": exit status 2 is not restarted.
    props = c.show(UNIT, "ActiveState", "Result", "NRestarts", "ExecMainStatus")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "0",
                     "ExecMainStatus": "2"}, props
    c.run(f"systemctl reset-failed {UNIT}")


def test_ungranted_socket_group_is_named_in_status(c: Container) -> None:
    """Without the group grant the daemon runs, the app's user is refused, and
    STATUS= (systemctl status) says why. With the drop-in from install.md it works."""
    write_config(c, Memo.public)
    with c.expect_errors():
        c.run(f"systemctl start {UNIT}")
        props = c.show(UNIT, "ActiveState", "StatusText")
        assert props["ActiveState"] == "active"
        assert props["StatusText"].startswith(f"socket group {APP} unusable"), props
        refused = c.run(f"patchd status {APP}", user=APP, check=False)
        assert refused.returncode != 0 and "ermission denied" in refused.stderr, refused
        c.write(f"/etc/systemd/system/{UNIT}.d/socket-group.conf",
                f"[Service]\nSupplementaryGroups={APP}\n")
        c.run(f"systemctl daemon-reload && systemctl restart {UNIT}")
    props = c.show(UNIT, "ActiveState", "SubState", "StatusText")
    assert props == {"ActiveState": "active", "SubState": "running",
                     "StatusText": "idle; next boot 1.0+0"}, props
    assert status(c)["app"] == APP
    c.run(f"patchd status {APP}", user=APP)
    listing = c.out(f"stat -c '%U %G %a %F' /run/patchd/{APP}.sock")
    assert listing == f"patchd {APP} 660 socket", listing


def test_ready_and_journal_fields(c: Container) -> None:
    """Type=notify READY (the start job finished with the unit running) and the
    structured fields journalctl can match on."""
    pid = c.show(UNIT, "MainPID")["MainPID"]
    (ready,) = c.journal(_PID=pid, PATCHD_EVENT="daemon.ready")
    assert ready["PATCHD_APP"] == APP
    assert ready["PATCHD_SOCKET"] == f"/run/patchd/{APP}.sock"
    assert ready["PATCHD_NEXT_BOOT"] == "1.0+0"
    assert ready["PRIORITY"] == "6" and ready["SYSLOG_IDENTIFIER"] == "patchd"
    assert ready["_SYSTEMD_UNIT"] == UNIT and ready["_TRANSPORT"] == "journal"
    assert ready["_UID"] == c.out("id -u patchd")


def test_sandbox_is_in_force(c: Container) -> None:
    """The running daemon has a seccomp filter, no capabilities and NoNewPrivs."""
    pid = c.show(UNIT, "MainPID")["MainPID"]
    fields = dict(line.split(":", 1) for line in
                  c.out(f"cat /proc/{pid}/status").splitlines() if ":" in line)
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["Seccomp"] == "2", fields["Seccomp"]
    assert fields["NoNewPrivs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    patchd_uid = c.out("id -u patchd")
    assert fields["Uid"].split() == [patchd_uid] * 4
    # The file system: read-only outside its own directories.
    assert "Read-only file system" in c.run(
        f"nsenter -t {pid} -m touch /usr/lib/patchd/x", check=False).stderr


def test_app_boots_through_patchd_and_a_crashing_patch_rolls_back(c: Container) -> None:
    """The app unit of docs/host-integration.md boots patch 1 through the launcher;
    patch 2 crashes at start, is marked bad, and systemd's restart boots patch 1."""
    c.write(f"/etc/systemd/system/{APP}.service",
            doc_block(f"# /etc/systemd/system/{APP}.service", "ExecStart=/opt/"))
    with c.expect_errors():
        c.run(f"patchd check {APP} --wait")
        assert status(c)["next_boot"] == build("1.0", 1)
        c.run(f"systemctl daemon-reload && systemctl start {APP}")
        wait_status(c, "patch 1 booted", lambda s: s["last_booted"] == build("1.0", 1))
    assert c.show(f"{APP}.service", "ActiveState")["ActiveState"] == "active"

    publish_patch(c, 2, "patch 2 crashes at start", crash=True)
    cursor = c.cursor()
    with c.expect_errors():
        c.run(f"patchd check {APP} --wait")
        assert status(c)["next_boot"] == build("1.0", 2)
        c.run(f"systemctl restart {APP}")
        (crash,) = wait_journal(c, cursor, "patch 2 marked bad",
                                lambda e: e.get("_SYSTEMD_UNIT") == UNIT
                                and e.get("PATCHD_EVENT") == "boot_crash")
        assert crash["PATCHD_BUILD"] == "1.0+2"
        # systemd restarts the app (Restart=on-failure); the launcher gets patch 1.
        wait_journal(c, crash["__CURSOR"], "patch 1 booted again",
                     lambda e: e.get("PATCHD_EVENT") == "boot.success"
                     and e.get("PATCHD_PATCH") == "1")
    after = status(c)
    assert state(after, 2) == "bad" and after["currently_booting"] is None
    assert after["last_booted"] == after["next_boot"] == build("1.0", 1)
    assert next(b["reason"] for b in after["builds"] if b["state"] == "bad") == "boot_crash"
    assert c.show(f"{APP}.service", "NRestarts", "ActiveState") == {
        "NRestarts": "1", "ActiveState": "active"}
    app_log = c.out(f"journalctl -u {APP} -o cat --no-pager")
    assert app_log.rindex("kiosk: patch 1") > app_log.index("kiosk: patch 2 crashes")


def test_reload_once_per_change_and_invalid_reload_keeps_config(c: Container) -> None:
    """Edit + `systemctl reload`: one config.reloaded. An invalid edit + reload: one
    error, the unit stays active with the old config."""
    cursor = c.cursor()
    write_config(c, Memo.public, extra='poll_jitter = 0.2\n')
    with c.expect_errors():
        c.run(f"systemctl reload {UNIT}")
        entries = wait_reload_outcomes(c, cursor)
    assert [e["PATCHD_EVENT"] for e in entries].count("config.reloaded") == 1, entries
    assert {e["PATCHD_TRIGGER"] for e in entries} == {"signal", "watch"}

    cursor = c.cursor()
    c.write(CONFIG + ".new", c.path(CONFIG).read_text() + "\n[bogus]\n")
    os.replace(c.path(CONFIG + ".new"), c.path(CONFIG))
    with c.expect_errors("config.reload_failed"):
        c.run(f"systemctl reload {UNIT}")
        entries = wait_reload_outcomes(c, cursor)
    assert next(e["PATCHD_EVENT"] for e in entries) == "config.reload_failed"
    props = c.show(UNIT, "ActiveState", "SubState")
    assert props == {"ActiveState": "active", "SubState": "running"}
    assert status(c)["app"] == APP
    write_config(c, Memo.public)
    c.run(f"systemctl reload {UNIT}")


def wait_reload_outcomes(c: Container, cursor: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Reload outcomes after ``cursor`` once both SIGHUP and the watcher had their turn."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in c.journal(cursor, _SYSTEMD_UNIT=UNIT)
                   if str(e.get("PATCHD_EVENT", "")).startswith("config.")
                   and "PATCHD_TRIGGER" in e]
        if {"signal", "watch"} <= {e["PATCHD_TRIGGER"] for e in entries}:
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"reload outcomes: {entries}")
        time.sleep(0.1)


def test_watchdog_kills_and_restarts_a_hung_daemon(c: Container) -> None:
    """SIGSTOP the daemon: the watchdog (shortened to 5 s by a drop-in) kills it and
    systemd starts a new one; the app keeps running."""
    drop_in = f"/etc/systemd/system/{UNIT}.d/watchdog.conf"
    c.write(drop_in, "[Service]\nWatchdogSec=5s\n")
    c.run(f"systemctl daemon-reload && systemctl restart {UNIT}")
    before = c.show(UNIT, "MainPID", "NRestarts")
    app_pid = c.show(f"{APP}.service", "MainPID")["MainPID"]
    cursor = c.cursor()
    with c.expect_errors():
        c.run(f"kill -STOP {before['MainPID']}")
        wait_journal(c, cursor, "systemd's watchdog timeout", lambda e: e.get("UNIT") == UNIT
                     and "atchdog timeout" in str(e.get("MESSAGE")))
        c.wait_unit(UNIT, timeout=60, ActiveState="active", SubState="running",
                    NRestarts=str(int(before["NRestarts"]) + 1))
    assert c.show(UNIT, "MainPID")["MainPID"] != before["MainPID"]
    assert c.show(f"{APP}.service", "MainPID")["MainPID"] == app_pid
    c.path(drop_in).unlink()
    c.run(f"systemctl daemon-reload && systemctl restart {UNIT}")
    assert status(c)["last_booted"] == build("1.0", 1)


def test_clean_stop(c: Container) -> None:
    """systemctl stop: STOPPING, exit 0, the socket removed; the app is untouched."""
    cursor = c.cursor()
    with c.expect_errors():
        c.run(f"systemctl stop {UNIT}")
    props = c.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    events = [e.get("PATCHD_EVENT") for e in c.journal(cursor, _SYSTEMD_UNIT=UNIT)]
    assert events[-2:] == ["daemon.stopping", "daemon.stopped"], events
    assert c.run(f"test -e /run/patchd/{APP}.sock", check=False).returncode == 1
    assert c.show(f"{APP}.service", "ActiveState")["ActiveState"] == "active"


def test_enabled_units_come_back_after_reboot(c: Container) -> None:
    """enable, reboot: patchd and the app start at boot; the app boots patch 1."""
    c.run(f"systemctl enable {UNIT} {APP}.service")
    c.reboot()
    with c.expect_errors():
        c.wait_unit(UNIT, ActiveState="active", SubState="running")
        c.wait_unit(f"{APP}.service", ActiveState="active")
        after = wait_status(c, "the app booted", lambda s: s["currently_booting"] is None
                            and s["last_booted"] == build("1.0", 1))
    assert after["next_boot"] == build("1.0", 1) and state(after, 2) == "bad"
    assert c.show(UNIT, "StatusText")["StatusText"] == "idle; next boot 1.0+1"


def test_upgrade_restarts_running_instances(c: Container) -> None:
    """dpkg -i of a newer version: the running instance is restarted, the app is not."""
    before = c.show(UNIT, "MainPID")["MainPID"]
    app_pid = c.show(f"{APP}.service", "MainPID")["MainPID"]
    with c.expect_errors():
        c.run("dpkg -i /root/patchd-upgrade.deb")
        c.wait_unit(UNIT, ActiveState="active", SubState="running")
    assert c.out("dpkg-query -W -f '${Version}' patchd").endswith("+e2e1")
    assert c.show(UNIT, "MainPID")["MainPID"] != before
    assert c.show(f"{APP}.service", "MainPID")["MainPID"] == app_pid
    assert status(c)["last_booted"] == build("1.0", 1)


def test_patchd_launch_rolls_back_a_failing_health_check(c: Container) -> None:
    """The unit of docs/host-integration.md that runs `patchd launch` (#18). Patch 3
    activates at once (`[activate] policy = "immediate"`) and is judged healthy; patch
    4's required health check fails, so the launcher reports BootFailure naming the
    check and restarts the app on patch 3, while the unit stays up (same MainPID).
    None of it is an error-priority line: a failed health check is handled."""
    c.run(f"systemctl stop {APP}")
    c.write(f"/etc/systemd/system/{APP}.service",
            doc_block(f"# /etc/systemd/system/{APP}.service", "patchd launch"))
    write_config(c, Memo.public, extra='\n[activate]\npolicy = "immediate"\n')
    serve = '#!/bin/sh\necho "kiosk: {}"\nexec sleep infinity\n'  # the launcher reports
    publish_patch(c, 3, "", app=serve.format("patch 3 under patchd launch"))
    with c.expect_errors():
        c.run(f"patchd check {APP} --wait")
        c.run(f"systemctl daemon-reload && systemctl start {APP}")
        wait_status(c, "patch 3 booted by the launcher",
                    lambda s: s["last_booted"] == build("1.0", 3))
    props = c.show(f"{APP}.service", "ActiveState", "MainPID")
    assert props["ActiveState"] == "active", props

    check = "patchd/health/required.d/10-database"
    publish_patch(c, 4, "", app=serve.format("patch 4"), files={
        check: '#!/bin/sh\necho "database unreachable"\nexit 1\n'})
    cursor = c.cursor()
    with c.expect_errors():
        c.run(f"patchd check {APP} --wait")
        after = wait_status(c, "patch 4 rolled back by its health check",
                            lambda s: state(s, 4) == "bad"
                            and s["last_booted"] == build("1.0", 3)
                            and s["currently_booting"] is None, timeout=90)
    bad = next(b for b in after["builds"] if b["build"] == build("1.0", 4))
    assert bad["reason"] == "boot_failure", bad
    assert after["next_boot"] == build("1.0", 3)
    (failed,) = wait_journal(c, cursor, "the launcher named the failed check",
                             lambda e: e.get("PATCHD_EVENT") == "health.required_failed")
    assert "10-database" in failed["PATCHD_CHECK"], failed
    assert c.show(f"{APP}.service", "ActiveState", "MainPID") == props  # never restarted
    app_log = c.out(f"journalctl -u {APP} -o cat --no-pager")
    assert app_log.rindex("kiosk: patch 3 under patchd launch") > app_log.rindex("kiosk: patch 4")
    c.run(f"systemctl stop {APP}")


def test_error_lines_over_the_whole_run(c: Container) -> None:
    """Over both boots (the journal is persistent), patchd wrote exactly two lines at
    error priority: the config error at start and the invalid reload. A watched
    crash, a watchdog kill, stops, a reboot and an upgrade are normal flows."""
    assert c.path("/var/log/journal").is_dir()
    errors = c.errors("")
    assert len(errors) == 2, errors
    assert f"patchd: {CONFIG}: server.poll_intervall" in errors[0]
    assert errors[1].startswith("config.reload_failed ")


def test_purge(c: Container) -> None:
    """dpkg --purge: instances stopped, program, cache and enablement gone; the
    builds the app boots from are kept."""
    with c.expect_errors():
        c.run("dpkg --purge patchd")
    assert c.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert c.run("command -v patchd", check=False).returncode != 0
    assert not c.path("/usr/lib/patchd").exists()
    assert not c.path("/var/cache/patchd").exists()
    assert not list(c.path("/etc/systemd/system/multi-user.target.wants").glob("patchd@*"))
    assert (c.path("/var/lib/patchd") / APP / "current").is_symlink()
