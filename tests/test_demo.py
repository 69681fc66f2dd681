"""`patchd demo`, the README's first command, runs the whole flow and exits 0."""

from __future__ import annotations

import time

from support.cli import run_patchd


def test_demo_runs_the_whole_flow() -> None:
    """The demo runs its app under patchd launch: patch 1 activates at once and passes
    its health check; patch 2's failing check is rolled back to patch 1, whose
    on-fallback hook runs; all within 30 s."""
    started = time.monotonic()
    proc = run_patchd("demo", timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "patch update to 1.0+1" in out
    assert "app: hello from patch 1" in out
    assert "1.0+1 is healthy: BootSuccess reported" in out
    assert ("health check required.d/10-http FAILED (exit status 1): GET /healthz: 503 "
            "database schema too old") in out
    assert "BootFailure for 1.0+2" in out
    assert "on-fallback: undoing the migrations of 1.0+2" in out
    assert out.count("1.0+1 is healthy: BootSuccess reported") == 2
    assert "1.0+2            bad (boot_failure)" in out
    assert "stopped the app through its launcher (exit status 0)" in out
    assert elapsed < 30, f"demo took {elapsed:.1f}s"
