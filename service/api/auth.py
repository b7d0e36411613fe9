"""Authentication at the edge: a gRPC server interceptor that lets a call through only with a
bearer token the token file knows (`rnnserve.auth`), except health, liveness and readiness
(`OPEN_PREFIXES`), which probes and load balancers call without credentials.

A refused call ends UNAUTHENTICATED with the same message whatever it asked for, so it learns
nothing about which models or sequences exist; the refusal is counted by reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from rnnserve.auth import Refusal, TokenFile

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
"""Methods any caller may use: the health service and the protocol's server liveness and
readiness, which probes and load balancers call without credentials (model readiness is not
open: it would say which models exist)."""
MESSAGE = (
    "authentication required: send the metadata `authorization: Bearer <token>` with a token "
    "the server knows (--auth-tokens)"
)


class Authentication(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a known bearer token; `refused(reason)` hears each refusal."""

    def __init__(self, tokens: TokenFile, refused: Callable[[Refusal], None]) -> None:
        self.tokens = tokens
        self.refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, or one that refuses the call (see the module docstring)."""
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((v for k, v in metadata if k == "authorization"), None)
        found = self.tokens.principal(authorization if isinstance(authorization, str) else None)
        if not isinstance(found, Refusal):
            return handler
        self.refused(found)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED.

    It sets the status rather than calling `context.abort`, whose exception leaves the call's
    objects, the request among them, in reference cycles until the cyclic collector runs (as
    the servicer does; tests/api/test_garbage.py). gRPC sends no message with a status that is
    not OK, so the unary one returns none and the stream ends without one.
    """

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(MESSAGE)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(MESSAGE)
        return
        yield  # a generator, so gRPC treats it as a response stream

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, **serializers)
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
