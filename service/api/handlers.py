"""A gRPC method handler run behind a guard: the one way the API layer wraps handlers
(authentication names the principal, parsing turns away requests that do not parse).

A guard sees each call's request (the request iterator, for a method that takes a stream)
and context before the method runs. It returns True to let the method run, or False once it
has ended the call itself with a status (`end_call`), and the method then never runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

Guard = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], bool]
"""(request, context) -> whether the method runs."""


def guarded(
    handler: grpc.RpcMethodHandler,
    guard: Guard,
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and response serializer that runs its method when
    `guard` lets the call through; `deserializer` replaces the request deserializer when
    given. A streamed response is relayed whether the method yields it (an async generator)
    or writes it (`context.write`)."""
    behavior = _behavior(handler)
    if inspect.isasyncgenfunction(behavior):

        async def relayed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if guard(request, context):
                async for response in behavior(request, context):
                    yield response

        run: Callable[..., Any] = relayed
    else:

        async def awaited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(request, context) if guard(request, context) else None

        run = awaited
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[handler.request_streaming, handler.response_streaming]
    return make(
        run,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def end_call(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> bool:
    """End the call with `code` and `details`; False, for a guard to return.

    It sets the status rather than calling `context.abort`, whose exception leaves the call's
    objects, the request among them, in reference cycles until the cyclic collector runs
    (tests/api/test_garbage.py). gRPC sends no message with a status that is not OK, so a
    unary call returns none and a stream ends without one.
    """
    context.set_code(code)
    context.set_details(details)
    return False


def _behavior(handler: grpc.RpcMethodHandler) -> Any:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream
    if handler.request_streaming:
        return handler.stream_unary
    if handler.response_streaming:
        return handler.unary_stream
    return handler.unary_unary
