"""Run the real ``patchd`` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_patchd(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
               input: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m patchd ARGS`` with this interpreter; text output captured."""
    full_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "patchd", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"patchd {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc
