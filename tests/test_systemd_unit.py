"""The systemd unit and the sysusers snippet (docs/lifecycle.md).

`systemd-analyze verify` and `systemd-analyze security --offline=true` run on the real
unit file; the tests skip, saying so, only where those programs are absent. systemd
need not be running (PID 1 is not systemd in CI containers): both verbs work on files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from patchd.config import config_from_dict

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "patchd@.service"
SYSUSERS = REPO / "systemd" / "patchd.sysusers.conf"
EXEC = "/usr/bin/patchd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every assignment in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(key: str) -> str:
    values = service()[key]
    assert len(values) == 1, f"{key} set {len(values)} times: {values}"
    return values[0]


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit with /usr/bin/patchd replaced by an executable that exists here.

    verify checks that ExecStart's program exists, and the package is not installed
    in the test environment; everything else in the file is verified unchanged.
    """
    script = Path(sys.executable).parent / "patchd"
    program = script if script.exists() else Path(sys.executable)
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    target = tmp_path / UNIT.name
    target.write_text(text.replace(EXEC, str(program)))
    return target


def test_unit_has_the_spec_settings() -> None:
    """The unit has the documented type, watchdog, restart, reload, command and directories."""
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30s"
    assert one("Restart") == "on-failure"
    assert one("ExecStart") == "/usr/bin/patchd run --config /etc/patchd/%i.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("StateDirectory") == "patchd/%i"
    assert one("CacheDirectory") == "patchd/%i"
    assert one("RuntimeDirectory") == "patchd"
    assert one("ConfigurationDirectory") == "patchd"
    assert one("SyslogIdentifier") == "patchd"
    assert one("User") == "patchd"
    assert one("Group") == "patchd"


def test_unit_is_gentle_on_the_host() -> None:
    """patchd yields CPU and disk to the app and has a memory ceiling well above its
    measured peak (bench/bench_gentle.py: about 64 MiB through a 1 GiB update)."""
    assert one("Nice") == "19"
    assert one("CPUWeight") == "1"
    assert one("IOWeight") == "20"
    assert one("IOSchedulingClass") == "best-effort"
    assert one("IOSchedulingPriority") == "7"
    assert one("MemoryMax") == "256M"


def test_shared_runtime_directory_survives_one_instance_stopping() -> None:
    """/run/patchd is preserved, so stopping patchd@a cannot delete patchd@b's socket."""
    assert one("RuntimeDirectoryPreserve") == "yes"
    assert one("RuntimeDirectoryMode") == "0755"


def test_sandbox_keeps_what_the_daemon_needs() -> None:
    """Peers' credentials, the app's /proc entry, network and home dirs stay reachable."""
    svc = service()
    assert svc.get("PrivateUsers", ["no"]) == ["no"], "SO_PEERCRED and chown need real ids"
    assert one("ProtectProc") == "default", "hidepid would hide the app's /proc/PID"
    assert "ProcSubset" not in svc
    assert "PrivateNetwork" not in svc and "IPAddressDeny" not in svc
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one("ProtectHome") == "read-only", "release_dir may be under /home"
    assert one("ProtectSystem") == "strict"
    assert one("StateDirectoryMode") == "0755", "the app boots trees from the state dir"
    assert one("UMask") == "0022"
    assert one("CapabilityBoundingSet") == ""


def test_unit_directories_match_the_config_defaults() -> None:
    """A config without [paths] points at exactly the directories the unit creates."""
    doc = tomllib.loads((REPO / "config.example.toml").read_text())
    doc.pop("paths", None)
    doc["app"]["name"] = "kiosk"
    paths = config_from_dict(doc).paths
    assert paths.state_dir == Path("/var/lib") / one("StateDirectory").replace("%i", "kiosk")
    assert paths.cache_dir == Path("/var/cache") / one("CacheDirectory").replace("%i", "kiosk")
    assert paths.socket == Path("/run") / one("RuntimeDirectory") / "kiosk.sock"
    exec_start = one("ExecStart").replace("%i", "kiosk")
    assert exec_start.endswith(f"/etc/{one('ConfigurationDirectory')}/kiosk.toml")


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the template and an instance without a word."""
    unit = verifiable_copy(tmp_path)
    for target in (str(unit), "patchd@kiosk.service"):
        result = subprocess.run(
            [ANALYZE, "verify", target], cwd=tmp_path, capture_output=True, text=True
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), target


@needs_analyze
def test_verify_catches_a_missing_program(tmp_path: Path) -> None:
    """verify really checks the file: the unchanged unit fails only on the absent program."""
    if Path(EXEC).exists():
        pytest.skip(f"{EXEC} is installed here, so the unchanged unit verifies")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    result = subprocess.run(
        [ANALYZE, "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"Command {EXEC} is not executable" in result.stderr


@cache
def exposure_line(unit: Path) -> tuple[int, str]:
    """(exit status with --threshold=20, the final 'Overall exposure level' line)."""
    threshold = str(round(MAX_EXPOSURE * 10))
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", f"--threshold={threshold}", str(unit)],
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert lines, result.stdout + result.stderr
    return result.returncode, lines[-1]


@needs_analyze
def test_security_exposure_is_at_most_2_0() -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or lower."""
    returncode, line = exposure_line(UNIT)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", line)
    assert match is not None, line
    assert float(match.group(1)) <= MAX_EXPOSURE, line
    assert returncode == 0, line


@needs_analyze
def test_threshold_rejects_an_unsandboxed_unit(tmp_path: Path) -> None:
    """The threshold check is not vacuous: the same service without a sandbox fails it."""
    plain = tmp_path / "plain@.service"
    plain.write_text("[Service]\nType=notify\nExecStart=/usr/bin/true\n")
    returncode, line = exposure_line(plain)
    assert returncode != 0, line


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own syscall groups, parsed from `systemd-analyze syscall-filter`."""
    out = subprocess.run(
        [ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups[name], groups) if name.startswith("@") else {name}
    return out


@needs_analyze
def test_syscall_filter_allows_the_daemons_calls() -> None:
    """The effective allow-list has every call the daemon makes and none of the dangerous."""
    groups = syscall_groups()
    allowed = expand(["@default"], groups)  # always permitted in allow-list mode
    for i, line in enumerate(service()["SystemCallFilter"]):
        deny = line.startswith("~")
        names = expand(line.lstrip("~").split(), groups)
        assert i > 0 or not deny, "the first line must make it an allow-list"
        allowed = allowed - names if deny else allowed | names
    needed = {
        # socket server, peer credentials, notify/journal datagrams, HTTP client
        "socket",
        "bind",
        "listen",
        "accept4",
        "connect",
        "getsockopt",
        "setsockopt",
        "sendmsg",
        "recvmsg",
        "sendto",
        "recvfrom",
        "shutdown",
        # socket mode and group; atomic durable writes; tree cloning
        "fchmodat",
        "chmod",
        "chown",
        "fchownat",
        "openat",
        "renameat2",
        "rename",
        "fsync",
        "fdatasync",
        "linkat",
        "symlinkat",
        "unlinkat",
        "mkdirat",
        "getdents64",
        "statx",
        "ioctl",
        "copy_file_range",
        "fstatfs",
        "statfs",
        "utimensat",
        # watching the booting app; config watcher; event loop and worker threads
        "pidfd_open",
        "poll",
        "inotify_init1",
        "inotify_add_watch",
        "epoll_wait",
        "epoll_ctl",
        "eventfd2",
        "clone3",
        "futex",
        "getrandom",
        "pipe2",
        # ExecReload runs /bin/kill inside the same sandbox
        "execve",
        "kill",
    }
    assert needed - allowed == set()
    forbidden = {
        "mount",
        "ptrace",
        "setuid",
        "reboot",
        "init_module",
        "bpf",
        "swapon",
        "settimeofday",
        "setrlimit",
        "sched_setaffinity",
    }
    assert forbidden & allowed == set()


def test_sysusers_snippet_declares_the_patchd_user() -> None:
    """The snippet has one `u patchd` line: a system user with its same-named group."""
    lines = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [line[:3] for line in lines] == [["u", "patchd", "-"]]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed"
)
def test_sysusers_would_create_the_user_and_group(tmp_path: Path) -> None:
    """systemd-sysusers, run on an empty root, would create the patchd group and user."""
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )
    assert result.returncode == 0, result.stderr
    assert "Creating group 'patchd'" in result.stderr
    assert "Creating user 'patchd'" in result.stderr
    assert list((tmp_path / "etc").iterdir()) == []  # dry run: nothing written


def namespace_prefix() -> list[str] | None:
    """`unshare` arguments for a private mount namespace, or None where not allowed."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_clone_into_the_sandboxed_state_dir(tmp_path: Path) -> None:
    """Cloning release_dir into a bind-mounted state dir (as the unit has it) succeeds."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -r -m not permitted)")
    release, state = tmp_path / "release", tmp_path / "state"
    release.mkdir()
    state.mkdir()
    (release / "VERSION").write_text("1.0\n")
    # StateDirectory= under ProtectSystem=strict is a separate (writable) bind mount:
    # same st_dev as release_dir, but a different mount.
    script = (
        f"mount --bind {state} {state} && exec {sys.executable} -c "
        f"'from patchd.build.clone import clone_tree; from pathlib import Path; "
        f'print(clone_tree(Path("{release}"), Path("{state}/tree")))\''
    )
    result = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (state / "tree" / "VERSION").read_text() == "1.0\n"
    assert result.stdout.strip().splitlines()[-1] == "copy"  # no hardlink across mounts
