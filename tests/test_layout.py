"""Every on-disk path is named once (state/layout.py), and the lifecycle alone deletes a
build's download."""

from __future__ import annotations

from pathlib import Path

from patchd.core.model import Build, Downloading
from patchd.state import DownloadFiles, Layout, Lifecycle
from support.lifecycle_child import make_release

R = "1.0"
B1 = Build(R, 1)


def test_layout_names_the_documented_tree(tmp_path: Path) -> None:
    """The paths are the ones docs/formats.md describes, and a download's meta sits
    beside it under the same name plus ``.meta``."""
    layout = Layout(tmp_path / "state", tmp_path / "cache")
    assert layout.pointers == tmp_path / "state" / "pointers.json"
    assert layout.tree(B1) == tmp_path / "state" / "builds" / "1.0" / "1" / "tree"
    assert layout.state_file(B1).parent == layout.build_dir(B1)
    files = layout.download(B1)
    assert files.data == tmp_path / "cache" / "downloads" / "1.0-1.patchd"
    assert files.meta == tmp_path / "cache" / "downloads" / "1.0-1.patchd.meta"
    assert list(files) == [files.data, files.meta] and DownloadFiles.beside(files.data) == files


def test_a_fresh_download_start_clears_what_was_there(tmp_path: Path) -> None:
    """record_download_started is a fresh start: an older download of the build and its
    meta are removed before the new state names them (no one else deletes them)."""
    state, cache, release = make_release(tmp_path, R)
    with Lifecycle.open(state, cache, release) as lc:
        files = lc.download_files(B1)
        files.data.write_bytes(b"bytes of another version")
        files.meta.write_text('{"url": "http://old"}')
        lc.record_download_started(B1, "http://new/1.patchd", "a" * 64, 10)
        assert not files.data.exists() and not files.meta.exists()
        assert isinstance(lc.state(B1), Downloading)
