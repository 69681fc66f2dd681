"""What a socket serves: interfaces, their handlers, and ``org.varlink.service``.

Kept apart from the connection code so that the rules for answering a call (which
handler, which standard error, who may call it) are decided in one place and can be
checked without a socket.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from .errors import (
    SERVICE_INTERFACE,
    ExpectedMore,
    InterfaceNotFound,
    InvalidParameter,
    MethodNotFound,
    MethodNotImplemented,
    PermissionDenied,
)
from .message import Call, Last, PeerCred, Reply

#: The standard service interface (varlink.org/Service), with the two errors later
#: added there (``PermissionDenied``, ``ExpectedMore``).
SERVICE_DESCRIPTION: Final = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""

#: ``async def h(call) -> dict``, or an async generator of replies for a streaming method.
Handler: TypeAlias = Callable[[Call], Awaitable[Reply] | AsyncIterator[Reply | Last]]
#: ``authorize(method_fqname, peer)``: True to allow the call.
Authorize: TypeAlias = Callable[[str, PeerCred], bool]


@dataclass(frozen=True, slots=True)
class _Interface:
    name: str
    description: str
    methods: Mapping[str, Handler]
    declared: frozenset[str]
    requires_more: frozenset[str]


def _declared_methods(name: str, description: str) -> frozenset[str]:
    """Check the description names ``name`` and return the methods it declares."""
    words = [line.split() for line in description.splitlines()]
    words = [w for w in words if w and not w[0].startswith("#")]
    if not words or words[0][:2] != ["interface", name]:
        raise ValueError(f"interface description does not start with 'interface {name}'")
    return frozenset(w[1].partition("(")[0] for w in words if w[0] == "method" and len(w) > 1)


class VarlinkService:
    """The interfaces and handlers one socket serves, plus ``org.varlink.service``.

    ``authorize(method_fqname, peer)`` is asked before every call outside
    ``org.varlink.service`` (introspection is open to anyone who can open the socket);
    it answers False for the standard ``PermissionDenied`` or raises a
    ``VarlinkError`` of its own (e.g. an interface's ``NotAuthorized``).
    """

    def __init__(
        self,
        *,
        vendor: str,
        product: str,
        version: str,
        url: str,
        authorize: Authorize | None = None,
        internal_error: str = f"{SERVICE_INTERFACE}.InternalError",
        internal_error_parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.info: dict[str, Any] = {
            "vendor": vendor,
            "product": product,
            "version": version,
            "url": url,
        }
        self.authorize = authorize
        #: The error sent when a handler fails unexpectedly (the failure is logged). A
        #: service may name one its interface declares, with the parameters it requires,
        #: so clients generated from the description recognise it.
        self.internal_error = internal_error
        self.internal_error_parameters: dict[str, Any] = dict(internal_error_parameters or {})
        self._interfaces: dict[str, _Interface] = {}
        self.add_interface(
            SERVICE_INTERFACE,
            SERVICE_DESCRIPTION,
            {"GetInfo": self._get_info, "GetInterfaceDescription": self._get_description},
        )

    def __repr__(self) -> str:
        return f"VarlinkService({self.info['product']!r}, interfaces={list(self._interfaces)})"

    def add_interface(
        self,
        name: str,
        description: str,
        methods: Mapping[str, Handler],
        *,
        requires_more: Collection[str] = (),
    ) -> None:
        """Serve ``name``: ``description`` is returned verbatim, ``methods`` by short name.

        A handler is ``async def h(call) -> dict`` or, for a streaming method, an async
        generator yielding reply dicts (the last one wrapped in ``Last`` if the stream
        ends). Methods in ``requires_more`` answer ``ExpectedMore`` without ``more``.
        """
        if name in self._interfaces:
            raise ValueError(f"interface {name} is already registered")
        for method, handler in methods.items():
            if not (inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)):
                raise TypeError(f"handler for {name}.{method} must be async (def or generator)")
        declared = _declared_methods(name, description)
        unknown = (set(methods) | set(requires_more)) - declared
        if unknown:
            raise ValueError(f"{name} does not declare methods {sorted(unknown)}")
        self._interfaces[name] = _Interface(
            name, description, dict(methods), declared, frozenset(requires_more)
        )

    @property
    def interfaces(self) -> list[str]:
        """Names of the served interfaces, ``org.varlink.service`` first."""
        return list(self._interfaces)

    def resolve(self, call: Call) -> Handler:
        """The handler for ``call``, or the varlink error the call must be answered with."""
        interface_name, _, method_name = call.method.rpartition(".")
        interface = self._interfaces.get(interface_name)
        if interface is None:
            raise InterfaceNotFound(interface_name)
        handler = interface.methods.get(method_name)
        if handler is None:
            if method_name in interface.declared:
                raise MethodNotImplemented(call.method)
            raise MethodNotFound(call.method)
        if (
            interface_name != SERVICE_INTERFACE
            and self.authorize is not None
            and not self.authorize(call.method, call.peer)
        ):
            raise PermissionDenied()
        if method_name in interface.requires_more and not call.more:
            raise ExpectedMore()
        return handler

    def internal_error_message(self) -> Reply:
        """The reply sent for an unexpected failure."""
        return {"error": self.internal_error, "parameters": dict(self.internal_error_parameters)}

    async def _get_info(self, call: Call) -> Reply:
        return {**self.info, "interfaces": self.interfaces}

    async def _get_description(self, call: Call) -> Reply:
        name = call.parameters.get("interface")
        if not isinstance(name, str):
            raise InvalidParameter("interface")
        interface = self._interfaces.get(name)
        if interface is None:
            raise InterfaceNotFound(name)
        return {"description": interface.description}
