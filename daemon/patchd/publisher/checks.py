"""What the publisher refuses up front because a host would refuse it later.

Names follow the host's own rules (``patchd.core.model``: the config's app and channel
names, release names, architectures); a tree's ``VERSION`` is read the way the host
reads ``release_dir/VERSION`` (docs/lifecycle.md: its first line names the release);
private keys never sit in the directory that is served. Each failure is one
:class:`UsageError` naming the value and the rule.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from patchd.core.errors import UsageError
from patchd.core.model import is_valid_arch, is_valid_name, is_valid_release, version_line

#: A VERSION file is one short line; more than this is not one.
MAX_VERSION_BYTES = 4096

_NAME_RULE = ("lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, "
              "at most 64 characters")


def _checked(value: str, valid: bool, flag: str, what: str, rule: str) -> str:
    """``value`` when ``valid``; else the one message shape of every token check: the
    flag, the value (cut to 80 characters), what it should be and the rule."""
    if not valid:
        raise UsageError(f"{flag} {value[:80]!r} is not a valid {what}: {rule}")
    return value


def check_name(value: str, flag: str, what: str) -> str:
    """``--app`` / ``--channel``: the rule of ``[app] name`` and ``[server] channel``."""
    return _checked(value, is_valid_name(value), flag, f"{what} name",
                    f"use {_NAME_RULE} (hosts' configs refuse anything else)")


def check_release(value: str, flag: str = "--release") -> str:
    return _checked(value, is_valid_release(value), flag, "release name",
                    "letters, digits, '.', '_', '+', '~' or '-', starting with a letter or "
                    "digit, at most 128 characters")


def check_arch(value: str, flag: str = "--arch") -> str:
    return _checked(value, is_valid_arch(value), flag, "arch",
                    "letters, digits, '.', '_' or '-', starting with a letter or digit, at "
                    "most 64 characters (e.g. x86_64, aarch64, any)")


def tree_version(tree: Path, flag: str) -> str:
    """The release named by the first line of ``tree/VERSION``, as a host reads it."""
    path = Path(tree) / "VERSION"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UsageError(f"{flag} {tree} has no VERSION file; its first line must name "
                             "the release") from None
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symlink; VERSION must be a regular file") from None
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file")
        data = os.read(fd, MAX_VERSION_BYTES)
    finally:
        os.close(fd)
    first = version_line(data)
    if not first:
        raise UsageError(f"{path} is empty; its first line must name the release")
    if not is_valid_release(first):
        raise UsageError(f"{path}: {first[:64]!r} is not a valid release name")
    return first


def check_tree_versions(release: str, base: Path | None, target: Path) -> None:
    """A patch's base is the release itself, and both a patch's and a full bundle's
    target are trees of that release: each ``VERSION`` must name ``release``."""
    for flag, tree in (("--base", base), ("--target", target)):
        if tree is None:
            continue
        found = tree_version(tree, flag)
        if found != release:
            raise UsageError(f"{flag} {tree}: its VERSION says {found!r}, not --release "
                             f"{release!r}")


def check_keys_outside(repo: Path, keys: Sequence[object]) -> None:
    """A private key inside the repository directory would be served to every host."""
    served = Path(repo).resolve()
    for key in keys:
        if isinstance(key, str | Path) and Path(key).resolve().is_relative_to(served):
            raise UsageError(f"the private key {key} is inside the repository {repo}, which "
                             "is served to hosts; move it out of that directory")


def plural(n: int, word: str, many: str | None = None, *, counted: bool = True) -> str:
    """``1 file``, ``2 files``, ``3 directories``; without ``counted`` only the word."""
    text = word if n == 1 else (many or word + "s")
    return f"{n} {text}" if counted else text
