"""argparse glue for the publisher's commands: keygen, pack, publish, root (docs/cli.md)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd.config import parse_duration
from patchd.core.errors import UsageError
from patchd.publisher import roots
from patchd.publisher.publish import Key, keygen, parse_roll_back, publish, roll_back
from patchd.publisher.publish import pack_command as pack_bundle
from patchd.publisher.signer import CommandSigner


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
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no changes"
    print(f"{args.output}: {header.kind} bundle {header.release}+{header.patch} "
          f"({header.arch}); {summary}; unpacked {header.unpacked_size} bytes")
    return 0


def publish_command(args: argparse.Namespace) -> int:
    expires = _duration(args.expires, "--expires")
    keys = signers(args)
    if args.roll_back:
        if args.bundles:
            raise UsageError("--roll-back does not take bundles")
        release, patch = parse_roll_back(args.roll_back)
        manifest = roll_back(args.repo, args.app, args.channel, keys, release, patch, expires)
        print(f"{args.repo}: rolled back {release}+{patch}; serial {manifest.serial}")
        return 0
    manifest = publish(args.repo, args.app, args.channel, keys, args.bundles, args.rollout,
                       expires)
    what = f"published {len(args.bundles)} bundle(s)" if args.bundles else "renewed"
    print(f"{args.repo}: {what}; serial {manifest.serial}, "
          f"expires {manifest.expires:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def root_create_command(args: argparse.Namespace) -> int:
    """``patchd root create``: the next root version, signed by the signers given."""
    from patchd.publisher.publish import load_signers

    keys = signers(args)
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
    state = roots.sign(args.repo, args.version, load_signers(keys) if keys else [])
    print(f"{roots.root_path(args.repo, state.root.version)}: {state}")
    return 0
