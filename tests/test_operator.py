"""Operator controls on the REAL daemon (issue #16 items 2-4), through the real ``patchd``
command line where an operator would use it: a channel switched by a config reload
starts at its own accepted serial and keeps the old channel's protection; ``hold`` and
``unhold``; ``unmark`` (admins only, logged, an event); ``install`` of an older build
refused without ``--hold`` and kept by it."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

from patchd.state import (
    Accepted,
    ClientState,
    Hold,
    Layout,
    accepted,
    load_client_state,
    read_hold,
    remove_hold,
    save_client_state,
    write_hold,
)
from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess, Publisher, state_of
from support.env import (  # noqa: F401 (env_fixture, http_env_fixture: fixtures)
    UPDATER,
    Env,
    R,
    as_user,
    b,
    denied,
    env_fixture,
    http_env_fixture,
    needs_root,
    ok,
    one_line_error,
    patchd,
    shared_socket,
)
from support.hostile import log_events
from support.nginx import nginx_repo  # noqa: F401 (fixture)


def refused(d: DaemonProcess, method: str, params: dict[str, Any] | None = None
            ) -> VarlinkError:
    try:
        reply = d.call(method, params)
    except VarlinkError as exc:
        return exc
    raise AssertionError(f"{method} succeeded: {reply}\n{d.log()}")


def client_json(d: DaemonProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((d.state_dir / "client.json").read_text())
    return doc


def events(d: DaemonProcess) -> list[dict[str, Any]]:
    doc = json.loads((d.state_dir / "events.json").read_text())
    return list(doc["events"])


def no_errors_logged(d: DaemonProcess) -> None:
    """A normal flow: nothing at error level or above in the daemon's log."""
    bad = [r for r in log_events(d) if r.get("level") in ("error", "critical")]
    assert not bad, bad


# --- item 2: channels --------------------------------------------------------------------


def channel_publisher(env: Env, channel: str) -> Publisher:
    """A publisher of another channel of the same app, signing with the same key."""
    other = copy.copy(env.publisher)
    other.channel = channel
    other.repo = env.tmp / "repo" / channel
    other.repo.mkdir(parents=True, exist_ok=True)
    return other


def manifest_files(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in ("manifest.json", "manifest.json.sig")}


def put_back(repo: Path, files: dict[str, bytes]) -> None:
    """Replay saved manifest files into ``repo`` (signature first, each atomically)."""
    for name in ("manifest.json.sig", "manifest.json"):
        tmp = repo / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, repo / name)


def switch_channel(d: DaemonProcess, env: Env, publisher: Publisher) -> None:
    """Point the host at ``publisher``'s channel: edit the config, reload, wait for it."""
    d.write_config(f"file://{publisher.repo}/manifest.json", [env.publisher.public],
                   f'[server]\nchannel = "{publisher.channel}"\n')
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_status(lambda s: s["channel"] == publisher.channel, f"channel {publisher.channel}")


def test_a_switched_channel_starts_at_its_own_serial_and_the_old_one_stays_protected(
        env: Env) -> None:
    """stable at serial 4, then beta (serial 1) is accepted and installs; after a restart,
    switching back to stable still refuses a replayed stable manifest of serial 3."""
    stable = env.publisher
    stable.publish(env.patch(1))
    stable.publish()
    stable.publish()
    serial_3 = manifest_files(stable.repo)
    stable.publish()
    d = env.daemon()
    d.expected_errors |= {"check.failed"}  # the refusals this test provokes
    d.check_and_wait()
    assert d.status()["next_boot"] == b(1)

    beta = channel_publisher(env, "beta")
    beta.publish(env.patch(2))
    switch_channel(d, env, beta)
    d.call("CheckNow")  # the reload's own check may have run first: it is joined
    d.wait_status(lambda s: s["next_boot"] == b(2) and s["activity"]["phase"] == "idle",
                  "beta's patch 2 installed")
    d.stop()
    d.start()
    channels = client_json(d)["channels"]
    assert (channels["stable"]["manifest_serial"], channels["beta"]["manifest_serial"]) == (4, 1)

    put_back(stable.repo, serial_3)
    switch_channel(d, env, stable)
    error = refused(d, "CheckNow")
    assert error.name == f"{UPDATER}.UpdateFailed", error
    assert "manifest serial 3 is lower than the accepted 4" in error.parameters["reason"]
    assert client_json(d)["channels"]["stable"]["manifest_serial"] == 4


def test_an_old_client_json_keeps_its_serial_for_the_configured_channel(env: Env) -> None:
    """A client.json of the single-serial form is read as the configured channel's record
    (a replay below it is still refused) and rewritten per channel; another channel then
    starts at its own serial."""
    env.publisher.publish(env.patch(1))
    env.publisher.publish()
    env.publisher.publish()
    legacy = {"client_id": "33e38d43-684b-4b99-a4b0-842397dd0069", "manifest_serial": 5,
              "manifest_sha256": "0" * 64, "validators": {"etag": '"x"'}}

    def old_state(p: DaemonProcess) -> None:
        p.state_dir.mkdir(parents=True)
        (p.state_dir / "client.json").write_text(json.dumps(legacy))

    d = env.daemon(prepare=old_state)
    d.expected_errors |= {"check.failed"}  # the refusals this test provokes
    doc = client_json(d)
    assert doc["client_id"] == legacy["client_id"] and "manifest_serial" not in doc
    assert doc["channels"] == {"stable": {"manifest_serial": 5, "manifest_sha256": "0" * 64,
                                          "validators": {"etag": '"x"'}}}
    error = refused(d, "CheckNow")
    assert "manifest serial 3 is lower than the accepted 5" in error.parameters["reason"]

    beta = channel_publisher(env, "beta")
    beta.publish(env.patch(2))
    switch_channel(d, env, beta)
    d.call("CheckNow")
    d.wait_status(lambda s: s["next_boot"] == b(2) and s["activity"]["phase"] == "idle",
                  "beta's patch 2 installed")
    channels = client_json(d)["channels"]
    assert (channels["stable"]["manifest_serial"], channels["beta"]["manifest_serial"]) == (5, 1)


# --- items 3 and 4: hold and unhold ------------------------------------------------------


def test_a_held_host_checks_but_installs_nothing_until_unhold(env: Env) -> None:
    """hold --reason: a newer patch is decided but not downloaded and a server rollback
    of the held build is not applied, across a restart; status (CLI and GetStatus),
    STATUS= and the journal show the hold; unhold installs."""
    env.publisher.publish(env.patch(1))
    d = env.daemon()
    d.check_and_wait()
    out = ok(patchd(d, "hold", "--reason", "trade show until Friday"))
    assert out.startswith("held since ") and out.endswith(
        ": trade show until Friday; checks go on, nothing is installed until patchd unhold\n")
    hold = d.status()["hold"]
    assert hold["reason"] == "trade show until Friday"
    held_line = f"held since {hold['since']}: trade show until Friday"
    d.wait_notify(f"STATUS={held_line}; idle; next boot {R}+1")
    assert [r["reason"] for r in log_events(d, "hold.placed")] == ["trade show until Friday"]

    env.publisher.publish(env.patch(2))
    assert d.call("CheckNow") == {"strategy": "patch", "build": b(2), "held": True}
    assert ok(patchd(d, "check")) == (
        "held: patch update to 1.4.0+2 not installed (patchd unhold lifts the hold)\n")
    assert [r["build"] for r in log_events(d, "check.held")] == [f"{R}+2"] * 2
    status = d.status()
    assert status["next_boot"] == b(1) and state_of(status, R, 2) is None
    assert not list((d.cache_dir / "downloads").iterdir())
    assert not log_events(d, "update.held")  # no update was even started
    env.publisher.roll_back(R, 1)  # the server withdraws what the host is held on: kept
    assert d.call("CheckNow")["held"] is True
    assert state_of(d.status(), R, 1) == "installed" and d.status()["next_boot"] == b(1)
    assert [r["patch"] for r in log_events(d, "update.rollback_held")] == [1]

    d.stop()
    d.start()
    assert d.status()["hold"] == hold
    assert log_events(d, "hold.active")
    assert d.call("CheckNow")["held"] is True
    text = ok(patchd(d, "status"))
    assert f"  hold:         {held_line} (patchd unhold lifts it)\n" in text
    assert state_of(d.status(), R, 2) is None

    assert ok(patchd(d, "unhold")) == f"hold lifted (was {held_line})\n"
    assert ok(patchd(d, "unhold")) == "not held\n"
    assert d.status()["hold"] is None and not (d.state_dir / "hold.json").exists()
    assert d.check_and_wait() == {"strategy": "patch", "build": b(2)}
    d.wait_status(lambda s: s["next_boot"] == b(2), "patch 2 installed after unhold")
    types = [(e["type"], e["message"]) for e in events(d) if e["type"] in ("hold", "unhold")]
    assert types == [("hold", "trade show until Friday"), ("unhold", "trade show until Friday")]
    no_errors_logged(d)


def test_a_hold_stops_a_download_under_way_and_keeps_its_bytes(http_env: Env) -> None:
    """hold while a rate-limited download runs: the update stops at once (idle), the
    partial file stays; after unhold the next check resumes and installs it."""
    env = http_env
    env.publisher.publish(env.patch(1, {"data/blob": os.urandom(1_200_000)}))
    d = env.daemon('[install]\nmax_download_rate = "400KB"\n')
    d.call("CheckNow")
    d.wait_status(lambda s: s["activity"]["phase"] == "downloading"
                  and s["activity"]["done"] > 100_000, "download under way")
    d.call("Hold", {"reason": "not now"})
    status = d.wait_status(lambda s: s["activity"]["phase"] == "idle", "update stopped")
    assert state_of(status, R, 1) == "downloading"
    kept = (d.cache_dir / "downloads" / f"{R}-1.patchd").stat().st_size
    assert kept > 100_000
    assert d.call("CheckNow")["held"] is True
    assert d.status()["activity"]["phase"] == "idle"
    assert d.call("Unhold")["lifted"]["reason"] == "not now"
    d.check_and_wait()
    d.wait_status(lambda s: s["next_boot"] == b(1), "patch 1 installed after unhold")
    resumed = [r for r in log_events(d, "update.start") if r.get("action") == "resume"]
    assert resumed, "the kept bytes were not resumed"


# --- item 3: unmark --------------------------------------------------------------------


@needs_root
def test_unmark_lifts_a_tombstone_for_admins_only(env: Env) -> None:
    """A build rolled back by hand stays out; a non-admin may not unmark it (NotAuthorized);
    root's unmark is logged with its uid, queued as an event, and the next check installs
    the build again; unmarking a build that is not bad says so."""
    env.publisher.publish(env.patch(1))
    d = env.daemon('[api]\nsocket_group = "nogroup"\n', prepare=shared_socket)
    d.check_and_wait()
    assert ok(patchd(d, "rollback")) == "rolled back; next boot is 1.4.0+0\n"
    assert d.call("CheckNow")["strategy"] == "none"  # the tombstone keeps it out

    nobody = as_user("nobody", d, [("Unmark", {"build": b(1)}), ("Hold", {}), ("Unhold", {})])
    assert nobody == [denied("Unmark"), denied("Hold"), denied("Unhold")]
    assert state_of(d.status(), R, 1) == "bad"

    assert ok(patchd(d, "unmark", f"{R}+1")) == (
        "tombstone of 1.4.0+1 lifted; the next check may install it\n")
    assert state_of(d.status(), R, 1) is None
    unmarked = log_events(d, "lifecycle.unmarked")
    assert [(r["build"], r["reason"]) for r in unmarked] == [(f"{R}+1", "manual")]
    calls = [r["uid"] for r in log_events(d, "api.admin_call")
             if r["method"] == f"{UPDATER}.Unmark"]
    assert calls == [0]
    event = [e for e in events(d) if e["type"] == "unmark"]
    assert [(e["release"], e["patch"]) for e in event] == [(R, 1)]
    assert event[0]["message"] == ("tombstone lifted by an operator "
                                   "(was manual: rolled back by an operator)")

    assert d.check_and_wait()["build"] == b(1)
    d.wait_status(lambda s: s["next_boot"] == b(1) and state_of(s, R, 1) == "installed",
                  "patch 1 installed again")
    assert one_line_error(patchd(d, "unmark", f"{R}+1")) == (
        "patchd: 1.4.0+1 is not marked bad (it is installed); there is no tombstone to lift")
    assert one_line_error(patchd(d, "unmark", f"{R}+9")) == (
        "patchd: 1.4.0+9 is not marked bad (this host has no state for it); "
        "there is no tombstone to lift")
    no_errors_logged(d)


# --- item 4: install of an older build ------------------------------------------------------


def test_installing_an_older_build_needs_hold_and_the_hold_keeps_it(env: Env) -> None:
    """1.4.0+3 installed by a check; installing 1.4.0+2 by hand is refused (the next
    check would go back), --hold installs it and holds the host; the next check keeps
    it, even after a restart."""
    env.publisher.publish(env.patch(3))
    d = env.daemon()
    d.check_and_wait()
    assert d.status()["next_boot"] == b(3)
    bundle = str(env.patch(2))
    assert one_line_error(patchd(d, "install", bundle)) == (
        "patchd: refused: 1.4.0+2 is older than 1.4.0+3, which this host would go back to at its "
        "next check; install with --hold to keep it on 1.4.0+2")
    status = d.status()
    assert status["next_boot"] == b(3) and state_of(status, R, 2) is None
    assert status["hold"] is None and status["last_error"] is None
    assert [r["level"] for r in log_events(d, "install.downgrade_refused")] == ["warning"]

    assert ok(patchd(d, "install", "--hold", bundle)) == (
        "installed 1.4.0+2; it boots at the next start; the host is held on it "
        "(patchd unhold lifts it)\n")
    status = d.status()
    assert status["next_boot"] == b(2)
    assert status["hold"]["reason"] == "installed 1.4.0+2 with install --hold"
    assert d.call("CheckNow") == {"strategy": "patch", "build": b(3), "held": True}
    d.stop()
    d.start()
    assert d.call("CheckNow")["held"] is True
    assert d.status()["next_boot"] == b(2)
    no_errors_logged(d)


def test_the_last_manifest_also_counts_and_a_failed_held_install_lifts_its_hold(
        env: Env) -> None:
    """With next boot 1.4.0+0 and the last manifest offering 1.4.0+3, installing 1.4.0+2
    is refused naming 1.4.0+3 (a check would move on to it); an --hold install of a bad
    bundle is refused and leaves the host unheld; a good one holds it."""
    env.publisher.publish(env.patch(3))
    d = env.daemon()
    d.expected_errors |= {"check.failed", "signature_invalid"}  # the refusals this test provokes
    d.call("Hold")
    assert d.call("CheckNow") == {"strategy": "patch", "build": b(3), "held": True}
    assert d.call("Unhold")["lifted"]["reason"] == ""
    error = refused(d, "Install", {"path": str(env.patch(2))})
    assert error.name == f"{UPDATER}.DowngradeRefused"
    assert error.parameters == {"build": b(2), "newer": b(3)}

    (env.tmp / "foreign").mkdir()
    foreign = Publisher(env.tmp / "foreign", env.tmp / "foreign-repo")  # an untrusted key
    untrusted = foreign.bundle(R, 2, env.release_dir, env.tree({"x": "y"}))
    error = refused(d, "Install", {"path": str(untrusted), "hold": True})
    assert error.name == f"{UPDATER}.InvalidBundle"  # found while installing: held first
    assert d.status()["hold"] is None and not (d.state_dir / "hold.json").exists()
    assert d.call("Install", {"path": str(env.patch(2)), "hold": True}) == {"build": b(2)}
    status = d.status()
    assert status["next_boot"] == b(2) and status["hold"] is not None
    assert [e["type"] for e in events(d) if e["type"] in ("hold", "unhold")] == [
        "hold", "unhold", "hold", "unhold", "hold"]


# --- the state files themselves --------------------------------------------------------------


def test_client_json_forms(tmp_path: Path) -> None:
    """The per-channel form round-trips; the old form becomes the given channel's record
    and is rewritten at once; records of the wrong shape are dropped, not fatal."""
    layout = Layout(tmp_path, tmp_path / "cache")
    layout.client.write_text(json.dumps({"client_id": "c1", "manifest_serial": 7,
                                         "manifest_sha256": "ab" * 32, "validators": {}}))
    state = load_client_state(layout, "beta")
    assert state.channel("beta") == Accepted(7, "ab" * 32, {})
    assert state.channel("stable") == Accepted()
    assert json.loads(layout.client.read_text()) == {"client_id": "c1", "channels": {
        "beta": {"manifest_serial": 7, "manifest_sha256": "ab" * 32, "validators": {}}}}

    state = accepted(state, "stable", 3, "cd" * 32, {"etag": '"e"'})
    save_client_state(layout, state)
    again = load_client_state(layout, "whatever")
    assert again == state and again.channel("beta").serial == 7

    layout.client.write_text(json.dumps({"client_id": "c1", "channels": {
        "beta": "junk", "stable": {"manifest_serial": True, "validators": {"etag": 1}}}}))
    assert load_client_state(layout, "beta") == ClientState("c1", {"stable": Accepted()})


def test_a_damaged_hold_file_still_holds(tmp_path: Path) -> None:
    """hold.json that does not parse counts as held (never as "install everything")."""
    layout = Layout(tmp_path, tmp_path / "cache")
    assert read_hold(layout) is None
    write_hold(layout, Hold("r", "2025-06-02T09:15:12Z"))
    assert read_hold(layout) == Hold("r", "2025-06-02T09:15:12Z")
    layout.hold.write_text("{not json")
    damaged = read_hold(layout)
    assert damaged is not None and "unreadable" in damaged.reason
    remove_hold(layout)
    assert read_hold(layout) is None and not layout.hold.exists()
