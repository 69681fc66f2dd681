"""A FUSE passthrough filesystem that records every change to the tree, for power-cut tests.

SIGKILL keeps the page cache; a power cut keeps only what was made durable. To know
what a power cut at any instant would have kept, the test needs every operation that
changes the tree, in order, including each ``fsync`` of a file and of a directory. This
filesystem serves the tree of a backing directory (reads and writes go straight
through, so programs see an ordinary filesystem) and appends one JSON line per
operation to a log, which :mod:`support.crashstate` replays.

Run as its own process (``python -m support.powerfs BACKING MOUNT LOG``), single
threaded, so the log's order is the order the kernel delivered the requests in. Two
magic ``mkdir`` names at the mount's root are control requests, answered synchronously
so a test waits on the call itself, never on a timer (the ``mkdir`` fails with
``EALREADY``, the server's "done", since the kernel would otherwise look up a new entry):

- ``.powercut-checkpoint``: copy the backing tree to ``LOG.snapshot/`` (hard links
  kept) and start the log afresh: replay begins from that snapshot, taken as durable.
- ``.powercut-mark-LABEL``: record a label (which step of a scenario follows).

``syncfs(2)`` never reaches a FUSE server (the kernel forwards it only to virtiofs), so
it cannot be recorded; a program that relies on it for durability is, on this
filesystem, a program that never synced. That is deliberate: see docs/reliability.md.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CHECKPOINT = ".powercut-checkpoint"
MARK_PREFIX = ".powercut-mark-"
#: Records that change the tree (cut points); ``open``, ``release`` and ``mark`` do not.
MUTATING = frozenset({"create", "write", "truncate", "mkdir", "rename", "link", "symlink",
                      "unlink", "rmdir", "chmod", "fsync", "fsyncdir"})


def _serve(backing: Path, mount: Path, log_path: Path, ready_fd: int) -> None:
    import mfusepy  # a test dependency: imported only where the filesystem runs

    class Recorder(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.log = log_path.open("w", encoding="utf-8")

        # --- helpers ---

        def _p(self, path: str | None) -> str:
            assert path is not None
            return str(backing) + path

        def _rec(self, **fields: Any) -> None:
            self.log.write(json.dumps(fields, separators=(",", ":")) + "\n")

        @staticmethod
        def _os(func: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

        def _control(self, path: str) -> bool:
            name = path[1:]
            if name == CHECKPOINT:
                snap = Path(str(log_path) + ".snapshot")
                if snap.exists():
                    shutil.rmtree(snap)
                # cp -a keeps hard links among the copied files (clones link the release).
                subprocess.run(["cp", "-a", "--reflink=never", f"{backing}/.", str(snap)],
                               check=True)
                self.log.close()
                self.log = log_path.open("w", encoding="utf-8")
                return True
            if name.startswith(MARK_PREFIX):
                self._rec(op="mark", label=name[len(MARK_PREFIX):])
                self.log.flush()
                return True
            return False

        # --- lifecycle ---

        def init(self, path: str) -> None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

        def destroy(self, path: str) -> None:
            self.log.close()

        # --- reads ---

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
            st = self._os(os.fstat, fh) if path is None and fh is not None else \
                self._os(os.lstat, self._p(path))
            out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid",
                                               "st_gid", "st_ino", "st_rdev", "st_blocks")}
            out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                       st_ctime=st.st_ctime_ns, st_blksize=4096)
            return out

        def access(self, path: str, amode: int) -> int:
            return 0 if os.access(self._p(path), amode, follow_symlinks=False) \
                else -errno.EACCES

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            # With use_ino each entry needs its inode number: readdir(3) hides ino 0.
            out = []
            with os.scandir(self._p(path)) as entries:
                for e in entries:
                    st = e.stat(follow_symlinks=False)
                    out.append((e.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
            here = os.lstat(self._p(path))
            return [(".", {"st_mode": here.st_mode, "st_ino": here.st_ino}, 0),
                    ("..", {"st_mode": here.st_mode, "st_ino": 1}, 0), *out]

        def readlink(self, path: str) -> str:
            return str(self._os(os.readlink, self._p(path)))

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(self._p(path))
            return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                "f_bavail", "f_files", "f_ffree", "f_favail",
                                                "f_flag", "f_namemax")}

        def open(self, path: str, flags: int) -> int:
            fh = int(self._os(os.open, self._p(path), flags & ~os.O_CREAT))
            self._rec(op="open", path=path, fh=fh)
            if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                self._rec(op="truncate", path=path, fh=fh, length=0)
            return fh

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return bytes(self._os(os.pread, fh, size, offset))

        def opendir(self, path: str) -> int:
            return 0

        def releasedir(self, path: str | None, fh: int) -> int:
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            os.close(fh)
            self._rec(op="release", fh=fh)
            return 0

        # --- changes ---

        def create(self, path: str, mode: int, flags: int) -> int:
            existed = os.path.lexists(self._p(path))
            fh = int(self._os(os.open, self._p(path), flags | os.O_CREAT, mode))
            self._rec(op="create", path=path, fh=fh, mode=os.fstat(fh).st_mode & 0o7777,
                      existed=existed, trunc=bool(flags & os.O_TRUNC))
            return fh

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            n = int(self._os(os.pwrite, fh, data, offset))
            self._rec(op="write", fh=fh, offset=offset,
                      data=base64.b64encode(data[:n]).decode("ascii"))
            return n

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            if fh is not None:
                self._os(os.ftruncate, fh, length)
            else:
                self._os(os.truncate, self._p(path), length)
            self._rec(op="truncate", path=path, fh=fh, length=length)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            self._rec(op="fsync", path=path, fh=fh)
            self.log.flush()
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            self._rec(op="fsyncdir", path=path)
            self.log.flush()
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            if self._control(path):
                return -errno.EALREADY  # the kernel wants a new entry on success: none
            self._os(os.mkdir, self._p(path), mode)
            self._rec(op="mkdir", path=path, mode=os.lstat(self._p(path)).st_mode & 0o7777)
            return 0

        def rmdir(self, path: str) -> int:
            self._os(os.rmdir, self._p(path))
            self._rec(op="rmdir", path=path)
            return 0

        def unlink(self, path: str) -> int:
            self._os(os.unlink, self._p(path))
            self._rec(op="unlink", path=path)
            return 0

        def rename(self, old: str, new: str) -> int:
            self._os(os.rename, self._p(old), self._p(new))
            self._rec(op="rename", src=old, dst=new)
            return 0

        def link(self, target: str, source: str) -> int:
            self._os(os.link, self._p(source), self._p(target), follow_symlinks=False)
            self._rec(op="link", src=source, dst=target)
            return 0

        def symlink(self, target: str, source: str) -> int:
            self._os(os.symlink, source, self._p(target))
            self._rec(op="symlink", path=target, target=source)
            return 0

        def chmod(self, path: str | None, mode: int) -> int:
            if path is None:
                return 0  # an unlinked file: no name left to persist
            self._os(os.chmod, self._p(path), mode & 0o7777, follow_symlinks=False)
            self._rec(op="chmod", path=path, mode=mode & 0o7777)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            if path is not None:
                self._os(os.lchown, self._p(path), uid, gid)
            return 0

        def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
            if path is not None:
                self._os(os.utime, self._p(path), ns=times, follow_symlinks=False) \
                    if times else self._os(os.utime, self._p(path), follow_symlinks=False)
            return 0

    os.umask(0)  # modes arrive with the caller's umask applied already
    mfusepy.FUSE(Recorder(), str(mount), foreground=True, nothreads=True, use_ino=True,
                 hard_remove=True, fsname="powerfs")


def unavailable() -> str | None:
    """Why this filesystem cannot run here (a reason to skip), or None when it can."""
    if os.geteuid() != 0:
        return "power-cut tests mount a FUSE filesystem: they need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (apt-get install fuse3 libfuse3-3; .ci/run does)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy or libfuse3 unavailable: {exc}"
    return None


class PowerFs:
    """One mounted recorder: ``with PowerFs(backing, mount, log) as fs: ...``.

    Start returns once the kernel has completed the FUSE handshake (the server writes
    to a pipe from its ``init`` callback); stop unmounts and waits for the server.
    """

    def __init__(self, backing: Path, mount: Path, log: Path) -> None:
        self.backing, self.mount, self.log = backing, mount, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def snapshot(self) -> Path:
        return Path(str(self.log) + ".snapshot")

    def __enter__(self) -> PowerFs:
        self.mount.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with (self.log.parent / (self.log.name + ".err")).open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "support.powerfs", str(self.backing), str(self.mount),
                 str(self.log), str(write_fd)], pass_fds=(write_fd,), env=env,
                stdout=subprocess.DEVNULL, stderr=err)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            if ready.readline() != b"ready\n":
                self.proc.wait(timeout=10)
                err = (self.log.parent / (self.log.name + ".err")).read_text(errors="replace")
                raise RuntimeError(f"powerfs did not mount ({self.proc.returncode}): {err}")
        return self

    def checkpoint(self) -> None:
        """Snapshot the tree as durable and start the log afresh (returns when done)."""
        self._control(CHECKPOINT)

    def mark(self, label: str) -> None:
        """Label the operations that follow in the log."""
        self._control(f"{MARK_PREFIX}{label}")

    def _control(self, name: str) -> None:
        try:
            os.mkdir(self.mount / name)
        except OSError as exc:
            if exc.errno == errno.EALREADY:  # the server's "done"
                return
            raise
        raise RuntimeError(f"powerfs at {self.mount} did not answer control request {name}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def main(argv: list[str]) -> int:
    backing, mount, log_path = (Path(a) for a in argv[:3])
    ready_fd = int(argv[3])
    _serve(backing.resolve(), mount, log_path, ready_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
