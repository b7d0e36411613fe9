"""Requests that are not their method's message: INVALID_ARGUMENT on every method.

gRPC parses a request with the method's deserializer before any handler runs, and answers a
parse failure UNKNOWN ("Unexpected DecodeError"), as if the server had failed. ModelInfer
reads wire bytes itself and answers INVALID_ARGUMENT; `register` gives every other method
the same answer. It registers a service's handlers (as its generated `add_..._to_server`
would: pass that function) with deserializers that hand a parse failure on as `Undecodable`,
and behaviors that answer it INVALID_ARGUMENT. Nothing changes per call for a method whose
requests are wire bytes (no deserializer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from rnnserve.api.handlers import end_call, guarded
from rnnserve.api.status import MAX_MESSAGE_BYTES


class Undecodable:
    """A request that did not parse, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Capture:
    """Stands in for the server while a generated `add_..._to_server` registers its service."""

    def __init__(self) -> None:
        self.services: dict[str, Mapping[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Generated code registers each service twice; the named handlers below serve."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = handlers


def register(server: grpc.aio.Server, add: Callable[[Any], None]) -> None:
    """Run `add(server)` (e.g. `lambda s: add_XServicer_to_server(servicer, s)`) so that its
    methods answer a request that does not parse INVALID_ARGUMENT.

    Raises ValueError when `add` registers no named handlers (generated code older than
    grpcio 1.63).
    """
    capture = _Capture()
    add(capture)
    if not capture.services:
        raise ValueError("the service registered no named method handlers")
    for service, handlers in capture.services.items():
        checked = {name: checked_handler(handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        server.add_registered_method_handlers(service, checked)


def checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler`, answering a request its deserializer cannot parse INVALID_ARGUMENT; itself
    when it has no deserializer or takes a stream of requests (a parse failure mid-stream
    still ends the call UNKNOWN: no method of ours but ModelStreamInfer, which reads wire
    bytes, takes one)."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler

    def deserializer(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the client's
            return Undecodable(f"{type(error).__name__}: {error}")

    return guarded(handler, _parsed, deserializer)


def _parsed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the request parsed; if not, the call ends INVALID_ARGUMENT."""
    if not isinstance(request, Undecodable):
        return True
    return end_call(context, grpc.StatusCode.INVALID_ARGUMENT, not_this_message(request.reason))


def not_this_message(reason: str) -> str:
    """What a request that is not its method's message is told, `reason` being its parser's
    error (bounded as every status message is)."""
    text = f"the request is not this method's protobuf message ({reason})"
    return text.encode()[:MAX_MESSAGE_BYTES].decode(errors="ignore")
