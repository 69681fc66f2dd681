"""argparse glue for the publisher's commands: keygen, pack, publish (docs/cli.md)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from patchd.config import parse_duration
from patchd.core.errors import UsageError
from patchd.publisher.publish import keygen, parse_roll_back, publish, roll_back
from patchd.publisher.publish import pack_command as pack_bundle


def keygen_command(args: argparse.Namespace) -> int:
    print(keygen(args.output))
    return 0


def pack_command(args: argparse.Namespace) -> int:
    header = pack_bundle(app=args.app, release=args.release, patch=args.patch, full=args.full,
                         base=args.base, target=args.target, keys=args.key, arch=args.arch,
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
    try:
        expires = timedelta(seconds=parse_duration(args.expires))
    except ValueError as exc:
        raise UsageError(f"--expires: {exc}") from None
    if args.roll_back:
        if args.bundles:
            raise UsageError("--roll-back does not take bundles")
        release, patch = parse_roll_back(args.roll_back)
        manifest = roll_back(args.repo, args.app, args.channel, args.key, release, patch, expires)
        print(f"{args.repo}: rolled back {release}+{patch}; serial {manifest.serial}")
        return 0
    manifest = publish(args.repo, args.app, args.channel, args.key, args.bundles, args.rollout,
                       expires)
    what = f"published {len(args.bundles)} bundle(s)" if args.bundles else "renewed"
    print(f"{args.repo}: {what}; serial {manifest.serial}, "
          f"expires {manifest.expires:%Y-%m-%dT%H:%M:%SZ}")
    return 0
