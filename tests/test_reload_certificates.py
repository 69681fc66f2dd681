"""A reload picks up certificate files renewed in place.

Renewal tools (certbot, step-ca, a configuration manager) rewrite the CA bundle or the
client certificate at the same path and then run ``systemctl reload``: the config file
is unchanged, yet the daemon must build its repository client from the new files.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from patchd.varlink import VarlinkError
from support.daemon import DaemonProcess
from support.env import Env, nginx_env
from support.nginx import NGINX, NginxRepo, NginxTls, run_nginx


@pytest.fixture
def https_repo(tmp_path: Path) -> Iterator[tuple[NginxRepo, trustme.CA]]:
    """A real nginx serving ``tmp_path/repo`` over HTTPS with a certificate of its CA."""
    if shutil.which(NGINX) is None:
        pytest.skip(f"nginx not installed at {NGINX} (CI installs it)")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    root = tmp_path / "repo"
    root.mkdir()
    tls = NginxTls(cert_chain=tmp_path / "server.pem", key=tmp_path / "server.pem")
    with run_nginx(root, tmp_path / "nginx", tls=tls) as repo:
        yield repo, ca


def reloads(d: DaemonProcess) -> list[dict[str, object]]:
    """The daemon's ``config.reloaded`` and ``config.unchanged`` log entries."""
    entries = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("event") in ("config.reloaded", "config.unchanged")]


def sighup(d: DaemonProcess) -> None:
    mark = len(d.notifications)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("READY=1", after=d.wait_notify("RELOADING=1", after=mark))


def test_a_ca_file_renewed_in_place_is_used_after_a_reload(
        tmp_path: Path, https_repo: tuple[NginxRepo, trustme.CA]) -> None:
    nginx, server_ca = https_repo
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # not the server's CA (yet)
    env: Env
    with nginx_env(tmp_path / "host", nginx) as env:
        env.publisher.publish(env.patch(1))
        d = env.daemon(extra=f'[server]\nca_file = "{ca_file}"\n')
        d.expected_errors.add("check.failed")  # the first check: the server is unknown
        with pytest.raises(VarlinkError) as refused:
            d.call("CheckNow")
        assert "TLS failure" in refused.value.parameters["reason"], refused.value.parameters

        server_ca.cert_pem.write_to_path(str(ca_file))  # the renewal: same path
        sighup(d)
        assert d.check_and_wait()["strategy"] == "patch"
        assert d.status()["next_boot"] == {"release": "1.4.0", "patch": 1}
        assert [(e["event"], e.get("transport_changed")) for e in reloads(d)] == [
            ("config.reloaded", True)]


def test_a_reload_with_untouched_certificates_changes_nothing(
        tmp_path: Path, https_repo: tuple[NginxRepo, trustme.CA]) -> None:
    nginx, server_ca = https_repo
    ca_file = tmp_path / "ca.pem"
    server_ca.cert_pem.write_to_path(str(ca_file))
    with nginx_env(tmp_path / "host", nginx) as env:
        env.publisher.publish(env.patch(1))
        d = env.daemon(extra=f'[server]\nca_file = "{ca_file}"\n')
        assert d.check_and_wait()["strategy"] == "patch"
        sighup(d)
        assert [e["event"] for e in reloads(d)] == ["config.unchanged"]
