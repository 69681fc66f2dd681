"""patchd.varlink stands alone: it imports nothing else of patchd, its errors are its
own, and its public API is what ``__all__`` says (callers import from the package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import patchd.varlink
from patchd.core.errors import PatchdError

PACKAGE = Path(patchd.varlink.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))


def _absolute_imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_module_imports_nothing_else_of_patchd(module: Path) -> None:
    """No import of patchd outside patchd.varlink, and no relative import leaving it."""
    tree = ast.parse(module.read_text(), str(module))
    outside = [name for name in _absolute_imports(tree)
               if name.split(".")[0] == "patchd" and not name.startswith("patchd.varlink")]
    assert outside == []
    assert all(node.level <= 1 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_module_is_small(module: Path) -> None:
    """One job per module: none grows past 500 lines."""
    assert len(module.read_text().splitlines()) < 500


def test_importing_the_package_loads_no_other_patchd_module() -> None:
    """Checked at run time too, in a fresh interpreter: indirect imports count."""
    code = ("import sys, patchd.varlink; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'patchd' and not m.startswith('patchd.varlink')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out == "['patchd']\n"


def test_all_names_the_public_api() -> None:
    """Every name in ``__all__`` exists, and the package namespace adds no other public
    name except its modules (which callers should not import from)."""
    exported = set(patchd.varlink.__all__)
    assert len(exported) == len(patchd.varlink.__all__)
    assert all(hasattr(patchd.varlink, name) for name in exported)
    modules = {path.stem for path in MODULES} - {"__init__"}
    public = {name for name in vars(patchd.varlink) if not name.startswith("_")}
    assert public - exported == modules


def test_errors_are_not_patchds() -> None:
    """The package's exceptions do not derive from patchd's: patchd translates them."""
    errors = [getattr(patchd.varlink, name) for name in patchd.varlink.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert {e.__name__ for e in errors} >= {
        "VarlinkError", "AddressInUse", "ClientError", "ConnectFailed", "ProtocolError"}
    assert not any(issubclass(e, PatchdError) for e in errors)
    assert issubclass(patchd.varlink.ConnectFailed, patchd.varlink.ClientError)
    assert issubclass(patchd.varlink.ProtocolError, patchd.varlink.ClientError)
