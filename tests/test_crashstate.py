"""The power-cut crash-state generator, proven on small hand-made traces and a toy writer.

The campaign in tests/e2e/test_powercut.py is only as good as the states it is shown;
these tests pin down the two models (docs/reliability.md) on traces whose right answer
is known, and show that a writer missing one directory fsync is caught.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from support.crashstate import (
    Node,
    Op,
    crash_states,
    cut_points,
    digest,
    materialise,
    read_log,
)
from support.powerfs import PowerFs, unavailable


def w(fh: int, data: bytes, offset: int = 0) -> Op:
    return {"op": "write", "fh": fh, "offset": offset, "data": base64.b64encode(data).decode()}


def create(path: str, fh: int, mode: int = 0o644) -> Op:
    return {"op": "create", "path": path, "fh": fh, "mode": mode, "existed": False}


def files(root: Node, prefix: str = "") -> dict[str, bytes | None]:
    """path → durable bytes (None for a directory) of a crash tree."""
    out: dict[str, bytes | None] = {}
    for name, child in root.d_entries.items():
        path = f"{prefix}{name}"
        if child.kind == "dir":
            out[path] = None
            out.update(files(child, path + "/"))
        else:
            out[path] = child.d_data
    return out


def strict(snapshot: Path, ops: list[Op]) -> list[dict[str, bytes | None]]:
    return [files(root) for _cut, root in crash_states(snapshot, ops)]


ATOMIC_REPLACE = [
    create("/.tmp", 3), w(3, b"new"), {"op": "fsync", "path": "/.tmp", "fh": 3},
    {"op": "release", "fh": 3}, {"op": "rename", "src": "/.tmp", "dst": "/state"},
    {"op": "fsyncdir", "path": "/"},
]


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    root = tmp_path / "snap"
    root.mkdir()
    (root / "state").write_bytes(b"old")
    return root


def test_cut_points_are_the_changes_only(snap: Path) -> None:
    """Opens, releases and marks are not cut points; every change and fsync is."""
    ops = [{"op": "open", "path": "/state", "fh": 3}, {"op": "mark", "label": "x"},
           *ATOMIC_REPLACE]
    assert cut_points(ops) == [0, 3, 4, 5, 7, 8]


def test_unsynced_new_file_is_absent_then_empty_then_whole(snap: Path) -> None:
    """A new file's name needs its directory's fsync, its bytes need its own fsync."""
    ops = [create("/f", 3), w(3, b"data"), {"op": "fsyncdir", "path": "/"},
           {"op": "fsync", "path": "/f", "fh": 3}]
    states = strict(snap, ops)
    assert [s.get("f") for s in states] == [None, None, None, b"", b"data"]


def test_atomic_replace_keeps_old_or_new_at_every_cut(snap: Path) -> None:
    """temp+fsync+rename+dir fsync: every cut holds old or new, new only after the last."""
    states = strict(snap, ATOMIC_REPLACE)
    assert [s["state"] for s in states] == [b"old"] * 5 + [b"new"]
    assert all(s.get(".tmp") in (None, b"new") for s in states)


def test_rename_without_directory_fsync_is_lost(snap: Path) -> None:
    """Without the directory fsync the rename never reaches the disk in the strict model."""
    states = strict(snap, ATOMIC_REPLACE[:-1])
    assert states[-1]["state"] == b"old"


def test_new_directory_is_empty_until_fsynced_itself(snap: Path) -> None:
    """mkdir d; d/f fsynced; parent fsynced: d exists but is empty until d is fsynced."""
    ops = [{"op": "mkdir", "path": "/d", "mode": 0o755}, create("/d/f", 3), w(3, b"x"),
           {"op": "fsync", "path": "/d/f", "fh": 3}, {"op": "fsyncdir", "path": "/"},
           {"op": "fsyncdir", "path": "/d"}]
    states = strict(snap, ops)
    assert "d" not in states[4] and states[5]["d"] is None and "d/f" not in states[5]
    assert states[6]["d/f"] == b"x"


def test_rename_across_directories_is_two_entry_changes(snap: Path) -> None:
    """Fsyncing only the destination leaves the inode under both names."""
    ops = [{"op": "mkdir", "path": "/d", "mode": 0o755}, {"op": "fsyncdir", "path": "/"},
           {"op": "rename", "src": "/state", "dst": "/d/moved"},
           {"op": "fsyncdir", "path": "/d"}]
    last = strict(snap, ops)[-1]
    assert last["state"] == b"old" and last["d/moved"] == b"old"


def test_hard_links_stay_one_inode_when_materialised(snap: Path, tmp_path: Path) -> None:
    """A link op and its directory fsync give two names of one inode on disk."""
    ops = [{"op": "link", "src": "/state", "dst": "/again"}, {"op": "fsyncdir", "path": "/"}]
    *_, (_cut, root) = crash_states(snap, ops)
    out = tmp_path / "out"
    materialise(root, out)
    assert os.stat(out / "state").st_ino == os.stat(out / "again").st_ino


def test_chmod_needs_the_file_fsync(snap: Path) -> None:
    """A mode change is durable with the inode's fsync, not before."""
    ops = [{"op": "open", "path": "/state", "fh": 3},
           {"op": "chmod", "path": "/state", "mode": 0o600},
           {"op": "fsync", "path": "/state", "fh": 3}]
    modes = [root.d_entries["state"].d_mode for _c, root in crash_states(snap, ops)]
    assert modes == [0o644, 0o644, 0o600]


def test_weak_model_lies_between_strict_and_everything(snap: Path) -> None:
    """keep=0 is the strict model, keep=1 keeps every change; a seed is reproducible."""
    ops = [create("/f", 3), w(3, b"abc"), {"op": "rename", "src": "/state", "dst": "/s2"}]
    strict_d = [digest(r) for _c, r in crash_states(snap, ops)]
    none = [digest(r) for _c, r in crash_states(snap, ops, seed=1, keep_unsynced=0.0)]
    assert none == strict_d
    *_, (_c, every) = crash_states(snap, ops, seed=1, keep_unsynced=1.0)
    assert files(every) == {"f": b"abc", "s2": b"old"}
    runs = [[digest(r) for _c, r in crash_states(snap, ops, seed=7)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_digest_tells_trees_apart(snap: Path) -> None:
    """Equal durable trees share a digest; one byte or one mode differs."""
    base = [digest(r) for _c, r in crash_states(snap, ATOMIC_REPLACE)]
    assert base[0] == base[4] != base[5]


def test_materialise_relocates_links_into_the_mount(snap: Path, tmp_path: Path) -> None:
    """An absolute link into the old mount point follows the disk to its new place."""
    ops = [{"op": "symlink", "path": "/cur", "target": "/mnt/old/state"},
           {"op": "fsyncdir", "path": "/"}]
    *_, (_c, root) = crash_states(snap, ops)
    out = tmp_path / "out"
    materialise(root, out, relocate=("/mnt/old", str(out)))
    assert os.readlink(out / "cur") == f"{out}/state"


# --- a toy writer on the real FUSE recorder -------------------------------------------


def _toy_write(path: Path, data: bytes, *, dir_fsync: bool) -> None:
    """The atomic-write discipline of patchd.core.fsio, with the directory fsync optional."""
    tmp = path.with_name(".tmp-" + path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if dir_fsync:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _toy_violations(tmp_path: Path, dir_fsync: bool) -> tuple[int, list[int]]:
    """Run the toy writer on powerfs; (cut points, cuts after it returned that lost it)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    (backing / "state").write_bytes(b"v1")
    with PowerFs(backing, mount, tmp_path / "ops.log") as fs:
        fs.checkpoint()
        _toy_write(mount / "state", b"v2", dir_fsync=dir_fsync)
        fs.mark("returned")
        (mount / "unrelated").write_bytes(b"later work")
    ops = read_log(tmp_path / "ops.log")
    returned = next(i for i, op in enumerate(ops) if op["op"] == "mark")
    cuts = cut_points(ops)
    bad = []
    for cut, root in crash_states(fs.snapshot, ops):
        content = files(root).get("state")
        if content not in (b"v1", b"v2") or (cut >= returned and content != b"v2"):
            bad.append(cut)
    return len(cuts), bad


def test_toy_writer_with_directory_fsync_survives_every_cut(tmp_path: Path) -> None:
    """The full discipline keeps old-or-new at every cut and new once it returned."""
    count, bad = _toy_violations(tmp_path, dir_fsync=True)
    assert count >= 7 and bad == []


def test_removed_directory_fsync_is_caught(tmp_path: Path) -> None:
    """Dropping the directory fsync loses a write that had returned: the generator sees it."""
    count, bad = _toy_violations(tmp_path, dir_fsync=False)
    assert bad, f"no cut point of {count} lost the returned write"
