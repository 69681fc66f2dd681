"""Varlink messages: their bytes on the wire, and a call as a handler sees it.

Wire format: each message is one JSON object followed by a NUL byte. A call is
``{"method": "iface.Method", "parameters": {...}, "more"?: bool, "oneway"?: bool}``;
a reply is ``{"parameters": {...}, "continues"?: true}`` or
``{"error": "iface.Error", "parameters": {...}}``. Calls on one connection are
answered in order.

Server and clients share this module so that both ends agree on what is valid JSON
(``NaN``/``Infinity`` are refused both ways) and on the exact bytes sent.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from .errors import InvalidParameter

#: A reply message, or a reply's parameters: always a JSON object.
Reply: TypeAlias = dict[str, Any]


# --- bytes -------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads/dumps with options build a new coder on every call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def decode_message(raw: bytes) -> Any:
    """Parse one message body (without its NUL); ValueError when it is not JSON."""
    try:
        return _DECODER.decode(raw.decode())
    except RecursionError as exc:  # absurdly deep nesting
        raise ValueError("JSON nested too deeply") from exc


def encode_message(message: Mapping[str, Any]) -> bytes:
    """Serialise one message with its NUL terminator (NaN/Infinity refused)."""
    return _ENCODER.encode(message).encode() + b"\0"


# --- calls -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The connecting process as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        """Read SO_PEERCRED from a connected Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class Call:
    """One method call as a handler sees it."""

    method: str
    parameters: dict[str, Any]
    more: bool
    oneway: bool
    peer: PeerCred
    #: File descriptors the client passed with this call (SCM_RIGHTS), in order; a
    #: parameter names one by its index. Owned by the connection: closed once the call
    #: is answered, so a handler that keeps one must ``os.dup`` it.
    fds: tuple[int, ...] = ()

    @property
    def interface(self) -> str:
        """The interface part of the fully-qualified method name."""
        return self.method.rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class Last:
    """Wraps the final reply of a streaming handler.

    A streaming handler's replies are sent as soon as they are yielded (with
    ``continues: true`` when the client asked for ``more``); looking ahead to find the
    last one would hold every reply back until the next exists, which is wrong for
    watch-style streams. So a stream that ends marks its last reply with ``Last``.
    """

    reply: Reply


class BadCall(InvalidParameter):
    """A recognisable call with a malformed envelope: answered, connection kept."""

    def __init__(self, call: Call, parameter: str) -> None:
        super().__init__(parameter)
        self.call = call


def parse_call(message: Any, peer: PeerCred) -> Call:
    """Turn a decoded message into a ``Call``.

    A message without a method string is not a call at all (``InvalidParameter``
    naming ``method``; the connection is then dropped). A call whose envelope is wrong
    (``parameters`` not an object, ``more``/``oneway`` not booleans) raises
    ``BadCall``: it is answered and the connection goes on.
    """
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        raise InvalidParameter("method")
    parameters = message.get("parameters")
    more = message.get("more", False)
    oneway = message.get("oneway", False)
    call = Call(
        message["method"],
        parameters if isinstance(parameters, dict) else {},
        more is True,
        oneway is True,
        peer,
    )
    checks = (
        ("parameters", parameters is None or isinstance(parameters, dict)),
        ("more", isinstance(more, bool)),
        ("oneway", isinstance(oneway, bool)),
    )
    for name, valid in checks:
        if not valid:
            raise BadCall(call, name)
    return call
