"""``REPO/patchd-publish.toml``: defaults for ``patchd publish --repo REPO`` (docs/publishing.md).

The publisher's own file, never part of what hosts read: app, channel, signers
(``key`` paths relative to the file, ``sign_cmd``), ``expires``, the rollout of
new patches and how many releases the manifest keeps. Options on the command line
override it. It holds no secret, only the path to one, and that path must lead out of
the repository directory (the directory is served).
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchd.core.errors import UsageError
from patchd.publisher.checks import plural

FILE_NAME = "patchd-publish.toml"
#: The file is a handful of lines; more than this is not it.
MAX_BYTES = 64 * 1024
_KEYS = ("app", "channel", "key", "sign_cmd", "expires", "rollout", "keep_releases")


@dataclass(frozen=True)
class PublishDefaults:
    """What ``REPO/patchd-publish.toml`` says; ``None``/empty where it says nothing."""

    path: Path
    app: str | None = None
    channel: str | None = None
    keys: tuple[Path, ...] = ()
    sign_cmds: tuple[str, ...] = ()
    expires: str | None = None
    rollout: int | None = None
    keep_releases: int | None = None


def _strings(value: Any, name: str, where: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, str) and v for v in items):
        raise UsageError(f"{where}: {name} must be a string or a list of strings")
    return tuple(items)


def _string(value: Any, name: str, where: Path) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {name} must be a non-empty string")
    return value


def load_defaults(repo: Path) -> PublishDefaults:
    """Read ``repo/patchd-publish.toml``; no file gives empty defaults."""
    path = Path(repo) / FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return PublishDefaults(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path} is over {MAX_BYTES} bytes; it holds a few defaults")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown {plural(len(unknown), 'key', counted=False)} "
                         f"{', '.join(unknown)} (known: {', '.join(_KEYS)})")
    rollout = doc.get("rollout")
    if rollout is not None and (isinstance(rollout, bool) or not isinstance(rollout, int)
                                or not 0 <= rollout <= 100):
        raise UsageError(f"{path}: rollout must be a whole number from 0 to 100")
    keep = doc.get("keep_releases")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise UsageError(f"{path}: keep_releases must be a whole number of at least 1")
    here = path.parent
    return PublishDefaults(
        path=path,
        app=_string(doc["app"], "app", path) if "app" in doc else None,
        channel=_string(doc["channel"], "channel", path) if "channel" in doc else None,
        keys=tuple(here / k for k in _strings(doc["key"], "key", path)) if "key" in doc
        else (),
        sign_cmds=_strings(doc["sign_cmd"], "sign_cmd", path) if "sign_cmd" in doc else (),
        expires=_string(doc["expires"], "expires", path) if "expires" in doc else None,
        rollout=rollout,
        keep_releases=keep,
    )
