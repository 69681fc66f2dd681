"""Every path patchd keeps on the host, named once.

Callers never join path parts by hand: they ask the :class:`Layout` of their app, so a
file's name lives in one place and start-up repair, cleanup and the writers agree on
it. The tree it describes::

    state_dir/
      .lock                          flock: one process per state directory
      pointers.json                  the boot pointers (docs/lifecycle.md, plus "os_release")
      client.json                    client id; per channel, accepted serial and validators
      hold.json                      the operator's hold, while one is placed
      root.json                      the accepted root of trust and its bootstrap
      events.json                    events not yet delivered to the collector
      current -> builds/R/N/tree     next boot's tree (absolute path for release_dir)
      builds/R/N/state.json          one build's state (docs/lifecycle.md)
      builds/R/N/tree/               its installed tree
      builds/R/N/.staging-tree/      the installer's work in progress
      builds/R/N/.patchd-tmp-old-tree-*  a tree moved aside by a reinstall
      builds/.trash-*                a tree or build directory being deleted (state/trash.py)
      set-aside/                     what start-up repair could not remove (never read)
    cache_dir/downloads/
      R-N.patchd                     a partial or complete download
      R-N.patchd.meta                the origin's validators, for If-Range
    cache_dir/set-aside/             as in state_dir

Pure path arithmetic: nothing here touches the filesystem. The bare names are module
constants too, for code that walks a directory and must recognise what it finds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from patchd.core.fsio import TEMP_PREFIX
from patchd.core.model import Build

__all__ = [
    "BUILDS_DIR",
    "CLIENT_FILE",
    "CURRENT_LINK",
    "DOWNLOADS_DIR",
    "DOWNLOAD_META_SUFFIX",
    "DOWNLOAD_SUFFIX",
    "EVENTS_FILE",
    "HOLD_FILE",
    "LOCK_FILE",
    "OLD_TREE_PREFIX",
    "POINTERS_FILE",
    "SET_ASIDE_DIR",
    "STAGING_DIR",
    "STATE_FILE",
    "TRASH_PREFIX",
    "TREE_DIR",
    "DownloadFiles",
    "Layout",
]

LOCK_FILE = ".lock"
POINTERS_FILE = "pointers.json"
CLIENT_FILE = "client.json"
ROOT_FILE = "root.json"
EVENTS_FILE = "events.json"
HOLD_FILE = "hold.json"
CURRENT_LINK = "current"
BUILDS_DIR = "builds"
STATE_FILE = "state.json"
TREE_DIR = "tree"
STAGING_DIR = ".staging-tree"
#: A build's tree moved aside by a reinstall while a host may still run it.
OLD_TREE_PREFIX = TEMP_PREFIX + "old-tree-"
#: In ``builds/``: what a transition dropped, deleted outside the lifecycle's lock. Not a
#: release name: the start-up sweep queues whatever a crash left of it for deletion again.
TRASH_PREFIX = ".trash-"
DOWNLOADS_DIR = "downloads"
#: Where start-up repair moves what it could not remove (a mount point, an unlistable
#: directory, a directory where a state file belongs); nothing reads it again.
SET_ASIDE_DIR = "set-aside"
DOWNLOAD_SUFFIX = ".patchd"
DOWNLOAD_META_SUFFIX = ".meta"


@dataclass(frozen=True, slots=True)
class DownloadFiles:
    """A download and its companion: the two live and go together.

    ``meta`` holds the origin's ETag/Last-Modified so a resume can send If-Range.
    """

    data: Path
    meta: Path

    @classmethod
    def beside(cls, data: Path) -> DownloadFiles:
        """The pair for a download at ``data`` (a local bundle, a benchmark's file)."""
        return cls(data, data.with_name(data.name + DOWNLOAD_META_SUFFIX))

    def __iter__(self) -> Iterator[Path]:
        """Both paths, data first: ``for path in files: remove(path)``."""
        return iter((self.data, self.meta))


@dataclass(frozen=True, slots=True)
class Layout:
    """The on-disk places of one app's state and cache directories."""

    state_dir: Path
    cache_dir: Path

    STATE_FILE = STATE_FILE
    TREE_DIR = TREE_DIR
    STAGING_DIR = STAGING_DIR
    DOWNLOAD_SUFFIX = DOWNLOAD_SUFFIX

    # --- state_dir ---

    @property
    def lock(self) -> Path:
        return self.state_dir / LOCK_FILE

    @property
    def pointers(self) -> Path:
        return self.state_dir / POINTERS_FILE

    @property
    def client(self) -> Path:
        return self.state_dir / CLIENT_FILE

    @property
    def root(self) -> Path:
        """The accepted root of trust (``trust.root_store`` keeps it)."""
        return self.state_dir / ROOT_FILE

    @property
    def events(self) -> Path:
        return self.state_dir / EVENTS_FILE

    @property
    def hold(self) -> Path:
        """The operator's hold (``state.hold``); absent when the host is not held."""
        return self.state_dir / HOLD_FILE

    @property
    def current(self) -> Path:
        return self.state_dir / CURRENT_LINK

    @property
    def builds(self) -> Path:
        return self.state_dir / BUILDS_DIR

    def release_dir(self, release: str) -> Path:
        """``builds/R``: every build of one release."""
        return self.builds / release

    def build_dir(self, build: Build) -> Path:
        return self.builds / build.release / str(build.patch)

    def state_file(self, build: Build) -> Path:
        return self.build_dir(build) / self.STATE_FILE

    def tree(self, build: Build) -> Path:
        """Where an installed build's tree is (the OS release's is ``release_dir``)."""
        return self.build_dir(build) / self.TREE_DIR

    def staging(self, build: Build) -> Path:
        """Where the installer builds the tree, beside its final place (one rename)."""
        return self.build_dir(build) / self.STAGING_DIR

    # --- cache_dir ---

    @property
    def downloads(self) -> Path:
        return self.cache_dir / DOWNLOADS_DIR

    def download(self, build: Build) -> DownloadFiles:
        data = self.downloads / f"{build.release}-{build.patch}{self.DOWNLOAD_SUFFIX}"
        return DownloadFiles.beside(data)
