"""The listening socket's file on disk: taking the path safely and giving it back.

A server restarts over the file its crashed predecessor left, but must never steal
the path from a live server nor delete a file that is not a socket, and no client may
connect while the socket still has the umask's mode. All of that is decided here.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import structlog

from .errors import AddressInUse

log = structlog.get_logger(__name__)


def _check_not_live(path: Path) -> None:
    """Refuse ``path`` when something answers there; a stale socket is fine (replaced)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(
            f"{path} exists and is not a socket; remove it or use another path", path=path
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("varlink.stale_socket_replaced", path=str(path))
            return
        except OSError as exc:  # EAGAIN (full backlog), timeout: someone is there
            raise AddressInUse(f"{path} is busy ({exc})", path=path, live=True) from exc
    raise AddressInUse(f"another process is listening on {path}", path=path, live=True)


def bind_unix_socket(path: Path, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode``/``gid``; returns it and its inode.

    The socket is bound under a temporary name, given its mode and group, put in
    listen state and only then renamed over ``path``. So no client can ever connect
    while the mode is still the umask's, and a stale socket file is replaced
    atomically. (``anyio.create_unix_listener`` would unlink any socket file, a live
    server's included, and chmod only after listening.)

    ``AddressInUse`` when the path is taken; ``PermissionError`` when this process may
    not give the socket to ``gid`` (whether it should is the caller's policy).
    """
    _check_not_live(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(temp))
        except OSError as exc:
            raise AddressInUse(f"cannot create the socket {path}: {exc}", path=path) from exc
        os.chmod(temp, mode)
        if gid is not None:
            try:
                os.chown(temp, -1, gid)
            except PermissionError as exc:
                # Named after the socket's real path, not the temporary one chown saw.
                raise PermissionError(
                    f"cannot give the socket {path} to group {gid}: {exc.strerror}"
                ) from None
        sock.listen(4096)
        sock.setblocking(False)
        os.rename(temp, path)
        return sock, os.stat(path).st_ino
    except BaseException:
        sock.close()
        temp.unlink(missing_ok=True)
        raise


def unlink_if_same(path: Path, inode: int) -> None:
    """Remove our socket file at exit, unless another process has replaced it since."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
