"""The ``patchd`` command line (docs/cli.md): parsing, dispatch, and the one-line error rule.

Handlers live in the modules that own their subject and are imported lazily, so
``patchd boot start`` in an app's launcher does not pay for importing the daemon.
Exit codes: 0 ok, 1 the operation failed, 2 usage or config error; errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from patchd import __version__
from patchd.core.errors import PatchdError, UsageError
from patchd.core.text import printable

#: command name → "module:function"; each function takes the parsed args, returns an exit code.
HANDLERS: dict[str, str] = {
    "run": "patchd.service.daemon:run_command",
    "config check": "patchd.cli.main:config_check",
    "status": "patchd.cli.client:status",
    "metrics": "patchd.cli.client:metrics",
    "watch": "patchd.cli.client:watch",
    "check": "patchd.cli.client:check",
    "install": "patchd.cli.client:install",
    "rollback": "patchd.cli.client:rollback",
    "hold": "patchd.cli.client:hold",
    "unhold": "patchd.cli.client:unhold",
    "unmark": "patchd.cli.client:unmark",
    "boot-target": "patchd.cli.client:boot_target",
    "boot start": "patchd.cli.client:boot_start",
    "boot success": "patchd.cli.client:boot_success",
    "boot failure": "patchd.cli.client:boot_failure",
    "launch": "patchd.cli.launch:launch_command",
    "keygen": "patchd.publisher.commands:keygen_command",
    "pack": "patchd.publisher.commands:pack_command",
    "publish": "patchd.publisher.commands:publish_command",
    "root create": "patchd.publisher.commands:root_create_command",
    "root sign": "patchd.publisher.commands:root_sign_command",
    "demo": "patchd.cli.demo:demo_command",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{_error_mark()}patchd: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _add_app(p: argparse.ArgumentParser) -> None:
    p.add_argument("app", nargs="?", help="the app instance (socket /run/patchd/APP.sock)")
    p.add_argument("--socket", type=Path, help="talk to this socket instead")


def _add_signers(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--key KEYFILE`` and ``--sign-cmd CMD`` (docs/formats.md#signing-commands)."""
    p.add_argument("--key", type=Path, action="append", metavar="KEYFILE",
                   help="private key file" + (" (or --sign-cmd; one is needed)"
                                              if required else ""))
    p.add_argument("--sign-cmd", action="append", metavar="CMD",
                   help="sign through CMD (payload on stdin, signature on stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchd", description="Signed, atomic, crash-safe app updates "
                     "with automatic rollback.")
    parser.add_argument("--version", action="version", version=f"patchd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run the daemon (systemd's ExecStart)")
    p.add_argument("--config", type=Path, default=None,
                   help="config file (default /etc/patchd/$PATCHD_APP.toml)")
    p.add_argument("--log-format", choices=["auto", "journal", "json", "console"],
                   help="override [log] format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override [log] level")

    p = sub.add_parser("config", help="work with config files")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    config_sub.required = True
    q = config_sub.add_parser("check", help="validate a config and print the effective one")
    q.add_argument("path", type=Path, help="the config file")

    p = sub.add_parser("status", help="show the daemon's status")
    _add_app(p)
    p.add_argument("--json", action="store_true", help="print GetStatus as JSON")

    p = sub.add_parser("metrics", help="print the daemon's metrics (Prometheus text format)")
    _add_app(p)

    p = sub.add_parser("watch", help="live progress of the current activity")
    _add_app(p)

    p = sub.add_parser("check", help="check for an update now")
    _add_app(p)
    p.add_argument("--wait", action="store_true", help="wait until the update finished")

    p = sub.add_parser("install", help="install a local bundle file")
    p.add_argument("args", nargs="+", metavar="[APP] BUNDLE",
                   help="the app instance (optional) and the bundle file")
    p.add_argument("--socket", type=Path, help="talk to this socket instead")
    p.add_argument("--hold", action="store_true",
                   help="hold the host on this build (needed for one older than the "
                        "host would move to by itself)")

    p = sub.add_parser("rollback", help="mark next_boot bad and fall back")
    _add_app(p)

    p = sub.add_parser("hold", help="keep checking, install nothing until unhold")
    _add_app(p)
    p.add_argument("--reason", help="why, shown in status and the journal")

    p = sub.add_parser("unhold", help="lift the hold: checks install again")
    _add_app(p)

    p = sub.add_parser("unmark", help="lift a build's tombstone so it may install again")
    p.add_argument("args", nargs="+", metavar="[APP] BUILD",
                   help="the build, as RELEASE+PATCH (e.g. 1.4.0+3)")
    p.add_argument("--socket", type=Path, help="talk to this socket instead")

    p = sub.add_parser("boot-target", help="print the tree path to boot")
    _add_app(p)

    p = sub.add_parser("boot", help="boot protocol for the app's launcher")
    boot_sub = p.add_subparsers(dest="boot_command", metavar="EVENT", parser_class=_Parser)
    boot_sub.required = True
    for name, text in (("start", "record a boot start; prints the tree to boot"),
                       ("success", "the booted build is healthy"),
                       ("failure", "the booted build failed")):
        q = boot_sub.add_parser(name, help=text)
        _add_app(q)
        q.add_argument("--pid", type=int, help="pid of the booting process (start)")
        q.add_argument("--reason", help="why booting failed (failure)")
        q.add_argument("--build", help="the build, as RELEASE+PATCH (default: the expected one)")

    p = sub.add_parser("launch", help="run the app: boot it, check its health, fall back, "
                       "activate updates (the app unit's ExecStart)")
    p.add_argument("--config", type=Path, default=None,
                   help="the config file (default /etc/patchd/APP.toml)")
    p.add_argument("--socket", type=Path, help="talk to this socket instead")
    p.add_argument("--notify", action="store_true",
                   help="the app sends READY=1 (sd_notify); checks wait for it")
    p.add_argument("--log-format", choices=["auto", "journal", "json", "console"],
                   default="auto", help="the launcher's log (default: journal under "
                   "systemd, else console on stderr)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info", help="the launcher's log level (default info)")
    p.add_argument("app", help="the app instance, as in its config's [app] name")
    p.add_argument("app_command", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS]",
                   help="the app's command; a relative path is inside the boot tree")

    p = sub.add_parser("keygen", help="new Ed25519 signing key; prints the public key")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="KEYFILE",
                   help="the private key file to write (never overwritten)")

    p = sub.add_parser("pack", help="make a signed bundle from two trees")
    p.add_argument("--app", required=True, help="the app, as in the hosts' [app] name")
    p.add_argument("--release", required=True,
                   help="the release patched, or installed by --full (its VERSION)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--patch", type=int, metavar="N", help="a patch bundle for patch N >= 1")
    kind.add_argument("--full", action="store_true", help="a full bundle (no --base)")
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="the release's tree as hosts have it (patch bundles)")
    p.add_argument("--target", type=Path, required=True, metavar="DIR",
                   help="the tree to produce")
    _add_signers(p)
    p.add_argument("--arch", default="any", help="the hosts' arch (default any: every host)")
    p.add_argument("--no-delta", action="store_true", help="never use delta ops")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="BUNDLE",
                   help="the bundle file to write")

    p = sub.add_parser("publish", help="add bundles to a repository and re-sign its manifest")
    p.add_argument("--repo", type=Path, required=True, metavar="DIR",
                   help="the channel directory (defaults in DIR/patchd-publish.toml)")
    p.add_argument("--app", help="the app (must match the manifest)")
    p.add_argument("--channel", help="the channel (must match the manifest)")
    _add_signers(p, required=False)
    p.add_argument("--rollout", type=int, metavar="PERCENT",
                   help="percentage of hosts (0-100) for the patches published now")
    p.add_argument("--expires", metavar="DURATION",
                   help="validity of the manifest (default 30d)")
    p.add_argument("--roll-back", metavar="RELEASE:PATCH", help="mark a patch rolled back")
    p.add_argument("--keep-releases", type=int, metavar="N",
                   help="releases the manifest keeps, the newest (default 5)")
    p.add_argument("bundles", nargs="*", type=Path, metavar="BUNDLE",
                   help="bundles to add (none: renew the manifest)")

    p = sub.add_parser("root", help="the repository's root of trust: create and sign versions")
    root_sub = p.add_subparsers(dest="root_command", metavar="ACTION", parser_class=_Parser)
    root_sub.required = True
    q = root_sub.add_parser("create", help="write the next root version (1 if none)")
    q.add_argument("--repo", type=Path, required=True, metavar="DIR",
                   help="the channel directory (root in DIR/root/)")
    q.add_argument("--root-key", action="append", metavar="PUBKEY",
                   help="ed25519:... key that signs roots (default: the previous root's)")
    q.add_argument("--root-threshold", type=int, metavar="N",
                   help="root keys needed to sign the next root")
    q.add_argument("--updates-key", action="append", metavar="PUBKEY",
                   help="ed25519:... key that signs manifests and bundles")
    q.add_argument("--updates-threshold", type=int, metavar="N",
                   help="updates keys needed to sign a manifest or bundle")
    q.add_argument("--expires", default="365d", help="validity of the root (default 365d)")
    _add_signers(q, required=False)
    q = root_sub.add_parser("sign", help="add signatures to a root version")
    q.add_argument("--repo", type=Path, required=True, metavar="DIR",
                   help="the channel directory (root in DIR/root/)")
    q.add_argument("--version", type=int, help="the root version (default: the newest)")
    _add_signers(q, required=False)

    p = sub.add_parser("demo", help="the whole flow in a temp directory, no root")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    return parser


def command_name(args: argparse.Namespace) -> str:
    for sub_attr in ("config_command", "boot_command", "root_command"):
        if getattr(args, sub_attr, None):
            return f"{args.command} {getattr(args, sub_attr)}"
    return str(args.command)


def config_check(args: argparse.Namespace) -> int:
    from patchd.config import dump_config, load_config
    from patchd.config.preflight import preflight, raise_errors

    config = load_config(args.path)
    found = preflight(config)  # exactly what `patchd run` checks at start
    raise_errors(config, found)
    for finding in found:
        sys.stderr.write(f"patchd: warning: {config.source}: {finding.key}: "
                         f"{printable(finding.message, 2048)}\n")
    sys.stdout.write(dump_config(config))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    name = command_name(args)
    module_name, _, func_name = HANDLERS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, func_name)
    except (ImportError, AttributeError) as exc:
        if getattr(exc, "name", None) not in (module_name, func_name, None):
            raise
        sys.stderr.write(f"patchd: {name}: not implemented yet\n")
        return 1
    return int(handler(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        # A command's stdout is its output (a tree path, a key, JSON): library logs go
        # to stderr, and only when they matter.
        from patchd.host.logs import configure_logging

        configure_logging("console", "warning", stream=sys.stderr)
    try:
        return dispatch(args)
    except PatchdError as exc:
        first, *rest = str(exc).splitlines() or [type(exc).__name__]
        # Messages may carry outside text (a server's reason, a file name): escaped.
        mark = _error_mark()
        sys.stderr.write(f"{mark}patchd: {printable(first, 2048)}\n")
        for line in rest:  # a config with several problems: one line each
            sys.stderr.write(f"{mark}patchd: {printable(line, 2048)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `patchd status | head`: the reader went away; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if os.environ.get("PATCHD_DEBUG"):
            raise
        sys.stderr.write(f"{_error_mark()}patchd: internal error: {type(exc).__name__}: "
                         f"{printable(exc)} "
                         "(set PATCHD_DEBUG=1 for a traceback)\n")
        return 1


def _error_mark() -> str:
    """``<3>`` when stderr is connected to journald, else nothing.

    Under systemd a failed start (a config error, the socket taken) is reported on
    stderr, which journald records at the unit's default priority, info, so
    ``journalctl -p err`` would not show it. journald reads a leading ``<N>`` as the
    line's syslog priority (``SyslogLevelPrefix=``, on by default). ``JOURNAL_STREAM``
    names the stream's device and inode; it is ours only if fd 2 is that stream
    (sd_journal_stream_fd(3)), not when a child inherited the variable.
    """
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return ""
    return "<3>" if stream == f"{st.st_dev}:{st.st_ino}" else ""


def usage_error(message: str) -> UsageError:
    """Shortcut for handlers: ``raise usage_error("…")`` exits 2 with one line."""
    return UsageError(message)
