"""The bundle reader refuses every tampered bundle with a specific error, writing nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from patchd.build.apply import apply_bundle
from patchd.core.errors import BundleInvalid, PayloadHashMismatch, SignatureInvalid, UnsafePath
from patchd.publisher.pack import pack
from patchd.trust import Expected, open_bundle
from patchd.trust.signing import public_raw, sign_document
from support.trees import (
    big_content,
    craft_bundle,
    file_op,
    header_doc,
    new_key,
    signed_members,
    snapshot,
    tar_member,
    trust_of,
    write_tree,
)

KEY, OTHER = new_key(), new_key()
TRUST = trust_of(KEY)
EXPECT = Expected(app="kiosk", kind="patch", release="1.0", patch=1, arch="x86_64")


class Sandbox:
    """A base tree copied to staging next to an 'outside' directory that must stay intact."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging, self.outside = root / "staging", root / "outside"
        write_tree(self.staging, {"keep": ("file", b"base", 0o644),
                                  "dir": ("dir", 0o755, {"x": ("file", b"x", 0o644)})})
        write_tree(self.outside, {"secret": ("file", b"do not touch", 0o600)})
        self.before = (snapshot(self.staging), snapshot(self.outside))

    def attempt(self, bundle: Path, trust: Any = TRUST, expected: Expected = EXPECT) -> None:
        with open_bundle(bundle, trust, expected) as reader:
            apply_bundle(reader, self.staging)

    def outside_untouched(self) -> bool:
        return snapshot(self.outside) == self.before[1]

    def staging_untouched(self) -> bool:
        return snapshot(self.staging) == self.before[0]


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def refused(box: Sandbox, bundle: Path, error: type[Exception], match: str,
            **kw: Any) -> None:
    with pytest.raises(error, match=match) as info:
        box.attempt(bundle, **kw)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {info.value!r}"
    assert box.outside_untouched()


def good_members(data: bytes = b"new content") -> list[tuple[tarfile.TarInfo, bytes]]:
    return signed_members(header_doc([file_op("new", data, 0)]), [KEY], [data])


def test_untampered_crafted_bundle_applies(box: Sandbox) -> None:
    """The crafting helper makes a valid bundle (so each refusal below is the tamper's)."""
    box.attempt(craft_bundle(box.root / "ok.patchd", good_members()))
    assert (box.staging / "new").read_bytes() == b"new content"


@pytest.mark.parametrize("compression", ["gzip", "plain"])
def test_gzip_and_plain_tar_accepted(box: Sandbox, compression: str) -> None:
    """The reader also opens gzip-compressed and uncompressed tar bundles."""
    box.attempt(craft_bundle(box.root / "ok.patchd", good_members(), compression))
    assert (box.staging / "new").read_bytes() == b"new content"


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_flipped_byte_in_header(box: Sandbox) -> None:
    """A header changed after signing fails the signature check before anything is read."""
    members = good_members()
    info, header = members[0]
    members[0] = (info, header.replace(b'"kiosk"', b'"kiosK"'))
    refused(box, craft_bundle(box.root / "b", members), SignatureInvalid,
            "0 of 1 signatures by trusted keys verify")
    assert box.staging_untouched()


def test_flipped_byte_in_signature(box: Sandbox) -> None:
    """A corrupted signature value does not verify."""
    members = good_members()
    sig = json.loads(members[1][1])
    raw = bytearray(base64.b64decode(sig["signatures"][0]["sig"]))
    raw[5] ^= 1
    sig["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    members[1] = tar_member("bundle.sig", json.dumps(sig).encode())
    refused(box, craft_bundle(box.root / "b", members), SignatureInvalid, "below the threshold")
    assert box.staging_untouched()


def test_malformed_signature_file(box: Sandbox) -> None:
    """A signature file that is not the specified JSON (docs/formats.md) is refused as not JSON."""
    members = good_members()
    members[1] = tar_member("bundle.sig", b"not json")
    refused(box, craft_bundle(box.root / "b", members), SignatureInvalid, "not JSON")


def test_flipped_byte_in_payload(box: Sandbox) -> None:
    """A payload byte changed in transit fails its hash; the old file stays, no temp left."""
    data = b"new content for keep"
    members = signed_members(header_doc([file_op("keep", data, 0)]), [KEY], [flip(data, 3)])
    refused(box, craft_bundle(box.root / "b", members), PayloadHashMismatch, "hashes to")
    assert box.staging_untouched()


def test_untrusted_key(box: Sandbox) -> None:
    """A bundle signed only by an unknown key is refused as not trusted."""
    members = signed_members(header_doc([file_op("new", b"x", 0)]), [OTHER], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), SignatureInvalid,
            "no signature by a trusted key")
    assert box.staging_untouched()


def test_below_threshold(box: Sandbox) -> None:
    """One valid signature where two distinct trusted keys are required is refused."""
    members = signed_members(header_doc([file_op("new", b"x", 0)]), [KEY, KEY], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), SignatureInvalid,
            "1 of 1 signatures by trusted keys verify, below the threshold of 2",
            trust=trust_of(KEY, OTHER, threshold=2))
    both = signed_members(header_doc([file_op("new", b"x", 0)]), [KEY, OTHER], [b"x"])
    box.attempt(craft_bundle(box.root / "c", both), trust=trust_of(KEY, OTHER, threshold=2))


def test_extra_member(box: Sandbox) -> None:
    """A member after the last payload is refused."""
    members = [*good_members(), tar_member("payload/1", b"surprise")]
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid,
            "unexpected member 'payload/1' after the last op")


def test_duplicate_and_out_of_order_members(box: Sandbox) -> None:
    """A duplicated header member or payloads in the wrong order are refused."""
    members = good_members()
    dup = [members[0], members[0], *members[1:]]
    refused(box, craft_bundle(box.root / "b", dup), BundleInvalid,
            "unexpected member 'bundle.json' where 'bundle.sig' belongs")
    doc = header_doc([file_op("n0", b"0", 0), file_op("n1", b"1", 1)])
    swapped = signed_members(doc, [KEY], [b"0", b"1"])
    swapped[2], swapped[3] = tar_member("payload/1", b"1"), tar_member("payload/0", b"0")
    refused(box, craft_bundle(box.root / "c", swapped), BundleInvalid,
            "unexpected member 'payload/1' where 'payload/0' belongs")
    assert box.staging_untouched()


@pytest.mark.parametrize(("type_", "what"), [(tarfile.SYMTYPE, "a link"),
                                             (tarfile.LNKTYPE, "a link"),
                                             (tarfile.CHRTYPE, "a device"),
                                             (tarfile.FIFOTYPE, "a device")])
def test_link_and_device_members(box: Sandbox, type_: bytes, what: str) -> None:
    """A symlink, hard link or device member is refused even under an expected name."""
    members = good_members()
    members[2] = tar_member("payload/0", type_=type_, linkname="/etc/passwd")
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, f"is {what}")
    assert box.staging_untouched()


@pytest.mark.parametrize("path", ["../x", "/etc/x", "a/../../x", "a//b", "a\\b", "./a", "a/"])
def test_unsafe_paths(box: Sandbox, path: str) -> None:
    """Unnormalised, absolute or escaping op paths are refused before anything is written."""
    members = signed_members(header_doc([file_op(path, b"x", 0)]), [KEY], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), UnsafePath, "path")
    assert box.staging_untouched()


def test_path_through_bundle_symlink(box: Sandbox) -> None:
    """A bundle that creates a symlink and then writes through it is refused up front."""
    ops = [{"op": "symlink", "path": "l", "target": "dir"}, file_op("l/evil", b"x", 0)]
    members = signed_members(header_doc(ops), [KEY], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), UnsafePath,
            "passes through the symlink 'l'")
    assert box.staging_untouched()


def test_path_through_tree_symlink(box: Sandbox) -> None:
    """A symlink already in the tree pointing outside never redirects a write."""
    os.symlink(box.outside, box.staging / "escape")
    for i, op in enumerate([file_op("escape/secret", b"pwned", 0),
                            {"op": "dir", "path": "escape/newdir", "mode": 0o755},
                            {"op": "delete", "path": "escape/secret"}]):
        members = signed_members(header_doc([op]), [KEY],
                                 [b"pwned"] if op["op"] == "file" else [])
        refused(box, craft_bundle(box.root / f"b{i}", members), UnsafePath,
                "'escape' is a symlink")
    assert (box.outside / "secret").read_bytes() == b"do not touch"


def test_delta_base_symlink_is_refused(box: Sandbox) -> None:
    """A delta whose base in the tree is a symlink to outside is never read through."""
    os.symlink(box.outside / "secret", box.staging / "link")
    data = b"whatever"
    op = {**file_op("link", data, 0), "op": "delta",
          "base_sha256": hashlib.sha256(b"do not touch").hexdigest()}
    members = signed_members(header_doc([op]), [KEY], [b"frame"])
    refused(box, craft_bundle(box.root / "b", members), UnsafePath, "is a symlink")


@pytest.mark.parametrize("target", ["/etc", "../x", "a/../../..", "a/./b", ""])
def test_escaping_symlink_ops(box: Sandbox, target: str) -> None:
    """Symlink ops whose target is absolute, unnormalised or leaves the tree are refused."""
    members = signed_members(header_doc([{"op": "symlink", "path": "l", "target": target}]),
                             [KEY], [])
    refused(box, craft_bundle(box.root / "b", members), UnsafePath, "symlink 'l'")


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1777])
def test_setuid_mode(box: Sandbox, mode: int) -> None:
    """setuid, setgid and sticky bits in an op's mode are refused."""
    members = signed_members(header_doc([file_op("new", b"x", 0, mode=mode)]), [KEY], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, "setuid")
    assert box.staging_untouched()


def test_payload_longer_than_op(box: Sandbox) -> None:
    """A payload member larger than its op's size is refused before it is written."""
    doc = header_doc([file_op("new", b"short", 0)], unpacked_size=1000)
    members = signed_members(doc, [KEY], [b"short but much longer"])
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, "its op says 5")
    assert box.staging_untouched()


def test_delta_decoding_longer_than_op(box: Sandbox) -> None:
    """A delta frame decoding to more bytes than the op says is stopped at op.size."""
    base = (box.staging / "keep").read_bytes()
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    result = base + b"x" * 50
    frame = zstandard.ZstdCompressor(dict_data=dictionary).compress(result)
    op = {"op": "delta", "path": "keep", "size": 10, "sha256": "0" * 64,
          "base_sha256": hashlib.sha256(base).hexdigest(), "mode": 0o644, "payload": "payload/0"}
    members = signed_members(header_doc([op]), [KEY], [frame])
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid,
            "longer than the 10 bytes its op says")
    assert box.staging_untouched()


def test_total_above_unpacked_size(box: Sandbox) -> None:
    """Ops writing more bytes in total than unpacked_size are refused up front."""
    doc = header_doc([file_op("a", b"12345", 0), file_op("b", b"678", 1)], unpacked_size=7)
    members = signed_members(doc, [KEY], [b"12345", b"678"])
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid,
            "ops write 8 bytes, more than unpacked_size 7")
    assert box.staging_untouched()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("app", "other", "app 'other'"),
    ("release", "2.0", "release '2.0'"),
    ("patch", 2, "patch 2"),
    ("arch", "aarch64", "arch 'aarch64'"),
])
def test_mix_and_match(box: Sandbox, field: str, value: Any, message: str) -> None:
    """A validly signed bundle for another app/release/patch/arch is refused."""
    doc = header_doc([file_op("new", b"x", 0)], **{field: value})
    members = signed_members(doc, [KEY], [b"x"])
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, message)
    assert box.staging_untouched()


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9, -1, -5])
@pytest.mark.parametrize("compression", ["zstd", "gzip", "plain"])
def test_truncated_archive(box: Sandbox, cut: float, compression: str) -> None:
    """A bundle cut short anywhere is refused (zstd, gzip and plain tar)."""
    data = big_content(3, 0)
    members = signed_members(header_doc([file_op("new", data, 0)]), [KEY], [data])
    full = craft_bundle(box.root / "full", members, compression).read_bytes()
    end = int(len(full) * cut) if cut > 0 else len(full) + int(cut)
    if compression == "plain" and cut < 0:
        end = len(full) - 1024 - 10240 // 2  # into the end-of-archive blocks
    (box.root / "cut").write_bytes(full[:end])
    with pytest.raises(BundleInvalid, match="truncated"):
        box.attempt(box.root / "cut")
    assert box.outside_untouched()
    assert not (box.staging / "new").exists()


def test_not_an_archive(box: Sandbox) -> None:
    """Random bytes are refused as a corrupt archive, not with a traceback from tarfile."""
    (box.root / "junk").write_bytes(os.urandom(4096))
    refused(box, box.root / "junk", BundleInvalid, "corrupt or truncated archive")


def test_oversized_pax_header_refused(box: Sandbox) -> None:
    """A giant pax header before the signature is refused instead of read into memory."""
    members = good_members()
    info = members[0][0]
    info.pax_headers = {"comment": "x" * (2 * 1024 * 1024)}
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, "meta header")


def _chain(n: int) -> list[dict[str, Any]]:
    return [{"op": "dir", "path": "/".join(["d"] * k), "mode": 0o755} for k in range(1, n + 1)]


def test_paths_deeper_than_the_limit_are_refused(box: Sandbox) -> None:
    """A tree of 256 parts applies; one part more is refused before anything is written
    (docs/formats.md#paths), as is a symlink op at that depth."""
    deepest = signed_members(header_doc(_chain(256)), [KEY], [])
    box.attempt(craft_bundle(box.root / "ok", deepest))
    assert (box.staging / "/".join(["d"] * 256)).is_dir()
    shutil.rmtree(box.staging / "d")
    box.before = (snapshot(box.staging), box.before[1])
    members = signed_members(header_doc(_chain(257)), [KEY], [])
    refused(box, craft_bundle(box.root / "b", members), UnsafePath,
            "path deeper than 256 parts")
    link = {"op": "symlink", "path": "/".join(["d"] * 257), "target": "x"}
    members = signed_members(header_doc([link]), [KEY], [])
    refused(box, craft_bundle(box.root / "c", members), UnsafePath, "deeper than 256")
    assert box.staging_untouched()


@pytest.mark.parametrize("op", [
    file_op("lib/x-\udcff", b"x", 0),
    {"op": "dir", "path": "\ud800", "mode": 0o755},
    {"op": "symlink", "path": "l", "target": "t\udcff"},
    {"op": "delete", "path": "a/\udfff"},
])
def test_names_that_are_no_unicode_are_refused(box: Sandbox, op: dict[str, Any]) -> None:
    """A path or link target holding a lone surrogate (JSON ``"\\udcff"``) could name a
    file on disk but never be written to state.json: refused as an unsafe path."""
    members = signed_members(header_doc([op]), [KEY], [b"x"] if op["op"] == "file" else [])
    assert b'\\ud' in members[0][1]  # valid JSON: the escape, not the character
    refused(box, craft_bundle(box.root / "b", members), UnsafePath, "not valid Unicode")
    assert box.staging_untouched()


@pytest.mark.parametrize("pax", [
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "payload/0",
     "GNU.sparse.realsize": "11"},
    {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "0,11"},
    {"GNU.sparse.size": "11", "GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
     "GNU.sparse.numbytes": "11"},
    {"GNU.sparse.map": "a,b"},
])
@pytest.mark.parametrize("member", [0, 2])
def test_gnu_sparse_members_are_invalid_bundles(box: Sandbox, pax: dict[str, str],
                                                member: int) -> None:
    """A GNU sparse member of any version, before or after the signature, is refused as
    BundleInvalid (tarfile raised a bare ValueError on a bad sparse map)."""
    members = good_members()
    members[member][0].pax_headers = pax
    refused(box, craft_bundle(box.root / "b", members), BundleInvalid, "GNU sparse file")


def test_old_gnu_sparse_type_is_an_invalid_bundle(box: Sandbox) -> None:
    """The old GNU sparse member type ('S') is refused the same way."""
    members = good_members()
    members[2][0].type = tarfile.GNUTYPE_SPARSE
    buf = box.root / "b"
    raw = b"".join(info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)
                   for info, data in members) + bytes(1024)
    buf.write_bytes(raw)
    refused(box, buf, BundleInvalid, "GNU sparse file")


def test_reader_requires_payload_read_to_end(tmp_path: Path) -> None:
    """Advancing past a payload that was not read to EOF is a programming error."""
    bundle = craft_bundle(tmp_path / "b", good_members())
    with open_bundle(bundle, TRUST, EXPECT) as reader:
        it = reader.ops(lambda p: b"")
        next(it)
        with pytest.raises(RuntimeError, match="not read to the end"):
            next(it)


# --- format conformance ----------------------------------------------------------------


def spec_reader(path: Path, public: bytes, base: Path, out: Path) -> None:
    """A reader written from docs/formats.md alone, with tarfile + zstandard + cryptography."""
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tf:
        members = iter(tf)
        m = next(members)
        assert m.name == "bundle.json"
        header_bytes = tf.extractfile(m).read()  # type: ignore[union-attr]
        m = next(members)
        assert m.name == "bundle.sig"
        sigs = json.loads(tf.extractfile(m).read())["signatures"]  # type: ignore[union-attr]
        kid = hashlib.sha256(public).hexdigest()[:16]
        sig = next(base64.b64decode(s["sig"]) for s in sigs if s["keyid"] == kid)
        Ed25519PublicKey.from_public_bytes(public).verify(sig, header_bytes)
        header = json.loads(header_bytes)
        assert header["format"] == "patchd-bundle/1"
        shutil.copytree(base, out, symlinks=True)
        for op in header["ops"]:
            target = out / op["path"]
            if op["op"] in ("file", "delta"):
                m = next(members)
                assert m.name == op["payload"] and m.isreg()
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if op["op"] == "delta":
                    d = zstandard.ZstdCompressionDict(
                        target.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                    data = zstandard.ZstdDecompressor(dict_data=d).decompressobj().decompress(
                        data)
                assert hashlib.sha256(data).hexdigest() == op["sha256"]
                target.unlink(missing_ok=True)
                target.write_bytes(data)
                target.chmod(op["mode"])
            elif op["op"] == "dir":
                target.mkdir(exist_ok=True)
                target.chmod(op["mode"])
            elif op["op"] == "symlink":
                target.unlink(missing_ok=True)
                target.symlink_to(op["target"])
            elif target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        assert next(members, None) is None


def packed(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = {"bin": ("dir", 0o755, {"app": ("file", big_content(5, 0) * 4, 0o755)}),
            "old": ("file", b"gone", 0o644), "lib": ("dir", 0o755, {})}
    target = {"bin": ("dir", 0o755, {"app": ("file", big_content(5, 2) * 4, 0o755)}),
              "lib": ("dir", 0o750, {"cur": ("link", 0, "v2"), "v2": ("file", b"", 0o644)}),
              "new": ("dir", 0o700, {})}
    write_tree(tmp_path / "base", base)
    write_tree(tmp_path / "target", target)
    out = tmp_path / "b.patchd"
    pack(app="kiosk", release="1.0", patch=1, kind="patch", arch="x86_64",
         base=tmp_path / "base", target=tmp_path / "target", private_keys=[KEY], out=out)
    return tmp_path / "base", tmp_path / "target", out


def test_spec_only_reader_opens_packed_bundle(tmp_path: Path) -> None:
    """A bundle from pack() is read by an independent reader following docs/formats.md alone."""
    base, target, out = packed(tmp_path)
    spec_reader(out, public_raw(KEY), base, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(target)


def test_delta_payload_decodes_with_zstd_patch_from(tmp_path: Path) -> None:
    """A delta payload is exactly what `zstd -d --patch-from=BASE` decodes."""
    base, target, out = packed(tmp_path)
    with open(out, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tf:
        header: dict[str, Any] = {}
        for m in tf:
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "bundle.json":
                header = json.loads(data)
            elif m.name == "payload/0":
                (tmp_path / "frame.zst").write_bytes(data)
    assert header["ops"][1]["op"] == "delta"
    subprocess.run(["zstd", "-q", "-d", f"--patch-from={base / 'bin/app'}",
                    str(tmp_path / "frame.zst"), "-o", str(tmp_path / "app")], check=True)
    assert (tmp_path / "app").read_bytes() == (target / "bin/app").read_bytes()


def test_sign_document_is_the_spec_format() -> None:
    """bundle.sig is {"signatures": [{"keyid": 16 hex, "sig": base64 of 64 bytes}]}."""
    doc = json.loads(sign_document(b"data", [KEY]))
    (entry,) = doc["signatures"]
    assert entry["keyid"] == hashlib.sha256(public_raw(KEY)).hexdigest()[:16]
    assert len(base64.b64decode(entry["sig"])) == 64

