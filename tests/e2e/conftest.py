"""Fixtures of the end-to-end campaigns: a real nginx repository, a publisher, trees.

pytest puts ``tests/`` on ``sys.path`` only for modules directly in it (rootdir
conftest); the campaigns live one level down, so this conftest adds ``tests/`` itself
before anything imports ``support.*`` or ``invariants``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
E2E_DIR = Path(__file__).resolve().parent
for _p in (str(TESTS_DIR), str(E2E_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from patchd.core.model import Build  # noqa: E402
from support.daemon import DaemonProcess, Publisher, write_tree  # noqa: E402
from support.nginx import NGINX, NginxRepo, run_nginx  # noqa: E402

RELEASE = "1.4.0"
FULL = os.environ.get("PATCHD_FULL") == "1"


def make_release(root: Path, n_files: int, seed: int = 0, file_size: int = 0) -> Path:
    """A release tree of ``n_files`` small files in 20 directories, plus VERSION
    (``file_size`` bytes each when given, else 16–400)."""
    rng = random.Random(seed)
    write_tree(root, {"bin/kiosk": "#!/bin/sh\necho kiosk\n"}, version=RELEASE)
    for i in range(n_files):
        path = root / f"lib/d{i % 20:02d}/f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(file_size or rng.randint(16, 400)))
    os.chmod(root / "bin/kiosk", 0o755)
    return root


def make_target(release: Path, dest: Path, patch: int, big_bytes: int,
                n_edits: int = 40) -> Path:
    """Build ``patch``'s tree: the release with some files edited, a few deleted, a new
    directory, a link, and ``big_bytes`` of incompressible data (so downloads take time)."""
    shutil.copytree(release, dest, symlinks=True)
    rng = random.Random(1000 + patch)
    files = sorted(p for p in dest.rglob("*.txt"))
    for path in rng.sample(files, min(n_edits, len(files))):
        path.write_bytes(f"patch {patch}\n".encode() + rng.randbytes(64))
    for path in rng.sample(files, min(3, len(files))):
        if path.exists():
            path.unlink()
    write_tree(dest, {"lib/app.py": f"print('patch {patch}')\n",
                      f"share/p{patch}/notes.txt": f"patch {patch}\n"})
    os.symlink("../lib/app.py", dest / "share" / "app-link")
    if big_bytes:
        (dest / "share" / "blob.bin").write_bytes(rng.randbytes(big_bytes))
    return dest


@dataclass
class World:
    """A release, the publisher, nginx and the expected tree of each build."""

    tmp: Path
    nginx: NginxRepo
    publisher: Publisher
    release_dir: Path
    trees: dict[Build, Path] = field(default_factory=dict)
    bundles: dict[Build, Path] = field(default_factory=dict)
    daemons: list[DaemonProcess] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def manifest_url(self) -> str:
        rel = self.publisher.repo.relative_to(self.nginx.root)
        return self.nginx.url(f"{rel}/manifest.json")

    def add_patch(self, patch: int, big_bytes: int = 0, n_edits: int = 40) -> Path:
        """Make and pack patch ``patch`` (not published)."""
        target = make_target(self.release_dir, self.tmp / "trees" / f"p{patch}", patch,
                             big_bytes, n_edits)
        build = Build(RELEASE, patch)
        self.trees[build] = target
        self.bundles[build] = self.publisher.bundle(RELEASE, patch, self.release_dir, target)
        return self.bundles[build]

    def publish(self, patch: int) -> None:
        """Publish ``patch``. nginx's ETag is the manifest's size and its mtime in whole
        seconds: a manifest of the same size as the last one (a rollback's), written in
        the same second, would look unchanged (a 304), so its mtime moves past the last."""
        manifest = self.publisher.repo / "manifest.json"
        before = int(manifest.stat().st_mtime) if manifest.exists() else None
        self.publisher.publish(self.bundles[Build(RELEASE, patch)])
        if before is not None and int(manifest.stat().st_mtime) <= before:
            os.utime(manifest, (before + 1, before + 1))

    def daemon(self, name: str, extra: str = "", env: dict[str, str] | None = None,
               work: Path | None = None) -> DaemonProcess:
        d = DaemonProcess(work or self.tmp / name, manifest_url=self.manifest_url,
                          keys=[self.publisher.public], release_dir=self.release_dir,
                          extra=extra, env=env)
        self.daemons.append(d)
        return d

    def close(self) -> None:
        for d in self.daemons:
            d.close()
        self.daemons.clear()


def _need_nginx() -> None:
    if not Path(NGINX).exists() or shutil.which(NGINX) is None:
        pytest.skip(f"nginx not installed at {NGINX} (CI installs it)")


@contextlib.contextmanager
def open_world(tmp: Path, n_files: int, file_size: int = 0) -> Iterator[World]:
    """nginx serving ``tmp/repo``, a release of ``n_files`` files, a publisher."""
    _need_nginx()
    root = tmp / "repo"
    root.mkdir(parents=True)
    release = make_release(tmp / "opt" / "kiosk", n_files, file_size=file_size)
    with run_nginx(root, tmp / "nginx") as nginx:
        world = World(tmp, nginx, Publisher(tmp, root / "stable"), release)
        try:
            yield world
        finally:
            world.close()


@pytest.fixture
def small_world(tmp_path: Path) -> Iterator[World]:
    """A 40-file release with nginx and a publisher (bundles made by the test)."""
    with open_world(tmp_path, 40) as world:
        yield world


@pytest.fixture(scope="module")
def matrix_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One nginx, a 40-file release and packed patches 1–4, shared by the failpoint matrix."""
    with open_world(tmp_path_factory.mktemp("fpm"), 40) as world:
        for patch in (1, 2, 3, 4):
            world.add_patch(patch, big_bytes=64 * 1024)
        yield world


@pytest.fixture(scope="module")
def crash_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A release of a few thousand files and a multi-MB patch 1, published."""
    n_files, blob = (3000, 8 << 20) if FULL else (1500, 3 << 20)
    with open_world(tmp_path_factory.mktemp("crash"), n_files) as world:
        world.add_patch(1, big_bytes=blob, n_edits=200)
        world.publish(1)
        world.info.update(n_files=n_files, blob=blob)
        yield world


@pytest.fixture
def tiny_world(tmp_path: Path) -> Iterator[World]:
    """A 2.5 MiB release (250 × 10 KiB), patch 1 with a 1 MiB blob, patch 2 with 5 MiB."""
    with open_world(tmp_path, 250, file_size=10 * 1024) as world:
        world.add_patch(1, big_bytes=1 << 20, n_edits=5)
        world.add_patch(2, big_bytes=5 << 20, n_edits=5)
        yield world
