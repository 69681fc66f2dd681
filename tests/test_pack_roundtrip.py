"""pack → open_bundle → apply_bundle reproduces the target tree exactly."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from patchd.build.apply import apply_bundle
from patchd.core.errors import PackError
from patchd.core.fsio import TEMP_PREFIX
from patchd.publisher.pack import pack
from patchd.trust import DeleteOp, DeltaOp, DirOp, Expected, FileOp, SymlinkOp, open_bundle
from support.trees import Spec, big_content, new_key, snapshot, tree_specs, trust_of, write_tree

KEY = new_key()
TRUST = trust_of(KEY)
EXPECT = Expected(app="kiosk", kind="patch", release="1.0", patch=1, arch="x86_64")


def roundtrip(work: Path, base_spec: Spec | None, target_spec: Spec, delta: bool = True
              ) -> tuple[Path, Path, Path]:
    base, target, staging = work / "base", work / "target", work / "staging"
    if base_spec is not None:
        write_tree(base, base_spec)
    write_tree(target, target_spec)
    out = work / "b.patchd"
    pack(app="kiosk", release="1.0", patch=1 if base_spec is not None else 0,
         kind="patch" if base_spec is not None else "full", arch="any",
         base=base if base_spec is not None else None, target=target,
         private_keys=[KEY], out=out, delta=delta)
    if base_spec is not None:
        shutil.copytree(base, staging, symlinks=True)
        expected = EXPECT
    else:
        staging.mkdir()
        expected = Expected("kiosk", "full", "1.0", 0, "x86_64")
    with open_bundle(out, TRUST, expected) as reader:
        files = apply_bundle(reader, staging)
    assert not [p for p in staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    return out, staging, files  # type: ignore[return-value]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=tree_specs, target=tree_specs)
def test_roundtrip_property(base: Spec, target: Spec) -> None:
    """Any base and target tree: pack then apply onto a copy of base gives the target."""
    with tempfile.TemporaryDirectory() as tmp:
        _, staging, files = roundtrip(Path(tmp), base, target)
        want = snapshot(Path(tmp) / "target")
        assert snapshot(staging) == want
        for path, sha in files.items():  # type: ignore[attr-defined]
            assert want[path][:2] == ("file", sha)


@settings(max_examples=15, deadline=None)
@given(target=tree_specs)
def test_full_bundle_roundtrip(target: Spec) -> None:
    """A full bundle applied to an empty directory gives the target tree."""
    with tempfile.TemporaryDirectory() as tmp:
        _, staging, _ = roundtrip(Path(tmp), None, target)
        assert snapshot(staging) == snapshot(Path(tmp) / "target")


def test_type_changes_and_deletions(tmp_path: Path) -> None:
    """file→dir, dir→symlink, symlink→file and removals become delete + create ops."""
    base = {"f": ("file", b"x", 0o644), "d": ("dir", 0o755, {"in": ("file", b"y", 0o644)}),
            "l": ("link", 0, "f"), "gone": ("dir", 0o755, {"z": ("file", b"z", 0o600)})}
    target = {"f": ("dir", 0o700, {"new": ("file", b"", 0o600)}), "d": ("link", 0, "f"),
              "l": ("file", b"now a file", 0o755)}
    out, staging, _ = roundtrip(tmp_path, base, target)
    assert snapshot(staging) == snapshot(tmp_path / "target")
    with open_bundle(out, TRUST, EXPECT) as reader:
        ops = reader.header.ops
        assert [o for o in ops if isinstance(o, DeleteOp)] == [
        DeleteOp("d"), DeleteOp("f"), DeleteOp("gone"), DeleteOp("l")]
    assert DirOp("f", 0o700) in ops and SymlinkOp("d", "f") in ops


def test_delta_used_when_it_saves(tmp_path: Path) -> None:
    """A small edit to a large file ships as a delta op, much smaller than --no-delta."""
    base = {"big": ("file", big_content(1, 0) * 8, 0o644), "same": ("file", b"s", 0o644)}
    target = {"big": ("file", big_content(1, 3) * 8, 0o644), "same": ("file", b"s", 0o644)}
    with_delta, _staging, _ = roundtrip(tmp_path / "1", base, target)
    without, _, _ = roundtrip(tmp_path / "2", base, target, delta=False)
    with open_bundle(with_delta, TRUST, EXPECT) as reader:
        kinds = [type(op) for op in reader.header.ops]
    assert kinds == [DeltaOp]
    assert with_delta.stat().st_size * 10 < without.stat().st_size
    with open_bundle(without, TRUST, EXPECT) as reader:
        assert [type(op) for op in reader.header.ops] == [FileOp]


def test_mode_only_change_is_a_file_op(tmp_path: Path) -> None:
    """Same content with a new mode is shipped as a file op and the mode is applied."""
    _out, staging, _ = roundtrip(tmp_path, {"x": ("file", b"data", 0o644)},
                                {"x": ("file", b"data", 0o755)})
    assert (staging / "x").stat().st_mode & 0o777 == 0o755


def test_pack_is_deterministic(tmp_path: Path) -> None:
    """Packing the same trees twice gives byte-identical bundles."""
    spec = {"a": ("dir", 0o755, {"b": ("file", big_content(2, 0), 0o644)}),
            "l": ("link", 0, "a/b")}
    write_tree(tmp_path / "t", spec)
    outs = []
    for name in ("one", "two"):
        out = tmp_path / f"{name}.patchd"
        pack(app="kiosk", release="1.0", patch=0, kind="full", arch="any", base=None,
             target=tmp_path / "t", private_keys=[KEY], out=out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "a/../../x"])
def test_pack_refuses_escaping_symlinks(tmp_path: Path, target: str) -> None:
    """A target tree whose symlink would leave the tree cannot be packed."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "l").symlink_to(target)
    with pytest.raises(PackError, match="cannot ship symlink"):
        pack(app="kiosk", release="1.0", patch=0, kind="full", arch="any", base=None,
             target=tmp_path / "t", private_keys=[KEY], out=tmp_path / "o.patchd")
    assert not (tmp_path / "o.patchd").exists()
