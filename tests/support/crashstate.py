"""What a power cut after the k-th operation would leave on disk, from a powerfs log.

A power cut keeps only what was made durable. Two models, both replaying the ordered
log of :mod:`support.powerfs` from a snapshot taken as durable:

**strict** (what POSIX promises, and no more):

- a file's contents and mode are those of its last ``fsync``; a file whose name became
  durable but whose data was never fsynced is empty (a new inode) or keeps the
  contents of its last fsync;
- a directory's entries (create, mkdir, symlink, link, rename, unlink, rmdir) are as of
  the last ``fsync`` of *that* directory; a rename between two directories is two
  entry changes, each durable with its own directory; a new directory is empty until
  it is fsynced itself; a symlink's target is written with its inode.

The strict crash state changes only at an ``fsync``, so many cut points share one
state: the campaign checks each distinct state once and counts every cut point.

**weak** (a journaling filesystem that got further than it promised): the strict state
plus a random subset of the operations not yet made durable, each applied whole and in
order (a write lands with its bytes, a rename moves both of its entries). This allows
more than ext4 or XFS can produce, never less of what they keep; a program correct under
the strict model must stay correct here too.

Objects are tracked by identity, not by name: a hard link is two names of one inode, a
rename moves the inode, and an inode whose last name is gone stays alive for whatever
durable entry still names it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.powerfs import MUTATING

Op = dict[str, Any]


def read_log(path: Path) -> list[Op]:
    """Every record of a powerfs log, in order (a torn last line is dropped)."""
    ops = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ops.append(json.loads(line))
        except ValueError:
            break
    return ops


def cut_points(ops: list[Op]) -> list[int]:
    """Indexes into ``ops`` after which a cut is taken: 0 (before the first change),
    then after every operation that changes the tree."""
    return [0] + [i + 1 for i, op in enumerate(ops) if op["op"] in MUTATING]


@dataclass
class Node:
    """One inode: a file (``data``), a directory (``entries``) or a symlink (``target``).

    ``d_*`` fields are what the disk holds; the others are what programs see.
    """

    kind: str
    mode: int = 0o644
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, Node] = field(default_factory=dict)
    target: str = ""
    d_mode: int = 0o644
    d_data: bytes = b""
    d_entries: dict[str, Node] = field(default_factory=dict)

    def sync(self) -> None:
        self.d_mode = self.mode
        if self.kind == "dir":
            self.d_entries = dict(self.entries)
        elif self.kind == "file":
            self.d_data = bytes(self.data)
        else:  # a symlink's target is written with its inode
            self.d_data = self.target.encode()


def load_snapshot(root: Path) -> Node:
    """The snapshot as a durable tree; hard links become one node."""
    seen: dict[tuple[int, int], Node] = {}

    def load(path: Path) -> Node:
        st = path.lstat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return seen[key]
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            node = Node("dir", mode)
            for name in sorted(os.listdir(path)):
                node.entries[name] = load(path / name)
        elif stat.S_ISLNK(st.st_mode):
            node = Node("link", mode, target=os.readlink(path))
        else:
            node = Node("file", mode, data=bytearray(path.read_bytes()))
        node.sync()
        seen[key] = node
        return node

    return load(root)


class Replay:
    """The tree as programs saw it after each operation, and what the disk held."""

    def __init__(self, snapshot: Path, rng: random.Random | None = None,
                 keep_unsynced: float = 0.0) -> None:
        self.root = load_snapshot(snapshot)
        self.handles: dict[int, Node] = {}
        self.rng = rng
        self.keep = keep_unsynced  # weak model: chance that an unsynced op reached disk

    def _parent(self, path: str) -> tuple[Node, str]:
        parts = [p for p in path.split("/") if p]
        node = self.root
        for part in parts[:-1]:
            node = node.entries[part]
        return node, parts[-1]

    def _lookup(self, path: str) -> Node:
        if not path.strip("/"):
            return self.root
        parent, name = self._parent(path)
        return parent.entries[name]

    def _node(self, op: Op) -> Node | None:
        fh = op.get("fh")
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        path = op.get("path")
        return self._lookup(path) if path else None

    def apply(self, op: Op) -> None:
        """Apply one record to the visible tree; fsyncs (and, in the weak model, a
        random subset of the other changes) reach the disk."""
        kind = op["op"]
        durable = self.rng is not None and kind in MUTATING and \
            self.rng.random() < self.keep
        if kind in ("create", "mkdir", "symlink"):
            parent, name = self._parent(op["path"])
            if kind == "create" and op.get("existed") and name in parent.entries:
                node = parent.entries[name]
                if op.get("trunc"):
                    del node.data[:]
            else:
                node = Node({"create": "file", "mkdir": "dir", "symlink": "link"}[kind],
                            op.get("mode", 0o777), target=op.get("target", ""))
                node.d_mode = node.mode
                node.d_data = node.target.encode() if kind == "symlink" else b""
                parent.entries[name] = node
                if durable:
                    parent.d_entries[name] = node
            if kind == "create":
                self.handles[op["fh"]] = node
        elif kind == "open":
            self.handles[op["fh"]] = self._lookup(op["path"])
        elif kind == "release":
            self.handles.pop(op["fh"], None)
        elif kind in ("write", "truncate"):
            node = self._node(op)
            if node is None:
                return
            targets = [node.data] + ([bytearray(node.d_data)] if durable else [])
            for buf in targets:
                if kind == "write":
                    data = base64.b64decode(op["data"])
                    off = op["offset"]
                    if len(buf) < off:
                        buf.extend(b"\0" * (off - len(buf)))
                    buf[off:off + len(data)] = data
                else:
                    length = op["length"]
                    del buf[length:]
                    buf.extend(b"\0" * (length - len(buf)))
            if durable:
                node.d_data = bytes(targets[1])
        elif kind == "chmod":
            node = self._lookup(op["path"])
            node.mode = op["mode"]
            if durable:
                node.d_mode = node.mode
        elif kind == "fsync":
            node = self._node(op)
            if node is not None:
                node.sync()
        elif kind == "fsyncdir":
            self._lookup(op["path"]).sync()
        elif kind in ("rename", "link"):
            sp, sn = self._parent(op["src"])
            dp, dn = self._parent(op["dst"])
            node = sp.entries[sn]
            if kind == "rename":
                del sp.entries[sn]
            dp.entries[dn] = node
            if durable:
                if kind == "rename":
                    sp.d_entries.pop(sn, None)
                dp.d_entries[dn] = node
        elif kind in ("unlink", "rmdir"):
            parent, name = self._parent(op["path"])
            del parent.entries[name]
            if durable:
                parent.d_entries.pop(name, None)


def crash_states(snapshot: Path, ops: list[Op], *, seed: int | None = None,
                 keep_unsynced: float = 0.5, only: set[int] | None = None,
                 ) -> Iterator[tuple[int, Node]]:
    """(cut, durable tree) for every cut point (or those in ``only``), in order. ``seed``
    None: strict model; otherwise the weak model with that seed (one draw per cut).

    The strict model is one pass over the log; the weak model replays from the
    snapshot for each cut, so every cut gets its own independent subset.
    """
    cuts = cut_points(ops)
    if seed is None:
        replay = Replay(snapshot)
        done = 0
        for cut in cuts:
            for op in ops[done:cut]:
                replay.apply(op)
            done = cut
            if only is None or cut in only:
                yield cut, replay.root
        return
    rng = random.Random(seed)
    for cut in cuts:
        sub_seed = rng.getrandbits(64)
        if only is not None and cut not in only:
            continue
        replay = Replay(snapshot, random.Random(sub_seed), keep_unsynced)
        for op in ops[:cut]:
            replay.apply(op)
        yield cut, replay.root


def digest(root: Node) -> str:
    """A fingerprint of the durable tree: equal trees (same names, kinds, modes,
    contents, targets and hard-link grouping) have equal digests."""
    ids: dict[int, int] = {}
    h = hashlib.sha256()

    def walk(node: Node, path: str, stack: frozenset[int]) -> None:
        first = ids.setdefault(id(node), len(ids))
        h.update(f"{path}\0{node.kind}\0{node.d_mode:o}\0{first}\0".encode())
        if node.kind == "dir":
            if id(node) in stack:
                return
            for name in sorted(node.d_entries):
                walk(node.d_entries[name], f"{path}/{name}", stack | {id(node)})
        else:
            h.update(hashlib.sha256(node.d_data).digest())

    walk(root, "", frozenset())
    return h.hexdigest()


def materialise(root: Node, dest: Path, relocate: tuple[str, str] | None = None) -> None:
    """Write the durable tree into the empty or absent directory ``dest``.

    Hard links stay hard links; ``relocate=(old, new)`` rewrites absolute symlink
    targets under the mount point ``old`` to ``new`` (the disk mounted elsewhere).
    """
    dest.mkdir(parents=True, exist_ok=True)
    made: dict[int, Path] = {}
    dir_modes: list[tuple[Path, int]] = []

    def put(node: Node, path: Path, stack: frozenset[int]) -> None:
        if node.kind == "dir":
            if id(node) in stack:
                return  # a directory inside itself: only half of a move reached disk
            if path != dest:
                path.mkdir()
            for name, child in sorted(node.d_entries.items()):
                put(child, path / name, stack | {id(node)})
            dir_modes.append((path, node.d_mode))
            return
        if id(node) in made:
            os.link(made[id(node)], path, follow_symlinks=False)
            return
        if node.kind == "link":
            target = node.d_data.decode()
            if relocate and target.startswith(relocate[0] + "/"):
                target = relocate[1] + target[len(relocate[0]):]
            os.symlink(target, path)
        else:
            path.write_bytes(node.d_data)
            os.chmod(path, node.d_mode)
        made[id(node)] = path

    put(root, dest, frozenset())
    for path, mode in dir_modes:  # deepest first: a read-only directory is filled already
        os.chmod(path, mode)
