"""A small implementation of varlink (https://varlink.org) over Unix sockets.

The wire protocol, a server and two clients; it knows nothing of patchd. An
application describes its interface, registers async handlers on a
``VarlinkService`` and serves it with a ``VarlinkServer``; its own errors become
``VarlinkError`` replies in its handlers, and it words its own messages for the
client failures (``ConnectFailed``, ``ProtocolError``) and for ``AddressInUse``.
Nothing here imports from the rest of patchd, so the protocol can be read, tested and
reasoned about on its own.

Modules, each with one job:

- ``errors``: every exception the package raises on purpose.
- ``message``: the bytes of a message; a call as a handler sees it.
- ``service``: interfaces, handlers, authorisation, ``org.varlink.service``.
- ``connection``: one client on the server side: framing, limits, streaming.
- ``socket_file``: taking the socket path safely, and giving it back.
- ``server``: the accept loop and the cap on connections.
- ``client``: blocking and async clients.

Import from the package itself (``from patchd.varlink import VarlinkServer``); the
module layout may change.
"""

from .client import MAX_REPLY, AsyncVarlinkClient, VarlinkClient
from .connection import MAX_MESSAGE, Limits
from .errors import (
    SERVICE_INTERFACE,
    AddressInUse,
    ClientError,
    ConnectFailed,
    ExpectedMore,
    InterfaceNotFound,
    InvalidParameter,
    MethodNotFound,
    MethodNotImplemented,
    PermissionDenied,
    ProtocolError,
    VarlinkError,
)
from .message import Call, Last, PeerCred, Reply, decode_message, encode_message, parse_call
from .server import VarlinkServer
from .service import SERVICE_DESCRIPTION, Authorize, Handler, VarlinkService
from .socket_file import bind_unix_socket, unlink_if_same

__all__ = [
    "MAX_MESSAGE",
    "MAX_REPLY",
    "SERVICE_DESCRIPTION",
    "SERVICE_INTERFACE",
    "AddressInUse",
    "AsyncVarlinkClient",
    "Authorize",
    "Call",
    "ClientError",
    "ConnectFailed",
    "ExpectedMore",
    "Handler",
    "InterfaceNotFound",
    "InvalidParameter",
    "Last",
    "Limits",
    "MethodNotFound",
    "MethodNotImplemented",
    "PeerCred",
    "PermissionDenied",
    "ProtocolError",
    "Reply",
    "VarlinkClient",
    "VarlinkError",
    "VarlinkServer",
    "VarlinkService",
    "bind_unix_socket",
    "decode_message",
    "encode_message",
    "parse_call",
    "unlink_if_same",
]
