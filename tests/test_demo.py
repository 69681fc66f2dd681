"""`patchd demo`, the README's first command, runs the whole flow and exits 0."""

from __future__ import annotations

import time

from support.cli import run_patchd


def test_demo_runs_the_whole_flow() -> None:
    """The demo installs patch 1, detects patch 2's boot crash and falls back, within 30 s."""
    started = time.monotonic()
    proc = run_patchd("demo", timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "installed 1.0+1" in out
    assert "app: hello from patch 1" in out
    assert "1.0+2 marked bad (boot_crash)" in out
    assert "next boot falls back to 1.0+1" in out
    assert out.count("app: reported BootSuccess") == 2
    assert "1.0+2            bad (boot_crash)" in out
    assert elapsed < 30, f"demo took {elapsed:.1f}s"
