"""Config loading (docs/config.md): defaults, parsing, and one clear line per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchd.config import load_config, parse_duration, parse_size
from patchd.core.errors import ConfigErrors, ConfigFileError
from support.cli import ROOT, run_patchd

KEY = "ed25519:QcP1ZFkCBLyq3sl8nNs7vgLZJtGF6Lq/8zi/1mO3fH8="
KEY2 = "ed25519:" + "A" * 43 + "="

MINIMAL = f"""
[app]
name = "kiosk"
release_dir = "/opt/kiosk"

[server]
manifest_url = "https://updates.example.com/kiosk/stable/manifest.json"

[trust]
keys = ["{KEY}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiosk.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    """The shipped, commented config.example.toml is valid."""
    config = load_config(ROOT / "config.example.toml")
    assert config.app.name == "kiosk"
    assert config.install.min_free == 200_000_000


def test_defaults_derive_from_app_name(tmp_path: Path) -> None:
    """Paths, socket group and boot reporters default from app.name; durations in seconds."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.paths.state_dir == Path("/var/lib/patchd/kiosk")
    assert config.paths.cache_dir == Path("/var/cache/patchd/kiosk")
    assert config.paths.socket == Path("/run/patchd/kiosk.sock")
    assert config.api.socket_group == "kiosk"
    assert config.boot.reporters == ("kiosk",)
    assert config.server.poll_interval == 3600.0
    assert config.server.channel == "stable"
    assert config.trust.raw_keys[0] and len(config.trust.raw_keys[0]) == 32
    assert config.app.arch != "auto"


def test_local_paths_and_file_urls_accepted(tmp_path: Path) -> None:
    """A plain absolute path and file:// are valid manifest locations."""
    for url in ("/srv/repo/manifest.json", "file:///srv/repo/manifest.json"):
        text = MINIMAL.replace("https://updates.example.com/kiosk/stable/manifest.json", url)
        assert load_config(write(tmp_path, text)).server.manifest_url == url


@pytest.mark.parametrize(("text", "unit", "seconds"), [
    ("30s", "s", 30), ("5m", "m", 300), ("1h", "h", 3600), ("2d", "d", 172800), ("0", "", 0),
    ("1.5h", "h", 5400),
])
def test_durations(text: str, unit: str, seconds: float) -> None:
    """Durations accept s, m, h, d and bare seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("200MB", 200_000_000), ("1GB", 10**9), ("512B", 512), ("4KiB", 4096), ("0", 0), (10, 10),
])
def test_sizes(text: str, size: int) -> None:
    """Sizes accept B, KB, MB, GB (SI) and KiB, MiB, GiB (binary)."""
    assert parse_size(text) == size


# (name, config text, key the single error line must name)
BAD_CONFIGS = [
    ("unknown key", MINIMAL + "\n[log]\ncolour = true\n", "log.colour"),
    ("unknown section", MINIMAL + "\n[extra]\na = 1\n", "extra"),
    ("wrong type", MINIMAL.replace('name = "kiosk"', "name = 3"), "app.name"),
    ("bad duration", MINIMAL + '\n[boot]\ntimeout = "ten minutes"\n', "boot.timeout"),
    ("bad size", MINIMAL + '\n[install]\nmin_free = "lots"\n', "install.min_free"),
    ("bad url scheme", MINIMAL.replace("https://", "ftp://"), "server.manifest_url"),
    ("bad key", MINIMAL.replace(KEY, "ed25519:notbase64!!"), "trust.keys"),
    ("short key", MINIMAL.replace(KEY, "ed25519:AAAA"), "trust.keys"),
    ("rsa key", MINIMAL.replace(KEY, "ssh-rsa AAAA"), "trust.keys"),
    ("threshold too high", MINIMAL.replace(f'keys = ["{KEY}"]',
                                           f'keys = ["{KEY}", "{KEY2}"]\nthreshold = 3'),
     "trust.threshold"),
    ("empty keys", MINIMAL.replace(f'["{KEY}"]', "[]"), "trust.keys"),
    ("bad enum", MINIMAL + '\n[install]\nclone = "rsync"\n', "install.clone"),
    ("missing required", MINIMAL.replace('release_dir = "/opt/kiosk"', ""), "app.release_dir"),
    ("relative path", MINIMAL.replace('"/opt/kiosk"', '"opt/kiosk"'), "app.release_dir"),
    ("duplicate table", MINIMAL + "\n[server]\n", "TOML syntax error"),
    ("bad jitter", MINIMAL.replace("[trust]", 'poll_jitter = 2\n[trust]'), "server.poll_jitter"),
    ("bad boolean", MINIMAL + '\n[boot]\nwatch_pid = "yes"\n', "boot.watch_pid"),
    ("bad app name", MINIMAL.replace('name = "kiosk"', 'name = "../etc"'), "app.name"),
]


@pytest.mark.parametrize(("name", "text", "key"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_the_key(
        tmp_path: Path, name: str, text: str, key: str) -> None:
    """`patchd config check` rejects each bad config with exit 2 and one line naming the key."""
    path = write(tmp_path, text)
    proc = run_patchd("config", "check", str(path))
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0]
    assert key in lines[0]
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    """A missing config file is one line naming the file."""
    proc = run_patchd("config", "check", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"patchd: {tmp_path / 'nope.toml'}: no such file"


def test_toml_syntax_error_exits_2(tmp_path: Path) -> None:
    """A TOML syntax error is reported with its position."""
    path = write(tmp_path, "[app\nname = 1")
    proc = run_patchd("config", "check", str(path))
    assert proc.returncode == 2
    assert "TOML syntax error" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    """Several problems come back together, one per line, each naming its key."""
    text = MINIMAL + '\n[log]\nlevel = "loud"\nformat = "xml"\n'
    with pytest.raises(ConfigErrors) as info:
        load_config(write(tmp_path, text))
    keys = [key for key, _ in info.value.problems]
    assert keys == ["log.format", "log.level"]
    assert isinstance(info.value, ConfigFileError)


def _with_release(tmp_path: Path, text: str, version: str | None = "1.4.0\n") -> str:
    """``text`` with its release_dir in ``tmp_path`` (holding ``version`` as VERSION)."""
    release = tmp_path / "opt-kiosk"
    release.mkdir(exist_ok=True)
    if version is not None:
        (release / "VERSION").write_text(version)
    return text.replace('release_dir = "/opt/kiosk"', f'release_dir = "{release}"')


def test_config_check_prints_effective_config_that_loads_again(tmp_path: Path) -> None:
    """The printed effective config is itself a valid config with the same values."""
    proc = run_patchd("config", "check", str(write(tmp_path, _with_release(tmp_path, MINIMAL))))
    assert proc.returncode == 0, proc.stderr
    again = write(tmp_path, proc.stdout.split("\n", 1)[1])
    assert load_config(again).paths == load_config(
        write(tmp_path, _with_release(tmp_path, MINIMAL))).paths


@pytest.mark.parametrize(("name", "version", "expect"), [
    ("missing release_dir", None, "opt-kiosk is not a directory"),
    ("no VERSION", "", "cannot read the release version"),
    ("bad VERSION", "not a release!\n", "is not a valid release name"),
])
def test_config_check_refuses_what_run_refuses(tmp_path: Path, name: str,
                                               version: str | None, expect: str) -> None:
    """`config check` runs the start-up checks of `run`: both refuse, with the same line."""
    text = _with_release(tmp_path, MINIMAL, version or None)
    release = tmp_path / "opt-kiosk"
    if name == "missing release_dir":
        release.rmdir()
    elif name == "no VERSION":
        (release / "VERSION").unlink(missing_ok=True)
    path = write(tmp_path, text + f'[paths]\nstate_dir = "{tmp_path}/s"\n'
                 f'cache_dir = "{tmp_path}/c"\nsocket = "{tmp_path}/k.sock"\n')
    check = run_patchd("config", "check", str(path))
    run = run_patchd("run", "--config", str(path))
    assert (check.returncode, run.returncode) == (2, 2), (check, run)
    assert expect in check.stderr and "app.release_dir" in check.stderr, check.stderr
    assert check.stderr.strip().splitlines()[0] in run.stderr, run.stderr
    assert not (tmp_path / "s").exists()  # run refused before touching its state


def test_config_check_warns_as_run_does_about_users_and_group(tmp_path: Path) -> None:
    """Unknown users and an unknown socket group are warnings for both: exit 0."""
    text = _with_release(tmp_path, MINIMAL) + (
        '[api]\nsocket_group = "no-such-group-x"\nadmins = ["no-such-user-x"]\n')
    proc = run_patchd("config", "check", str(write(tmp_path, text)))
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert any("api.socket_group: group 'no-such-group-x' does not exist" in w
               for w in warnings), warnings
    assert any("api.admins: 'no-such-user-x' is not a user" in w for w in warnings), warnings


def test_slow_retrieval_limits_default_and_follow_the_timeout(tmp_path: Path) -> None:
    """document_deadline defaults to four times the timeout, min_rate to 1 KiB/s; both
    can be set, and min_rate "0" turns the floor off."""
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.server.document_deadline, config.server.min_rate) == (120.0, 1024)
    text = MINIMAL.replace("[trust]", 'timeout = "5s"\n[trust]')
    assert load_config(write(tmp_path, text)).server.document_deadline == 20.0
    text = MINIMAL.replace("[trust]", 'document_deadline = "10m"\nmin_rate = "0"\n[trust]')
    server = load_config(write(tmp_path, text)).server
    assert (server.document_deadline, server.min_rate) == (600.0, 0)


SLOW_RETRIEVAL_BAD = [
    ('timeout = "1m"\ndocument_deadline = "30s"', "server.document_deadline",
     "shorter than server.timeout (60s)"),
    ('document_deadline = "0"', "server.document_deadline", "must be longer than 0"),
    ('document_deadline = "soon"', "server.document_deadline", "expected a duration"),
    ('min_rate = "fast"', "server.min_rate", "expected a size"),
    ("min_rate = -1", "server.min_rate", "cannot be negative"),
]


@pytest.mark.parametrize(("keys", "key", "message"), SLOW_RETRIEVAL_BAD,
                         ids=[c[0] for c in SLOW_RETRIEVAL_BAD])
def test_slow_retrieval_limits_refused_with_one_line(
        tmp_path: Path, keys: str, key: str, message: str) -> None:
    """A bad document_deadline or min_rate is one `config check` line naming the key."""
    path = write(tmp_path, MINIMAL.replace("[trust]", keys + "\n[trust]"))
    proc = run_patchd("config", "check", str(path))
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and message in lines[0], lines
