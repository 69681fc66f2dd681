"""Every exception the varlink package raises on purpose, in one place.

Three families, because callers handle them at three different places:

- ``VarlinkError`` and its subclasses *are* varlink error replies. A handler raises one
  to answer a call with an error; a client raises one when the service answered with
  an error. They cross the wire, so they carry a name and parameters, not a message.
- ``AddressInUse``: a server could not take its socket path. Raised once, at start-up.
- ``ClientError`` (``ConnectFailed``, ``ProtocolError``): a client got no answer at
  all. They carry what an application needs to word its own message (the errno of a
  failed connect, the path), because only the application knows what the service is.

None of them derives from an application's error classes: the package is used by
applications, not the other way round, so the application translates at its boundary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

#: The standard interface every service provides; its errors are the ones below.
SERVICE_INTERFACE: Final = "org.varlink.service"


# --- error replies ---------------------------------------------------------------------


class VarlinkError(Exception):
    """A varlink error reply: a fully-qualified name and its parameters.

    Handlers raise it (or a subclass) to answer a call with an error; the client
    raises it when the server answered with one.
    """

    def __init__(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.parameters: dict[str, Any] = dict(parameters or {})
        super().__init__(f"{name} {json.dumps(self.parameters, sort_keys=True)}")

    def to_message(self) -> dict[str, Any]:
        """The reply message carrying this error."""
        return {"error": self.name, "parameters": self.parameters}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.parameters!r})"


class InterfaceNotFound(VarlinkError):
    """The call names an interface this service does not have."""

    def __init__(self, interface: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.InterfaceNotFound", {"interface": interface})


class MethodNotFound(VarlinkError):
    """The interface exists but does not declare the method."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.MethodNotFound", {"method": method})


class MethodNotImplemented(VarlinkError):
    """The interface declares the method but no handler was registered for it."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.MethodNotImplemented", {"method": method})


class InvalidParameter(VarlinkError):
    """A parameter is missing, of the wrong type or out of range; names the parameter."""

    def __init__(self, parameter: str) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.InvalidParameter", {"parameter": parameter})


class PermissionDenied(VarlinkError):
    """The default refusal when the authorisation hook answers False."""

    def __init__(self) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.PermissionDenied")


class ExpectedMore(VarlinkError):
    """The method only makes sense as a stream and was called without ``more``."""

    def __init__(self) -> None:
        super().__init__(f"{SERVICE_INTERFACE}.ExpectedMore")


# --- the server's socket -----------------------------------------------------------------


class AddressInUse(Exception):
    """The socket path cannot be served, and replacing what is there would be wrong.

    Either something else lives at the path (a live server, or a file that is not a
    socket) or binding failed. A stale socket file is no reason: it is replaced.
    ``live`` is True when a process answers (or is too busy to), so an application can
    add its own hint ("is it already running?") that this package cannot word.
    """

    def __init__(self, message: str, *, path: Path, live: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.live = live


# --- clients -----------------------------------------------------------------------------


class ClientError(Exception):
    """A client got no reply at all (an error reply is a ``VarlinkError`` instead)."""


class ConnectFailed(ClientError):
    """connect() to the service's socket failed.

    Kept apart from ``ProtocolError`` and carrying ``errno`` because the cause is what
    the user can act on: ENOENT/ECONNREFUSED mean nobody serves the path, EACCES/EPERM
    that the socket file's mode or group keeps this user out.
    """

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(f"cannot connect to {path}: {error}")
        self.path = path
        self.errno: int | None = error.errno
        self.strerror: str | None = error.strerror


class ProtocolError(ClientError):
    """The connection broke, timed out, or carried something that is not a varlink reply."""
