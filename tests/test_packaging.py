"""The Debian package built by packaging/build-deb (docs/operations.md, docs/install.md).

The .deb is built once per module (about half a minute, longer with a cold pip cache;
PATCHD_DEB=path/to/patchd.deb reuses one built earlier). Its packaged `patchd` is run
from an extracted copy: the venv's interpreter link is absolute (/usr/bin/python3.X,
present wherever the package's Depends are) and the venv finds its site-packages from
its own pyvenv.cfg, so running ROOT/usr/lib/patchd/venv/bin/python on the packaged
console script imports only what the package ships. With CI=true and root, the package
is also installed for real with dpkg and purged again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_DEB = REPO / "packaging" / "build-deb"
VENV = "usr/lib/patchd/venv"

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
    pytest.mark.skipif(
        not Path("/usr/bin/python3").exists(), reason="Debian's /usr/bin/python3 is not installed"
    ),
]


def project_version() -> str:
    text = (REPO / "daemon" / "patchd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built package (built once for the module)."""
    if prebuilt := os.environ.get("PATCHD_DEB"):
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [sys.executable, str(BUILD_DEB), "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("patchd_*.deb")
    return built


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files extracted with dpkg-deb -x."""
    target = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


def field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def contents(deb: Path) -> dict[str, tuple[str, str]]:
    """Path → (mode string, owner/group) from dpkg-deb -c; symlinks keep '-> target'."""
    out = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        entries[rest.removeprefix("./").rstrip("/")] = (mode, owner)
    return entries


def test_name_follows_debian_convention(deb: Path) -> None:
    """The file is patchd_<version>_<arch>.deb with the project's version and dpkg's arch."""
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"patchd_{project_version()}_{arch}.deb"


def test_control_fields(deb: Path) -> None:
    """Package, Version, Depends (python3 >= 3.11 and the venv's python3.X) are declared."""
    assert field(deb, "Package") == "patchd"
    assert field(deb, "Version") == project_version()
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    assert "python3 (>= 3.11)" in depends
    assert any(re.fullmatch(r"python3\.\d+", d) for d in depends), depends
    assert field(deb, "Maintainer")
    assert int(field(deb, "Installed-Size")) > 1000


def test_layout(deb: Path) -> None:
    """The unit, sysusers snippet, command link, venv and example config are in place."""
    entries = contents(deb)
    for path in (
        "usr/lib/systemd/system/patchd@.service",
        "usr/lib/sysusers.d/patchd.conf",
        "usr/share/doc/patchd/install.md",
        f"{VENV}/pyvenv.cfg",
        f"{VENV}/lib/python3.11/site-packages/patchd/cli/main.py",
    ):
        assert path in entries, path
    assert "usr/bin/patchd -> ../lib/patchd/venv/bin/patchd" in entries
    assert f"{VENV}/bin/python3.11 -> /usr/bin/python3.11" in entries
    assert entries[f"{VENV}/bin/patchd"][0] == "-rwxr-xr-x"
    if (REPO / "config.example.toml").exists():
        assert "usr/share/doc/patchd/examples/config.example.toml" in entries
    assert {owner for _mode, owner in entries.values()} == {"root/root"}
    assert not [p for p in entries if "/site-packages/pip/" in p], "the installer is not shipped"
    assert not [p for p in entries if p.startswith(("etc/", "var/", "run/"))]


def test_shipped_files_are_the_repositorys(root: Path) -> None:
    """The unit, sysusers snippet and example config are byte-for-byte the repo's."""
    pairs = {
        "usr/lib/systemd/system/patchd@.service": "systemd/patchd@.service",
        "usr/lib/sysusers.d/patchd.conf": "systemd/patchd.sysusers.conf",
        "usr/share/doc/patchd/examples/config.example.toml": "config.example.toml",
    }
    for packaged, source in pairs.items():
        if (REPO / source).exists():
            assert (root / packaged).read_bytes() == (REPO / source).read_bytes(), packaged


def test_venv_holds_no_build_paths(root: Path) -> None:
    """Nothing in the venv points at the staging dir or a private (pyenv) interpreter."""
    venv = root / VENV
    assert "home = /usr/bin\n" in (venv / "pyvenv.cfg").read_text()
    first = (venv / "bin" / "patchd").read_text().splitlines()[0]
    assert first == "#!/usr/lib/patchd/venv/bin/python"
    leaks = [
        str(path.relative_to(root))
        for path in venv.rglob("*")
        if path.is_file() and not path.is_symlink()
        for needle in (b"/root/.pyenv", b"patchd-deb-")
        if needle in path.read_bytes()
    ]
    assert leaks == []


def test_maintainer_scripts_create_the_group(deb: Path, tmp_path: Path) -> None:
    """postinst creates patchd via systemd-sysusers, else addgroup/adduser; all parse."""
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    postinst = (control / "postinst").read_text()
    assert "systemd-sysusers /usr/lib/sysusers.d/patchd.conf" in postinst
    assert "addgroup --system patchd" in postinst and "adduser --system" in postinst
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
        subprocess.run(["sh", "-n", str(control / script)], check=True)


def clean_env() -> dict[str, str]:
    """The environment minus anything that would point Python at the test's venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_packaged_patchd_version_runs(root: Path, tmp_path: Path) -> None:
    """The packaged console script, on the venv's Debian python, prints the version."""
    python = root / VENV / "bin" / "python"
    command = (root / "usr/bin/patchd").resolve()
    assert command == (root / VENV / "bin" / "patchd").resolve()
    result = subprocess.run(
        [str(python), str(command), "--version"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert project_version() in result.stdout
    where = subprocess.run(
        [str(python), "-c", "import sys, patchd; print(patchd.__file__); print(sys.base_prefix)"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(root / VENV), "imported from the package, not the repo"
    assert where[1] == "/usr", "runs on Debian's interpreter"


@pytest.mark.skipif(
    os.environ.get("CI") != "true" or os.geteuid() != 0,
    reason="installs system-wide: only as root with CI=true",
)
def test_dpkg_installs_runs_and_purges(deb: Path) -> None:
    """dpkg -i creates the patchd user and group and a working /usr/bin/patchd; purge removes it."""
    installed = subprocess.run(["dpkg-query", "-W", "patchd"], capture_output=True)
    if installed.returncode == 0:
        pytest.skip("a patchd package is already installed here; not touching it")
    subprocess.run(["dpkg", "-i", str(deb)], check=True, capture_output=True)
    try:
        version = subprocess.run(
            ["/usr/bin/patchd", "--version"],
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert project_version() in version
        subprocess.run(["getent", "group", "patchd"], check=True, capture_output=True)
        subprocess.run(["getent", "passwd", "patchd"], check=True, capture_output=True)
    finally:
        subprocess.run(["dpkg", "--purge", "patchd"], check=True, capture_output=True)
    assert not Path("/usr/bin/patchd").exists()
    assert not Path("/usr/lib/patchd").exists()
