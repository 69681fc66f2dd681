"""Installing bundles through ``materialise()`` on real trees: every op kind and type change
with every clone method, hostile trees, strict verification, disk full, start-up sweep.

After every install the SHA-256 listing of ``release_dir`` (content, modes, link targets)
must be what it was before: the release and the running tree are never written.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from patchd.build import clone as clone_mod
from patchd.build.clone import clone_tree
from patchd.build.install import materialise
from patchd.build.verify import verify_tree
from patchd.core.errors import BundleInvalid, DiskFull, PayloadHashMismatch, UnsafePath, UsageError
from patchd.core.model import Bad, BadReason, Build, Downloaded, Installed
from patchd.state.lifecycle import Lifecycle
from patchd.trust import DeleteOp, DeltaOp, DirOp, FileOp, SymlinkOp, read_header_unverified
from support.install_child import (
    Env,
    leftovers,
    listing,
    listing_digest,
    make_env,
    stage_download,
)
from support.trees import (
    big_content,
    craft_bundle,
    file_op,
    header_doc,
    signed_members,
    tree_specs,
    write_tree,
)

R = "1.0"
B1 = Build(R, 1)
IS_ROOT = os.geteuid() == 0

# --- the tree pair exercising every op kind and type change ------------------------------

BASE = {
    "VERSION": ("file", b"1.0\n", 0o644),
    "keep": ("dir", 0o755, {"a": ("file", b"A" * 100, 0o644),
                            "b": ("file", big_content(1, 0), 0o755)}),
    "f2d": ("file", b"file becomes dir", 0o644),
    "d2f": ("dir", 0o755, {"a": ("file", b"1", 0o644),
                           "sub": ("dir", 0o700, {"b": ("file", b"2", 0o600)})}),
    "d2l": ("dir", 0o755, {"a": ("file", b"dir becomes link", 0o644)}),
    "l2f": ("link", 0, "keep/a"),
    "f2l": ("file", b"file becomes link", 0o644),
    "l2d": ("link", 0, "keep"),
    "gone": ("dir", 0o755, {"x": ("file", b"x", 0o644),
                            "y": ("dir", 0o755, {"z": ("file", b"z", 0o444)})}),
    "delta.bin": ("file", big_content(2, 0), 0o755),
    "modeonly": ("file", b"same bytes, new mode", 0o644),
    "replaced": ("file", b"old content of a hard-linked file", 0o400),
    "dirmode": ("dir", 0o755, {"c": ("file", b"c", 0o644)}),
    "ro": ("dir", 0o555, {"old": ("file", b"in a read-only dir", 0o444)}),
    "retarget": ("link", 0, "keep/a"),
}
TARGET = {
    "VERSION": ("file", b"1.0\n", 0o644),
    "keep": BASE["keep"],
    "f2d": ("dir", 0o750, {"inner": ("file", b"now inside a dir", 0o644)}),
    "d2f": ("file", b"dir became file", 0o600),
    "d2l": ("link", 0, "keep"),
    "l2f": ("file", b"link became file", 0o644),
    "f2l": ("link", 0, "keep/b"),
    "l2d": ("dir", 0o700, {"c": ("file", b"link became dir", 0o640)}),
    "delta.bin": ("file", big_content(2, 3), 0o755),
    "modeonly": ("file", b"same bytes, new mode", 0o755),
    "replaced": ("file", b"new content", 0o644),
    "dirmode": ("dir", 0o700, {"c": ("file", b"c", 0o644)}),
    "ro": ("dir", 0o555, {"old": ("file", b"in a read-only dir", 0o444),
                          "new": ("file", b"written into a read-only dir", 0o644)}),
    "retarget": ("link", 0, "keep/b"),
    "newdir": ("dir", 0o755, {"n": ("file", b"", 0o644)}),
}
#: What the packer must emit for each path, so the test covers each op kind it names.
EXPECTED_OPS: dict[str, set[type]] = {
    "f2d": {DeleteOp, DirOp}, "f2d/inner": {FileOp}, "d2f": {DeleteOp, FileOp},
    "d2l": {DeleteOp, SymlinkOp}, "l2f": {DeleteOp, FileOp}, "f2l": {DeleteOp, SymlinkOp},
    "l2d": {DeleteOp, DirOp}, "gone": {DeleteOp}, "delta.bin": {DeltaOp},
    "modeonly": {FileOp}, "replaced": {FileOp}, "dirmode": {DirOp}, "ro/new": {FileOp},
    "retarget": {SymlinkOp}, "newdir": {DirOp},
}


def _setup(env: Env, base: dict, target: dict) -> tuple[Path, dict]:  # type: ignore[type-arg]
    write_tree(env.release, base)
    tdir = env.work / "target"
    write_tree(tdir, target)
    os.chmod(tdir, stat.S_IMODE(env.release.stat().st_mode))
    return env.pack(B1, env.release, tdir), listing(tdir)


def _install_and_check(env: Env, bundle: Path, expected: dict, clone: str,  # type: ignore[type-arg]
                       build: Build = B1, kind: str = "patch") -> Path:
    """Install through a real lifecycle; the tree must equal ``expected`` and the
    release's listing must not change."""
    before = listing_digest(env.release)
    with env.open() as lc:
        stage_download(lc, build, bundle)
        result = materialise(lc, env.request(build, lc.download_path(build), kind, clone))  # type: ignore[arg-type]
        lc.promote_to_next_boot(build)  # the updater's next step
        tree = lc.tree_path(build)
        assert lc.pointers.next_boot == build
        assert lc.boot_target() == (build, tree)
        assert isinstance(lc.state(build), Installed)
        assert lc.state(build) == result
        assert not lc.download_path(build).exists()
    assert listing(tree) == expected
    assert listing_digest(env.release) == before, "release_dir changed"
    assert leftovers(env.state) == []
    problem = verify_tree(tree, result.files)
    assert problem is None
    return tree


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def test_bundle_covers_every_op_kind_and_type_change(env: Env) -> None:
    """The packed tree pair really holds each op kind and type change the tests claim."""
    bundle, _ = _setup(env, BASE, TARGET)
    ops = read_header_unverified(bundle).ops
    kinds: dict[str, set[type]] = {}
    for op in ops:
        kinds.setdefault(op.path, set()).add(type(op))
    for path, wanted in EXPECTED_OPS.items():
        assert wanted <= kinds.get(path, set()), (path, kinds.get(path))


@pytest.mark.parametrize("clone", ["hardlink", "copy", "auto"])
def test_every_type_change_installs_exactly(env: Env, clone: str) -> None:
    """file→dir, dir→file, dir→link, link→file, file→link, link→dir, dir delete, delta,
    mode-only, read-only dir, retargeted link: the tree is exact, the release untouched."""
    bundle, expected = _setup(env, BASE, TARGET)
    release_inodes = {p: (env.release / p).stat().st_ino for p in ("keep/a", "replaced")}
    tree = _install_and_check(env, bundle, expected, clone)
    same_inode = (tree / "keep/a").stat().st_ino == release_inodes["keep/a"]
    assert same_inode == (clone in ("hardlink", "auto")), "clone method not the one asked"
    assert (tree / "replaced").stat().st_ino != release_inodes["replaced"]
    assert (env.release / "replaced").read_bytes() == b"old content of a hard-linked file"
    assert stat.S_IMODE((env.release / "modeonly").stat().st_mode) == 0o644


def test_second_patch_replaces_first_and_keeps_release(env: Env) -> None:
    """Patch 2 (cumulative against the release) installs beside patch 1; both are exact."""
    bundle, expected = _setup(env, BASE, TARGET)
    _install_and_check(env, bundle, expected, "hardlink")
    t2 = env.work / "target2"
    write_tree(t2, {**TARGET, "keep": ("dir", 0o755, {"a": ("file", b"changed", 0o600)})})
    b2 = env.pack(Build(R, 2), env.release, t2)
    _install_and_check(env, b2, listing(t2), "hardlink", build=Build(R, 2))
    with env.open() as lc:
        assert lc.state(B1) is None, "the never-booted patch 1 should have been retired"


def test_full_bundle_installs_from_empty(env: Env) -> None:
    """A full bundle builds (R', 0) from nothing under builds/R'/0/tree."""
    write_tree(env.release, BASE)
    target = env.work / "full"
    write_tree(target, {**TARGET, "VERSION": ("file", b"2.0\n", 0o644)})
    os.chmod(target, 0o755)
    bundle = env.pack(Build("2.0", 0), None, target)
    tree = _install_and_check(env, bundle, listing(target), "auto", Build("2.0", 0), "full")
    assert tree == env.state / "builds/2.0/0/tree"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=tree_specs, target=tree_specs)
def test_random_tree_pairs_install_exactly(base: dict, target: dict) -> None:  # type: ignore[type-arg]
    """Any base/target pair of files, dirs and links installs exactly with hard links."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        env = make_env(Path(tmp))
        version = {"VERSION": ("file", b"1.0\n", 0o644)}
        bundle, expected = _setup(env, {**base, **version}, {**target, **version})
        _install_and_check(env, bundle, expected, "hardlink")


def test_full_bundle_of_the_os_release_is_refused(env: Env) -> None:
    """A full bundle for (os_release, 0) would be renamed over release_dir: refused."""
    write_tree(env.release, BASE)
    bundle = env.pack(Build(R, 0), None, env.release)
    before = listing_digest(env.release)
    with env.open() as lc, pytest.raises(UsageError, match="never writes there"):
        materialise(lc, env.request(Build(R, 0), bundle, kind="full"))
    assert listing_digest(env.release) == before


# --- reflink ------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_EXTENT_SHARED = 0x2000


def _extents_shared(path: Path) -> bool:
    """True when the file's first extent is shared (FIEMAP): a reflink, not a copy."""
    import fcntl

    buf = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, 1, 0) + b"\0" * 56)
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = struct.unpack_from("=I", buf, 20)[0]
    flags = struct.unpack_from("=I", buf, 32 + 40)[0]
    return bool(mapped) and bool(flags & FIEMAP_EXTENT_SHARED)


def _supports_reflink(directory: Path) -> bool:
    src = directory / ".reflink-src"
    src.write_bytes(b"x" * 4096)
    try:
        return clone_mod._try_reflink(src, directory)
    finally:
        src.unlink()


@pytest.fixture
def reflink_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem with FICLONE: PATCHD_REFLINK_DIR, tmp_path itself, or
    (as root with mkfs.btrfs) a loop-mounted btrfs image; skipped with the reason otherwise."""
    given_dir = os.environ.get("PATCHD_REFLINK_DIR")
    if given_dir:
        d = Path(tempfile.mkdtemp(dir=given_dir))
        yield d
        shutil.rmtree(d)
        return
    if _supports_reflink(tmp_path):
        yield tmp_path
        return
    mkfs = shutil.which("mkfs.btrfs")
    if not IS_ROOT or mkfs is None:
        pytest.skip("no reflink-capable filesystem: tmp_path has no FICLONE and a btrfs loop "
                    "mount needs root and mkfs.btrfs (or set PATCHD_REFLINK_DIR)")
    image, mnt = tmp_path / "btrfs.img", tmp_path / "btrfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(160 * 1024 * 1024)
    subprocess.run([mkfs, "-q", str(image)], check=True, capture_output=True)
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot loop-mount btrfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("clone", ["reflink", "auto"])
def test_every_type_change_installs_with_reflink(reflink_dir: Path, clone: str) -> None:
    """On a CoW filesystem the clone shares extents with the release (FIEMAP says so),
    the tree is exact, and the release is untouched."""
    env = make_env(reflink_dir)
    bundle, expected = _setup(env, BASE, TARGET)
    tree = _install_and_check(env, bundle, expected, clone)
    assert (tree / "keep/b").stat().st_ino != (env.release / "keep/b").stat().st_ino
    assert _extents_shared(tree / "keep/b"), "keep/b was copied, not reflinked"


# --- hostile trees and bundles -----------------------------------------------------------


@pytest.mark.parametrize("op", [
    {"op": "dir", "path": "data/sub", "mode": 0o755},
    {"op": "symlink", "path": "data/l", "target": "x"},
    {"op": "delete", "path": "data/x"},
    "file",
    "delta",
])
def test_write_through_symlinked_base_dir_is_refused(env: Env, tmp_path: Path,
                                                     op: object) -> None:
    """release_dir/data -> outside: a bundle writing data/… is refused (bad input, for the
    updater to tombstone), and nothing outside the tree is written or removed."""
    outside = Path(tempfile.mkdtemp(dir="/tmp", prefix="patchd-outside-"))
    try:
        (outside / "x").write_bytes(b"outside file")
        outside_before = listing(outside)
        write_tree(env.release, {"VERSION": ("file", b"1.0\n", 0o644)})
        os.symlink(outside, env.release / "data")
        payloads: list[bytes] = []
        if op == "file":
            payloads = [b"pwned"]
            ops = [file_op("data/x", payloads[0], 0)]
        elif op == "delta":
            payloads = [b"\x28\xb5\x2f\xfd not really a frame"]
            ops = [{"op": "delta", "path": "data/x", "size": 5, "sha256": "0" * 64,
                    "base_sha256": "1" * 64, "mode": 0o644, "payload": "payload/0"}]
            ops[0]["size"] = len(payloads[0])
        else:
            ops = [op]  # type: ignore[list-item]
        bundle = craft_bundle(env.work / "evil.patchd",
                              signed_members(header_doc(ops, release=R, patch=1),
                                             [env.key], payloads))
        before = listing_digest(env.release)
        with env.open() as lc:
            stage_download(lc, B1, bundle)
            with pytest.raises(BundleInvalid) as info:
                materialise(lc, env.request(B1, lc.download_path(B1)))
            assert isinstance(info.value, UnsafePath), info.value
            assert info.value.bad_reason == BadReason.INVALID_BUNDLE.value
            _assert_left_for_the_updater(lc, env)
        assert listing(outside) == outside_before
        assert listing_digest(env.release) == before
        assert leftovers(env.state) == []
    finally:
        shutil.rmtree(outside)


def test_corrupt_payload_is_refused_and_keeps_release(env: Env) -> None:
    """A payload whose hash does not match: hash_mismatch, no staging, release untouched."""
    write_tree(env.release, {"VERSION": ("file", b"1.0\n", 0o644), "a": ("file", b"a", 0o644)})
    op = file_op("a", b"good", 0)
    bundle = craft_bundle(env.work / "bad.patchd",
                          signed_members(header_doc([op], release=R, patch=1), [env.key],
                                         [b"evil"]))
    before = listing_digest(env.release)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        with pytest.raises(PayloadHashMismatch) as info:
            materialise(lc, env.request(B1, lc.download_path(B1)))
        assert info.value.bad_reason == BadReason.HASH_MISMATCH.value
        assert not (env.state / "builds" / R / "1" / "tree").exists()
        _assert_left_for_the_updater(lc, env)
    assert listing_digest(env.release) == before
    assert leftovers(env.state) == []


# --- strict verification -----------------------------------------------------------------


def _strict_check(build: Build, state: Installed, tree: Path) -> str | None:
    return verify_tree(tree, state.files)


@pytest.mark.parametrize("tamper", ["modify", "symlink", "remove"])
def test_strict_verification_marks_tampered_tree_bad(env: Env, tamper: str) -> None:
    """A written file changed after install: validate_next_boot marks the build bad
    (validation_failed) and the boot target falls back to the release."""
    bundle, expected = _setup(env, BASE, TARGET)
    tree = _install_and_check(env, bundle, expected, "hardlink")
    with env.open() as lc:
        lc.validate_next_boot(_strict_check)
        assert lc.boot_target() == (B1, tree), "an intact tree must pass"
        victim = tree / "f2d" / "inner"
        if tamper == "modify":
            os.chmod(tree / "f2d", 0o755)
            victim.write_bytes(b"tampered")
        elif tamper == "symlink":
            victim.unlink()
            victim.symlink_to("../keep/a")
        else:
            victim.unlink()
        lc.validate_next_boot(_strict_check)
        state = lc.state(B1)
        assert isinstance(state, Bad) and state.reason is BadReason.VALIDATION_FAILED
        assert "f2d/inner" in state.detail
        assert lc.boot_target() == (Build(R, 0), env.release)


# --- start-up sweep ----------------------------------------------------------------------


def test_startup_removes_leftover_staging(env: Env) -> None:
    """A staging tree and probe files left by a crash go at Lifecycle.open; the download
    and its state stay, and the next install succeeds."""
    bundle, expected = _setup(env, BASE, TARGET)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        staging = lc.staging_path(B1)
        clone_tree(env.release, staging, "hardlink")
        (staging / ".patchd-tmp-half.1234").write_bytes(b"half")
        (staging.parent / ".patchd-tmp-link-probe").write_bytes(b"")
        (staging.parent / "tree").mkdir()  # renamed but never recorded
    with env.open() as lc:
        assert leftovers(env.state) == []
        assert not (env.state / "builds" / R / "1" / "tree").exists()
        assert isinstance(lc.state(B1), Downloaded)
        assert lc.download_path(B1).is_file()
    before = listing_digest(env.release)
    with env.open() as lc:
        materialise(lc, env.request(B1, lc.download_path(B1), clone="hardlink"))
        assert listing(lc.tree_path(B1)) == expected
    assert listing_digest(env.release) == before


# --- disk full ---------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs with 512 inodes for the state dir (needs root to mount)."""
    if not IS_ROOT:
        pytest.skip("disk-full tests mount a tmpfs, which needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=512", "tmpfs",
                           str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def _assert_left_for_the_updater(lc: Lifecycle, env: Env) -> None:
    """Bad input leaves no trace of the install: the state, the download and next_boot
    are as before, so the one caller that judges bad input (the updater) decides."""
    assert leftovers(env.state) == []
    assert isinstance(lc.state(B1), Downloaded)
    assert lc.download_path(B1).is_file()
    assert lc.pointers.next_boot == Build(R, 0)


def _assert_clean_abort(lc: Lifecycle, env: Env) -> None:
    """Nothing of the install remains; the download is kept and the attempt not counted."""
    assert leftovers(env.state) == []
    bdir = env.state / "builds" / R / "1"
    assert sorted(os.listdir(bdir)) == ["state.json"]
    state = lc.state(B1)
    assert isinstance(state, Downloaded) and state.attempts == 0, state
    assert lc.download_path(B1).is_file()
    assert lc.pointers.next_boot == Build(R, 0)


def test_disk_full_refused_up_front_then_succeeds(env: Env, small_tmpfs: Path) -> None:
    """unpacked_size larger than the free space: DiskFull before any write, nothing left,
    download kept, attempt not counted; after growing the filesystem it installs."""
    env.state = small_tmpfs / "state"
    base = {"VERSION": ("file", b"1.0\n", 0o644), "a": ("file", b"a" * 5000, 0o644)}
    target = {**base, "big": ("file", random.Random(1).randbytes(3 << 20), 0o644)}
    bundle, expected = _setup(env, base, target)
    before = listing_digest(env.release)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        free_before = os.statvfs(small_tmpfs).f_bfree
        with pytest.raises(DiskFull, match="bytes free"):
            materialise(lc, env.request(B1, lc.download_path(B1)))
        _assert_clean_abort(lc, env)
        assert os.statvfs(small_tmpfs).f_bfree == free_before
        _remount(small_tmpfs, "size=16m")
        materialise(lc, env.request(B1, lc.download_path(B1)))
        assert listing(lc.tree_path(B1)) == expected
    assert listing_digest(env.release) == before


def test_disk_full_while_writing_then_succeeds_after_freeing(env: Env,
                                                             small_tmpfs: Path) -> None:
    """The byte check passes but the filesystem runs out of inodes (a filler holds them)
    while writing: DiskFull, staging removed, download kept, attempt not counted; after
    the filler is deleted the install succeeds."""
    env.state = small_tmpfs / "state"
    base = {"VERSION": ("file", b"1.0\n", 0o644), "a": ("file", b"a", 0o644)}
    many = {f"n{i:03}": ("file", b"tiny", 0o644) for i in range(150)}
    target = {**base, "many": ("dir", 0o755, many)}
    bundle, expected = _setup(env, base, target)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        filler = small_tmpfs / "filler"
        filler.mkdir()
        while os.statvfs(small_tmpfs).f_ffree > 60:  # leave room for ~60 new entries
            (filler / str(len(os.listdir(filler)))).touch()
        inodes_before = os.statvfs(small_tmpfs).f_ffree
        with pytest.raises(DiskFull) as info:
            materialise(lc, env.request(B1, lc.download_path(B1)))
        assert "bytes free" not in str(info.value), "the up-front check was not meant to fire"
        _assert_clean_abort(lc, env)
        assert os.statvfs(small_tmpfs).f_ffree == inodes_before
        shutil.rmtree(filler)
        materialise(lc, env.request(B1, lc.download_path(B1)))
        assert listing(lc.tree_path(B1)) == expected



# --- an unprivileged daemon (User=patchd) -----------------------------------------------

NOBODY = 65534


def _install_as_nobody(env: Env, bundle: Path) -> int:
    """Fork; the child drops to uid/gid 65534 (modules already loaded) and installs."""
    import traceback  # loaded before the fork: the child cannot read /root

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with env.open() as lc:
                materialise(lc, env.request(B1, bundle))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_unprivileged_install_writes_into_read_only_release_dirs() -> None:
    """Without root (as uid 65534 when we are root): a release's read-only directory gets
    new files and loses old ones, keeps its mode in the new tree, and the release's
    root-owned files (not hard-linkable: protected_hardlinks) are copied, not changed."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="patchd-unpriv-"))
    try:
        os.chmod(root, 0o755)
        env = make_env(root)
        base = {"VERSION": ("file", b"1.0\n", 0o644),
                "ro": ("dir", 0o555, {"old": ("file", b"old", 0o444),
                                      "keep": ("file", b"keep", 0o644),
                                      "sub": ("dir", 0o555, {"s": ("file", b"s", 0o444)})})}
        target = {"VERSION": base["VERSION"],
                  "ro": ("dir", 0o555, {"keep": ("file", b"keep", 0o644),
                                        "new": ("file", b"new", 0o644),
                                        "sub": ("dir", 0o555, {"s": ("file", b"s", 0o444),
                                                               "t": ("file", b"t", 0o444)})})}
        bundle, expected = _setup(env, base, target)
        os.chmod(env.release, 0o755)
        before = listing_digest(env.release)
        with env.open() as lc:
            stage_download(lc, B1, bundle)
            download = lc.download_path(B1)
        if IS_ROOT:
            for path in (env.state, env.cache):
                subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(path)], check=True)
            assert _install_as_nobody(env, download) == 0
        else:
            with env.open() as lc:
                materialise(lc, env.request(B1, download))
        with env.open() as lc:
            tree = lc.tree_path(B1)
            assert lc.pointers.next_boot == B1
        assert listing(tree) == expected
        assert listing_digest(env.release) == before
        assert leftovers(env.state) == []
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], check=False)
        shutil.rmtree(root)


def test_copy_clone_counts_the_base_in_the_free_space_check(env: Env,
                                                            small_tmpfs: Path) -> None:
    """When the base must be copied (another filesystem), its size is part of the
    free-space check: a 3 MiB release into 2 MiB is refused before anything is written."""
    env.state = small_tmpfs / "state"
    base = {"VERSION": ("file", b"1.0\n", 0o644),
            "big": ("file", random.Random(2).randbytes(3 << 20), 0o644)}
    target = {**base, "small": ("file", b"small", 0o644)}
    bundle, expected = _setup(env, base, target)
    with env.open() as lc:
        stage_download(lc, B1, bundle)
        with pytest.raises(DiskFull, match="bytes free"):
            materialise(lc, env.request(B1, lc.download_path(B1)))
        _assert_clean_abort(lc, env)
        _remount(small_tmpfs, "size=16m")
        materialise(lc, env.request(B1, lc.download_path(B1)))
        assert listing(lc.tree_path(B1)) == expected
