"""A real daemon behind a real nginx follows a key rotation through the root chain,
keeps polls cheap, and refuses a revoked key and a frozen (replayed) repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.publisher import roots
from patchd.publisher.signer import CommandSigner
from patchd.trust.signing import generate_key, load_private_key, sign_document
from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess, Publisher, state_of, write_tree
from support.hostile import log_events
from support.nginx import NGINX, run_nginx

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx not installed")]

SIGN_CMD = Path(__file__).parent / "support" / "sign_cmd.py"


def replace_manifest(repo: Path, data: bytes) -> None:
    """Write the manifest with a later mtime: nginx's ETag is mtime and size, so a
    same-size rewrite within the same second would otherwise answer 304."""
    path = repo / "manifest.json"
    later = path.stat().st_mtime + 10
    path.write_bytes(data)
    os.utime(path, (later, later))


def refused_check(d: DaemonProcess, error_class: str) -> None:
    """CheckNow fails with ``error_class`` (in the reply and the log); nothing installs."""
    with pytest.raises(VarlinkError) as info:
        d.call("CheckNow")
    assert error_class in json.dumps(info.value.parameters) or error_class in d.log()
    assert any(r.get("error_class") == error_class for r in log_events(d))


def test_daemon_follows_rotation_and_refuses_revoked_key_and_freeze(tmp_path: Path) -> None:
    """Root 1 is the config's key; root 2 (offline root key via --sign-cmd, new updates
    key) is walked once, polls stay one request, and a manifest signed by the revoked
    key or a replayed pre-rotation repository is refused with the accepted root kept."""
    release = write_tree(tmp_path / "opt", {"a.txt": "a"}, version="1.0")
    repo_dir = tmp_path / "repo"
    pub = Publisher(tmp_path, repo_dir)
    now = datetime.now(UTC)
    roots.create(repo_dir, root_keys=[pub.public], root_threshold=None,
                 updates_keys=[pub.public], updates_threshold=None,
                 expires=timedelta(days=365), signers=[pub.key], now=now)
    pub.publish(pub.bundle("1.0", 1, release, write_tree(tmp_path / "t1", {"a.txt": "b"},
                                                          version="1.0")))
    frozen = {n: (repo_dir / n).read_bytes() for n in ("manifest.json", "manifest.json.sig")}

    with run_nginx(repo_dir, tmp_path / "nginx") as nginx:
        d = DaemonProcess(tmp_path / "d", manifest_url=nginx.url("manifest.json"),
                          keys=[pub.public], release_dir=release)
        d.expected_errors.add("check.failed")  # the revoked key and the freeze below
        try:
            d.start()
            d.check_and_wait()
            assert state_of(d.status(), "1.0", 1) == "installed"

            # Rotation: the root key moves offline (a separate signing process), the
            # updates key is replaced; the old root key vouches for the new root.
            offline = tmp_path / "offline-root.key"
            offline_public = generate_key(offline)
            new_updates = tmp_path / "updates-2.key"
            new_public = generate_key(new_updates)
            status = roots.create(
                repo_dir, root_keys=[offline_public], root_threshold=None,
                updates_keys=[new_public], updates_threshold=None,
                expires=timedelta(days=365), now=now,
                signers=[pub.key, CommandSigner(f"{sys.executable} {SIGN_CMD} {offline}")])
            assert status.complete
            old_key, pub.key = pub.key, load_private_key(new_updates)
            pub.publish(pub.bundle("1.0", 2, release, write_tree(
                tmp_path / "t2", {"a.txt": "c"}, version="1.0")))
            d.check_and_wait()
            assert state_of(d.status(), "1.0", 2) == "installed"
            accepted = (d.state_dir / "root.json").read_bytes()
            assert json.loads(accepted)["version"] == 2

            before = len(nginx.barrier())
            d.check_and_wait()  # unchanged: one conditional GET, no root fetched
            poll = [(r.path, r.status) for r in nginx.barrier()[before:]
                    if not r.path.startswith("/.barrier")]
            assert poll == [("/manifest.json", 304)]
            assert sum(r.path == "/root/2.json" for r in nginx.requests()) == 1

            # A real change (an unchanged file is only `config.unchanged` since the
            # one-reload-per-change rule): the transport must survive the reload.
            d.config_path.write_text(d.config_path.read_text().replace(
                'poll_interval = "1h"', 'poll_interval = "2h"'))
            d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            d.wait_log("config.reloaded")
            d.check_and_wait()
            assert d.log().count("http.client_built") == 1  # reused across the reload
            assert not [r for r in log_events(d) if r.get("level") == "error"]

            # A thief of the old updates key signs a newer manifest: revoked.
            doc = json.loads((repo_dir / "manifest.json").read_bytes())
            doc["serial"] += 1
            data = (json.dumps(doc, indent=2) + "\n").encode()
            (repo_dir / "manifest.json.sig").write_bytes(sign_document(data, [old_key]))
            replace_manifest(repo_dir, data)
            refused_check(d, "ManifestKeyRevoked")

            # Freeze: the whole pre-rotation repository replayed (root 1, old manifest).
            (repo_dir / "manifest.json.sig").write_bytes(frozen["manifest.json.sig"])
            replace_manifest(repo_dir, frozen["manifest.json"])
            refused_check(d, "ManifestRootRollback")
            assert (d.state_dir / "root.json").read_bytes() == accepted
            assert state_of(d.status(), "1.0", 2) == "installed"
        finally:
            d.close()


def test_config_check_validates_transport_keys(tmp_path: Path) -> None:
    """config check refuses what run would: a world-readable headers file, a lone cert."""
    headers = tmp_path / "headers"
    headers.write_text("Authorization: Bearer x\n")
    headers.chmod(0o644)
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "VERSION").write_text("1.4.0\n")  # `config check` checks the release too
    config = tmp_path / "kiosk.toml"
    config.write_text(f"""
[app]
name = "kiosk"
release_dir = "{tmp_path}"
[server]
manifest_url = "https://updates.example.com/kiosk/manifest.json"
headers_file = "{headers}"
client_cert = "{cert}"
[trust]
keys = ["ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="]
""")
    done = subprocess.run([sys.executable, "-m", "patchd", "config", "check", str(config)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "server.headers_file:" in done.stderr and "readable by group or others" in done.stderr
    assert "client_cert and client_key go together" in done.stderr
    headers.chmod(0o600)
    (tmp_path / "key.pem").write_text("x")
    config.write_text(config.read_text().replace(
        f'client_cert = "{cert}"\n', ""))
    done = subprocess.run([sys.executable, "-m", "patchd", "config", "check", str(config)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Bearer" not in done.stdout and f'headers_file = "{headers}"' in done.stdout
