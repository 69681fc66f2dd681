"""A stop request (SIGTERM) ends an install cleanly between two ops."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchd.build.install import materialise
from patchd.core.errors import InstallCancelled
from patchd.core.model import Build, Downloaded, Installed
from support.install_child import leftovers, listing_digest, make_env, stage_download

B1 = Build("1.0", 1)


def test_cancelled_install_leaves_no_staging_and_counts_no_attempt(tmp_path: Path) -> None:
    """Cancelling after a few ops removes staging, keeps the download, and does not count
    as an install attempt; the next install completes."""
    env = make_env(tmp_path)
    env.release.mkdir()
    (env.release / "VERSION").write_text("1.0\n")
    target = env.work / "target"
    target.mkdir()
    (target / "VERSION").write_text("1.0\n")
    for n in range(40):
        (target / f"f{n}.txt").write_text(f"content {n}\n")
    bundle = env.pack(B1, env.release, target)
    before = listing_digest(env.release)
    calls = 0

    def stop_after_five() -> None:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise InstallCancelled

    with env.open() as lc:
        stage_download(lc, B1, bundle)
        with pytest.raises(InstallCancelled):
            materialise(lc, env.request(B1, lc.download_path(B1)), stop_after_five)
        state = lc.state(B1)
        assert isinstance(state, Downloaded) and state.attempts == 0
        assert lc.download_path(B1).is_file()
        assert leftovers(env.state) == []
        assert not lc.tree_path(B1).exists()
        materialise(lc, env.request(B1, lc.download_path(B1)))
        assert isinstance(lc.state(B1), Installed)
    assert listing_digest(env.release) == before
