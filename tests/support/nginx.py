"""A real nginx on 127.0.0.1 serving a temp directory: the static repository of docs/formats.md

Use the fixture ``nginx_repo`` (import it into a test module, or list this module in
``pytest_plugins``); it yields an :class:`NginxRepo` that unpacks as
``(root, base_url)`` and also reads nginx's access log, so a test can prove which
requests were (not) made. No root needed: nginx runs with its own prefix, config,
pid and log files under the temp directory. Skipped, with the reason shown, only
where ``/usr/sbin/nginx`` is missing. ``run_nginx(root, workdir)`` is the same
without pytest, for bench/.

``run_nginx(..., tls=NginxTls(...))`` serves HTTPS instead (optionally requiring a
client certificate), and ``location`` adds directives to the one ``location /``
(e.g. a bearer-token check); the access log then also names each request's
connection, so a test counts TCP connections (= TLS handshakes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NGINX = os.environ.get("PATCHD_NGINX", "/usr/sbin/nginx")

_LOG_RE = re.compile(r'^(\S+) (\S+) (\d+) (\d+) "([^"]*)" "([^"]*)" "([^"]*)"(?: (\d+))?$')

#: The access log's format, quoted for nginx: what :meth:`NginxRepo.requests` parses.
LOG_FORMAT = ("'$request_method $uri $status $body_bytes_sent "
              '"$http_range" "$http_if_range" "$http_if_none_match" $connection\'')

_CONF = """\
{user}worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    default_type application/octet-stream;
    log_format patchd {log_format};
    access_log {work}/access.log patchd;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port}{ssl};
{tls}        root {root};
        location / {{ {location} }}
    }}
}}
"""


@dataclass(frozen=True)
class NginxTls:
    """HTTPS for :func:`run_nginx`: the server's PEM chain and key; with ``client_ca``,
    a client certificate signed by that CA is required (``ssl_verify_client on``)."""

    cert_chain: Path
    key: Path
    client_ca: Path | None = None
    #: What the test's own barrier connection shows when a client certificate is needed.
    client_cert: Path | None = None
    client_key: Path | None = None

    def directives(self) -> str:
        lines = [f"ssl_certificate {self.cert_chain};", f"ssl_certificate_key {self.key};"]
        if self.client_ca is not None:
            lines += [f"ssl_client_certificate {self.client_ca};", "ssl_verify_client on;"]
        return "".join(f"        {line}\n" for line in lines)

    def barrier_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx



@dataclass(frozen=True)
class LogLine:
    """One access-log entry."""

    method: str
    path: str
    status: int
    body_bytes: int
    range: str
    if_range: str
    if_none_match: str
    connection: int = 0


@dataclass
class NginxRepo:
    """A running nginx; unpacks as ``(root, base_url)``."""

    root: Path
    base_url: str
    access_log: Path
    process: subprocess.Popen[bytes]
    tls: NginxTls | None = None

    def __iter__(self) -> Iterator[object]:
        return iter((self.root, self.base_url))

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def requests(self) -> list[LogLine]:
        """Parsed access log so far (nginx writes each line after the response)."""
        out = []
        for line in self.access_log.read_text().splitlines():
            m = _LOG_RE.match(line)
            if m is None:
                raise AssertionError(f"unexpected access log line: {line!r}")
            method, path, status, sent, *quoted, conn = m.groups()
            rng, if_range, inm = ("" if q == "-" else q.replace("\\x22", '"') for q in quoted)
            out.append(LogLine(method, path, int(status), int(sent), rng, if_range, inm,
                               int(conn or 0)))
        return out

    def wait_for_request(self, path: str, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` requests for ``path`` are logged (nginx logs after
        sending, so a client may see the reply before the line exists)."""
        deadline = time.monotonic() + timeout
        while sum(r.path == path for r in self.requests()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx never logged {count}× {path}: {self.requests()}")
            time.sleep(0.01)

    def barrier(self) -> list[LogLine]:
        """Make a marker request and wait for it: every earlier request is then logged."""
        marker = f"/.barrier-{time.monotonic_ns()}"
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), timeout=5))
            if self.tls is not None:
                s = stack.enter_context(self.tls.barrier_context().wrap_socket(s))
            s.sendall(f"GET {marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while s.recv(65536):
                pass
        self.wait_for_request(marker)
        lines = self.requests()
        return lines[: next(i for i, r in enumerate(lines) if r.path == marker)]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def run_nginx(root: Path, work: Path, tls: NginxTls | None = None,
              location: str = "", *, prefix: list[str] | None = None,
              log_format: str = LOG_FORMAT,
              worker_connections: int = 256) -> Iterator[NginxRepo]:
    """Start nginx serving ``root`` with its files under ``work``; stop it after.

    For bench/: ``prefix`` goes before the nginx command (e.g. ``nice -n 19``, so the
    server does not compete with what is measured), ``log_format`` replaces the access
    log's format (nginx syntax, quoted; :meth:`NginxRepo.requests` then cannot parse
    the log and the caller reads ``access_log`` itself) and ``worker_connections``
    makes room for a fleet of daemons.
    """
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):  # a free port may be taken between probe and bind
        port = _free_port()
        conf = work / "nginx.conf"
        # As root, nginx's workers would drop to "nobody" and be refused the 0700 temp dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(_CONF.format(user=user, work=work, root=root.resolve(), port=port,
                                     ssl=" ssl" if tls else "",
                                     tls=tls.directives() if tls else "", location=location,
                                     log_format=log_format,
                                     worker_connections=worker_connections))
        (work / "access.log").touch()
        proc = subprocess.Popen(
            [*(prefix or []), NGINX, "-p", str(work), "-e", str(work / "error.log"),
             "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if _wait_listening(proc, port, timeout=10.0):
            break
        proc.kill()
        _, err = proc.communicate()
        last_error = err.decode(errors="replace")
    else:
        raise RuntimeError(f"nginx did not start: {last_error}")
    try:
        scheme = "https" if tls else "http"
        yield NginxRepo(root, f"{scheme}://127.0.0.1:{port}", work / "access.log", proc, tls)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def nginx_repo(tmp_path: Path) -> Iterator[NginxRepo]:
    """A real nginx on 127.0.0.1 serving ``tmp_path/repo``."""
    if not Path(NGINX).exists() or shutil.which(NGINX) is None:
        pytest.skip(f"nginx not installed at {NGINX} (CI installs it)")
    root = tmp_path / "repo"
    root.mkdir()
    with run_nginx(root, tmp_path / "nginx") as repo:
        yield repo
