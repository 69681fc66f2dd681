"""``--sign-cmd``: signing through a command, so keys can stay in an HSM, a KMS or on an
offline machine (docs/formats.md#signing-commands).

The protocol is two calls of the same command line, with one argument appended:

- ``CMD public-key`` prints the key's public half as ``ed25519:<base64>``;
- ``CMD sign`` reads the payload on stdin and writes the raw 64-byte Ed25519
  signature on stdout.

Exit status 0 means success; anything else (or a wrong answer, or no answer within
the timeout) is :class:`SignCommandFailed` with the command's last stderr line.
patchd verifies every signature against the announced key before writing it
(:func:`patchd.trust.signing.sign_document`), so a broken wrapper fails at the
publisher, never on a host.
"""

from __future__ import annotations

import shlex
import subprocess

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from patchd.core.errors import SignCommandFailed
from patchd.trust.signing import key_id, parse_public_key

#: A signing command may wait for a human (a touch on a hardware key).
SIGN_TIMEOUT = 300.0
#: More than this on stdout is not an answer to either call.
MAX_OUTPUT = 64 * 1024


class CommandSigner:
    """A :class:`patchd.trust.signing.Signer` that runs ``command`` for each step."""

    def __init__(self, command: str, timeout: float = SIGN_TIMEOUT) -> None:
        self.command = command
        self.argv = shlex.split(command)
        if not self.argv:
            raise SignCommandFailed("--sign-cmd is empty")
        self.timeout = timeout
        answer = self._run("public-key", b"").decode("ascii", "replace").strip()
        try:
            self._raw = parse_public_key(answer)
        except ValueError as exc:
            raise SignCommandFailed(f"{command} public-key: {exc}") from None

    def __repr__(self) -> str:
        return f"CommandSigner({self.command!r}, keyid={key_id(self._raw)})"

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self._raw)

    def sign(self, data: bytes) -> bytes:
        sig = self._run("sign", data)
        if len(sig) != 64:
            raise SignCommandFailed(f"{self.command} sign: printed {len(sig)} bytes, "
                                    "an Ed25519 signature has 64")
        return sig

    def _run(self, action: str, stdin: bytes) -> bytes:
        try:
            done = subprocess.run([*self.argv, action], input=stdin, capture_output=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError:
            raise SignCommandFailed(f"{self.argv[0]}: no such command") from None
        except subprocess.TimeoutExpired:
            raise SignCommandFailed(f"{self.command} {action}: no answer within "
                                    f"{self.timeout:g}s") from None
        except OSError as exc:
            raise SignCommandFailed(f"{self.command} {action}: {exc.strerror}") from None
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
            raise SignCommandFailed(f"{self.command} {action}: exit status "
                                    f"{done.returncode}: {last[:200]}")
        if len(done.stdout) > MAX_OUTPUT:
            raise SignCommandFailed(f"{self.command} {action}: answer over {MAX_OUTPUT} bytes")
        return done.stdout
