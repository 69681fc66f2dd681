"""Install test helpers: a release tree with a state store around it, a downloaded bundle,
tree listings — and, run as a script, a child process that installs one bundle.

``python install_child.py STATE CACHE RELEASE_DIR BUNDLE RELEASE PATCH KIND CLONE PUBHEX``
opens the lifecycle (its start-up sweep runs), prints ``ready`` once it is about to call
``materialise()``, installs, then prints ``done``. The crash test SIGKILLs it in between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patchd.build.clone import CloneMode
from patchd.build.install import InstallRequest, materialise
from patchd.core.model import Build
from patchd.publisher.pack import pack
from patchd.state.lifecycle import Lifecycle
from patchd.trust.signing import TrustedKeys, public_raw

APP = "kiosk"
ARCH = "any"


@dataclass
class Env:
    """Directories of one app on a host, and the publisher key its bundles are signed with."""

    state: Path
    cache: Path
    release: Path
    work: Path
    key: Ed25519PrivateKey

    @property
    def trust(self) -> TrustedKeys:
        return TrustedKeys.from_raw([public_raw(self.key)], 1)

    def open(self) -> Lifecycle:
        return Lifecycle.open(self.state, self.cache, self.release)

    def request(self, build: Build, bundle: Path, kind: str = "patch",
                clone: CloneMode = "auto", min_free: int = 0) -> InstallRequest:
        return InstallRequest(build=build, bundle=bundle, kind=kind,  # type: ignore[arg-type]
                              app=APP, arch=ARCH, trust=self.trust, clone=clone,
                              min_free=min_free)

    def pack(self, build: Build, base: Path | None, target: Path) -> Path:
        out = self.work / f"{build.release}-{build.patch}-{len(os.listdir(self.work))}.patchd"
        pack(app=APP, release=build.release, patch=build.patch,
             kind="patch" if build.patch else "full", arch=ARCH, base=base, target=target,
             private_keys=[self.key], out=out)
        return out


def make_env(root: Path, *, state: Path | None = None, cache: Path | None = None,
             release: Path | None = None) -> Env:
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    return Env(state=state or root / "state", cache=cache or root / "cache",
               release=release or root / "release", work=work,
               key=Ed25519PrivateKey.generate())


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stage_download(lc: Lifecycle, build: Build, bundle: Path) -> Path:
    """Put ``bundle`` where the downloader would have, with the states it would record."""
    sha, size = file_sha(bundle), bundle.stat().st_size
    lc.record_download_started(build, f"https://updates.example/{build}.patchd", sha, size)
    dest = lc.download_path(build)
    shutil.copyfile(bundle, dest)
    lc.record_download_complete(build)
    return dest


def listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: type, SHA-256 of content, permission bits, link target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", file_sha(Path(full)), stat.S_IMODE(st.st_mode))
    out["."] = ("dir", stat.S_IMODE(os.lstat(root).st_mode))
    return out


def listing_digest(root: Path) -> str:
    """One SHA-256 over :func:`listing`: equal digests mean identical trees."""
    return hashlib.sha256(json.dumps(sorted(listing(root).items())).encode()).hexdigest()


def leftovers(state_dir: Path) -> list[str]:
    """Staging trees and temp files anywhere under ``state_dir`` (there should be none)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(state_dir):
        for name in dirnames + filenames:
            if name == ".staging-tree" or name.startswith(".patchd-tmp-"):
                found.append(os.path.join(dirpath, name))
    return found


def main(argv: list[str]) -> int:
    # stdout carries only the "ready"/"done" protocol lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    state, cache, release, bundle, rel, patch, kind, clone, pubhex = argv
    trust = TrustedKeys.from_raw([bytes.fromhex(pubhex)], 1)
    with Lifecycle.open(Path(state), Path(cache), Path(release)) as lc:
        req = InstallRequest(build=Build(rel, int(patch)), bundle=Path(bundle),
                             kind=kind,  # type: ignore[arg-type]
                             app=APP, arch=ARCH, trust=trust,
                             clone=clone)  # type: ignore[arg-type]
        print("ready", flush=True)
        materialise(lc, req)
        lc.promote_to_next_boot(req.build)  # as the updater does next
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
