"""The architecture holds: import-linter's contracts pass, and no module outgrows its job."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "patchd"
MAX_MODULE_LINES = 500


def test_import_contracts_hold() -> None:
    """Layers only import downwards, and varlink imports nothing of patchd
    (the contracts in pyproject.toml, checked by the real lint-imports)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is in the test extra; install '.[test]'"
    result = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_no_module_is_over_500_lines() -> None:
    """A module past 500 lines holds two jobs; split it."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_every_module_architecture_md_names_exists() -> None:
    """docs/architecture.md cannot drift: each module or package it names is there."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:patchd/)?[a-z_]+(?:/[a-z_]+)*(?:\.py|/))`", text))
    named = {n for n in named if not n.startswith(("tests/", "docs/"))}
    assert len(named) > 20, named
    missing = sorted(n for n in named if not (ROOT / n).exists()
                     and not (PACKAGE / n.removeprefix("patchd/")).exists())
    assert missing == []


def test_client_commands_stay_light() -> None:
    """``patchd status``, the boot commands and ``patchd launch`` run on every host
    start: importing them must not load the daemon, httpx, cryptography or zstandard."""
    code = ("import sys, patchd.cli.main, patchd.cli.client, patchd.cli.launch; "
            "heavy = {'httpx', 'cryptography', 'zstandard', 'patchd.service.daemon', "
            "'patchd.trust', 'patchd.fetch'} & set(sys.modules); print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
