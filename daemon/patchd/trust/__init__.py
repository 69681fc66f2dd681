"""What a host may believe: signatures, the manifest, bundles, and the update decision.

Everything from the repository is hostile until this layer has verified it. The
modules parse and verify bytes (``signing``, ``manifest``, ``root``, ``bundle_header``,
``bundle_reader``) or decide from verified data (``strategy``, pure). The layers above
fetch the bytes and carry out the decisions. One exception touches the host:
``root_store`` keeps the accepted root of trust (``root.json`` beside ``client.json``),
because what a host may believe must outlive a restart.
"""

from patchd.trust.bundle_header import (
    BundleHeader,
    DeleteOp,
    DeltaOp,
    DirOp,
    Expected,
    FileOp,
    Op,
    PayloadOp,
    SymlinkOp,
    check_expected,
    check_link_target,
    op_to_json,
    parse_header,
)
from patchd.trust.bundle_reader import (
    BundleReader,
    Payload,
    check_zstd_frames,
    open_bundle,
    read_header_unverified,
)
from patchd.trust.manifest import (
    BundleRef,
    FullEntry,
    Manifest,
    PatchEntry,
    ReleaseEntry,
    manifest_to_json,
    parse_manifest,
    verify_manifest,
)
from patchd.trust.root import Root, parse_root, verify_next
from patchd.trust.root_store import Bootstrap, RootKeeper
from patchd.trust.signing import (
    TrustedKeys,
    format_public_key,
    generate_key,
    key_id,
    load_private_key,
    parse_public_key,
    sign_document,
    verify_document,
)
from patchd.trust.strategy import NO_UPGRADE, Decision, HostView, decide, rolled_back_builds

__all__ = [
    "NO_UPGRADE",
    "Bootstrap",
    "BundleHeader",
    "BundleReader",
    "BundleRef",
    "Decision",
    "DeleteOp",
    "DeltaOp",
    "DirOp",
    "Expected",
    "FileOp",
    "FullEntry",
    "HostView",
    "Manifest",
    "Op",
    "PatchEntry",
    "Payload",
    "PayloadOp",
    "ReleaseEntry",
    "Root",
    "RootKeeper",
    "SymlinkOp",
    "TrustedKeys",
    "check_expected",
    "check_link_target",
    "check_zstd_frames",
    "decide",
    "format_public_key",
    "generate_key",
    "key_id",
    "load_private_key",
    "manifest_to_json",
    "op_to_json",
    "open_bundle",
    "parse_header",
    "parse_manifest",
    "parse_public_key",
    "parse_root",
    "read_header_unverified",
    "rolled_back_builds",
    "sign_document",
    "verify_document",
    "verify_manifest",
    "verify_next",
]
