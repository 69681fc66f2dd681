"""What a valid config file must also find on this host before the daemon starts.

``load_config`` judges the file alone. Whether ``release_dir`` holds a release, whether
the socket's group and the named users exist, is a question about the host, and
``patchd run`` and ``patchd config check`` must answer it the same way: both call
:func:`preflight`, so a config that ``check`` passes is one that ``run`` starts with.
Errors stop the daemon (exit 2); warnings are logged by ``run`` and printed by
``check``, and the daemon runs.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from patchd.core.errors import ConfigError, ConfigErrors
from patchd.state.recovery import read_release

if TYPE_CHECKING:
    from patchd.config import Config

__all__ = ["Finding", "preflight", "raise_errors", "socket_group_usable"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem of the config on this host, under the key it concerns."""

    level: Literal["error", "warning"]
    key: str
    message: str


def socket_group_usable(name: str) -> bool | None:
    """None: no such group; False: the daemon may not give the socket to it.

    One judgement for both sides of start-up: :func:`preflight` warns with it and
    ``service.api.serve_api`` falls back to the daemon's own group with it, so the
    warning names exactly the groups the socket will not get.
    """
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return None
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def preflight(config: Config) -> list[Finding]:
    """Every host-side problem of ``config``, errors first."""
    found: list[Finding] = []
    release_dir = config.app.release_dir
    if not release_dir.is_dir():
        found.append(Finding("error", "app.release_dir",
                             f"{release_dir} is not a directory (the running app's tree)"))
    else:
        try:
            read_release(release_dir)
        except ConfigError as exc:
            found.append(Finding("error", "app.release_dir", str(exc)))
    group = config.api.socket_group
    usable = socket_group_usable(group)
    if not usable:
        # Not fatal (docs/install.md): the socket keeps the daemon's group, so root and
        # the daemon's user still reach it, but the app's users do not.
        why = "does not exist" if usable is None else "does not include the daemon's user"
        found.append(Finding(
            "warning", "api.socket_group",
            f"group {group!r} {why}: the socket keeps the daemon's own group and the "
            "app's users get 'permission denied' (create the group and make the daemon's "
            "user a member, e.g. SupplementaryGroups= in the unit)"))
    for key, names in (("api.admins", config.api.admins),
                       ("boot.reporters", config.boot.reporters)):
        for name in names:
            if not _user_exists(name):
                found.append(Finding("warning", key, f"{name!r} is not a user on this host"))
    return sorted(found, key=lambda f: f.level != "error")


def raise_errors(config: Config, found: list[Finding]) -> None:
    """ConfigErrors naming every error of ``found``; nothing when there is none."""
    errors: list[tuple[str | None, str]] = [
        (f.key, f.message) for f in found if f.level == "error"]
    if errors:
        raise ConfigErrors(config.source, errors)
