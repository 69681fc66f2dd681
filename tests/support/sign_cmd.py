"""A signing command in its own process, the way an HSM or KMS wrapper would be one:
``python sign_cmd.py KEYFILE public-key`` prints the public key; ``... sign`` reads
the payload on stdin and writes the raw 64-byte signature (docs/formats.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from patchd.trust.signing import format_public_key, load_private_key, public_raw


def main() -> int:
    key = load_private_key(Path(sys.argv[1]))
    if sys.argv[2] == "public-key":
        print(format_public_key(public_raw(key)))
        return 0
    if sys.argv[2] == "sign":
        sys.stdout.buffer.write(key.sign(sys.stdin.buffer.read()))
        return 0
    print(f"unknown action {sys.argv[2]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
