"""argparse glue for the publisher's commands: keygen, pack, publish, root (docs/cli.md)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd.config import parse_duration
from patchd.core.errors import UsageError
from patchd.publisher import checks, roots
from patchd.publisher.checks import plural
from patchd.publisher.defaults import load_defaults
from patchd.publisher.history import DEFAULT_KEEP_RELEASES
from patchd.publisher.publish import Key, keygen, parse_roll_back, publish, roll_back
from patchd.publisher.publish import pack_command as pack_bundle
from patchd.publisher.signer import CommandSigner

#: How long a manifest is valid when neither --expires nor the defaults file says.
DEFAULT_EXPIRES = timedelta(days=30)


def signers(args: argparse.Namespace) -> list[Key]:
    """``--key KEYFILE`` and ``--sign-cmd CMD``, in the order given by kind."""
    keys: list[Key] = [Path(k) for k in (getattr(args, "key", None) or [])]
    keys += [CommandSigner(cmd) for cmd in (getattr(args, "sign_cmd", None) or [])]
    return keys


def _duration(text: str, flag: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def keygen_command(args: argparse.Namespace) -> int:
    print(keygen(args.output))
    return 0


def pack_command(args: argparse.Namespace) -> int:
    header = pack_bundle(app=args.app, release=args.release, patch=args.patch, full=args.full,
                         base=args.base, target=args.target, keys=signers(args), arch=args.arch,
                         out=args.output, delta=not args.no_delta)
    kinds: dict[str, int] = {}
    for op in header.ops:
        name = type(op).__name__.removesuffix("Op").lower()
        kinds[name] = kinds.get(name, 0) + 1
    summary = ", ".join(plural(kinds[kind], word, many) for kind, word, many in _OP_WORDS
                        if kind in kinds) or "no changes"
    print(f"{args.output}: {header.kind} bundle {header.release}+{header.patch} "
          f"({header.arch}); {summary}; unpacked {plural(header.unpacked_size, 'byte')}")
    return 0


#: Op kinds as ``pack`` counts them: (kind, one, many).
_OP_WORDS = (("file", "file", "files"), ("delta", "delta", "deltas"),
             ("dir", "directory", "directories"), ("symlink", "symlink", "symlinks"),
             ("delete", "deletion", "deletions"))


def _publish_settings(args: argparse.Namespace) -> tuple[str, str, list[Key], timedelta,
                                                        int]:
    """App, channel, signers, expiry and new patches' rollout: the command line, else
    ``REPO/patchd-publish.toml``; a missing value names both ways to give it."""
    file = load_defaults(args.repo)

    def required(given: str | None, default: str | None, flag: str, key: str,
                 metavar: str) -> str:
        if given is not None:
            return checks.check_name(given, flag, key)
        if default is None:
            raise UsageError(f"no {key} given: pass {flag} {metavar} or set {key} in "
                             f"{file.path}")
        return checks.check_name(default, f"{file.path}: {key}", key)

    app = required(args.app, file.app, "--app", "app", "APP")
    channel = required(args.channel, file.channel, "--channel", "channel", "CHANNEL")
    keys = signers(args)
    if not keys:
        keys = [*file.keys, *(CommandSigner(cmd) for cmd in file.sign_cmds)]
    if not keys:
        raise UsageError(f"no signing key given: pass --key KEYFILE or --sign-cmd CMD, or set "
                         f"key or sign_cmd in {file.path}")
    expires, flag = DEFAULT_EXPIRES, "--expires"
    if args.expires is not None:
        expires = _duration(args.expires, flag)
    elif file.expires is not None:
        flag = f"{file.path}: expires"
        expires = _duration(file.expires, flag)
    if expires <= timedelta(0):
        raise UsageError(f"{flag} must be more than 0: hosts refuse an expired manifest")
    return app, channel, keys, expires, file.rollout if file.rollout is not None else 100


def _keep_releases(args: argparse.Namespace) -> int:
    """``--keep-releases``, else the defaults file's ``keep_releases``, else 5."""
    if args.keep_releases is not None:
        if args.keep_releases < 1:
            raise UsageError(f"--keep-releases must be at least 1, got {args.keep_releases}")
        return int(args.keep_releases)
    file = load_defaults(args.repo)
    return file.keep_releases if file.keep_releases is not None else DEFAULT_KEEP_RELEASES


def publish_command(args: argparse.Namespace) -> int:
    app, channel, keys, expires, new_rollout = _publish_settings(args)
    keep = _keep_releases(args)
    if args.roll_back:
        if args.bundles:
            raise UsageError("--roll-back does not take bundles")
        release, patch = parse_roll_back(args.roll_back)
        manifest = roll_back(args.repo, app, channel, keys, release, patch, expires,
                             keep_releases=keep)
        print(f"{args.repo}: rolled back {release}+{patch}; serial {manifest.serial}")
        return 0
    manifest = publish(args.repo, app, channel, keys, args.bundles, args.rollout, expires,
                       new_rollout=new_rollout, keep_releases=keep)
    what = f"published {plural(len(args.bundles), 'bundle')}" if args.bundles else "renewed"
    print(f"{args.repo}: {what}; serial {manifest.serial}, "
          f"expires {manifest.expires:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def root_create_command(args: argparse.Namespace) -> int:
    """``patchd root create``: the next root version, signed by the signers given."""
    from patchd.publisher.publish import load_signers

    keys = signers(args)
    checks.check_keys_outside(args.repo, keys)
    state = roots.create(
        args.repo, root_keys=args.root_key or [], root_threshold=args.root_threshold,
        updates_keys=args.updates_key or [], updates_threshold=args.updates_threshold,
        expires=_duration(args.expires, "--expires"),
        signers=load_signers(keys) if keys else [], now=datetime.now(UTC))
    print(f"{roots.root_path(args.repo, state.root.version)}: {state}")
    return 0


def root_sign_command(args: argparse.Namespace) -> int:
    """``patchd root sign``: add signatures to a root version (default the newest)."""
    from patchd.publisher.publish import load_signers

    keys = signers(args)
    checks.check_keys_outside(args.repo, keys)
    state = roots.sign(args.repo, args.version, load_signers(keys) if keys else [])
    print(f"{roots.root_path(args.repo, state.root.version)}: {state}")
    return 0
