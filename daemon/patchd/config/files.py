"""Config values that are files: checked when the config is read, at start, at every
reload and by ``patchd config check`` alike, so an operator learns about a missing CA
or a world-readable token file from ``config check`` rather than from the first poll.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from typing import Any

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Headers patchd sets itself per request; a headers file may not override them.
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "range",
                     "if-range", "if-none-match", "if-modified-since", "accept-encoding"}
#: A headers file (tokens) larger than this is refused.
MAX_HEADERS_FILE = 64 * 1024


def abs_path_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value.startswith("/"):
        raise ValueError(f"expected an absolute path, got {value!r}")
    return value


def readable_file(value: Any) -> str:
    """An absolute path of a regular file this process can read (checked now, so
    ``config check`` run as the daemon's user finds what ``run`` would). ``""`` is
    "not set", as ``config check`` prints it."""
    if value == "":
        return ""
    text = abs_path_text(value)
    try:
        st = os.stat(text)
    except OSError as exc:
        raise ValueError(f"cannot use {text}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{text} is not a regular file")
    if not os.access(text, os.R_OK):
        raise ValueError(f"{text} is not readable by this user")
    return text


def ca_file(value: Any) -> str:
    path = readable_file(value)
    if not path:
        return ""
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{path} holds no usable PEM CA certificate ({exc})") from None
    return path


def read_headers_file(path: str) -> tuple[tuple[str, str], ...]:
    """``Name: value`` lines (``#`` comments, blank lines ignored) of a secret file.

    Refused when group or others may read it: it holds tokens. ValueError names the
    line and what is wrong, never the value.
    """
    st = os.stat(path)
    if st.st_mode & 0o044:
        raise ValueError(f"{path} is readable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); it holds secrets: chmod 600 it")
    if st.st_size > MAX_HEADERS_FILE:
        raise ValueError(f"{path} is larger than {MAX_HEADERS_FILE} bytes")
    with open(path, "rb") as f:
        raw = f.read(MAX_HEADERS_FILE + 1)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not ASCII text") from None
    headers: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _HEADER_NAME_RE.match(name) or not value:
            raise ValueError(f"{path} line {n}: expected 'Name: value'")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{path} line {n}: patchd sets {name} itself")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"{path} line {n}: control character in the value")
        headers.append((name, value))
    return tuple(headers)
