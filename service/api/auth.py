"""Authentication at the edge: who is calling, before any method runs.

A gRPC server interceptor names each call's principal, and lets the call through with it in
`PRINCIPAL` (a context variable the servicer reads and hands to the engine):
- a bearer token (`authorization: Bearer <token>`) the token file knows (`rnnserve.auth`)
  names the token's principal;
- under mutual TLS, a call without a token is its verified client certificate's principal
  (`rnnserve.tls.ClientIdentity.principal`: the subject's common name, else its first SAN).

Health, liveness and readiness (`OPEN_PREFIXES`) stay open: probes and load balancers call
them without credentials. Any other call without a principal ends UNAUTHENTICATED with the
same message whatever it asked for, so it learns nothing about which models or sequences
exist; the refusal is counted by reason. A call that presents a token the file does not know
is refused even when its certificate would do: a wrong token is a mistake to report, not to
paper over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
import grpc.aio

from rnnserve.api.handlers import end_call, guarded
from rnnserve.auth import Refusal, TokenFile
from rnnserve.tls import client_identity

PRINCIPAL: ContextVar[str] = ContextVar("rnnserve_principal", default="")
"""The calling principal, set for each call the interceptor let through; "" when the server
authenticates no one (all callers are then one principal)."""
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
CERTIFICATE_MESSAGE = (
    "authentication required: send the metadata `authorization: Bearer <token>` with a token "
    "the server knows (--auth-tokens), or a client certificate naming a principal (a subject "
    "common name or a subject alternative name)"
)

Refused = Callable[[Refusal], None]


class Authentication(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Names each call's principal from `tokens` (a token file) and, with `certificates`
    (mutual TLS on), from its client certificate; refuses calls with none. `refused(reason)`
    hears each refusal."""

    def __init__(self, tokens: TokenFile | None, certificates: bool, refused: Refused) -> None:
        self.tokens = tokens
        self.certificates = certificates
        self.refused = refused
        self.message = CERTIFICATE_MESSAGE if certificates else MESSAGE

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, run as its principal, or one that refuses the call."""
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(authorization, str):
            authorization = None
        if self.tokens is not None and (authorization is not None or not self.certificates):
            found = self.tokens.principal(authorization)
            if isinstance(found, Refusal):
                self.refused(found)
                return _refusing(handler, self.message)
            return _as_principal(handler, lambda _: found, self)
        return _as_principal(handler, _certificate_principal, self)


def _certificate_principal(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    identity = client_identity(context.auth_context())
    return identity.principal if identity is not None else None


def _as_principal(
    handler: grpc.RpcMethodHandler,
    principal_of: Callable[[grpc.aio.ServicerContext[Any, Any]], str | None],
    auth: Authentication,
) -> grpc.RpcMethodHandler:
    """`handler` run with `PRINCIPAL` set to `principal_of(context)`, or refused (MISSING)
    when that is None."""

    def enter(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        principal = principal_of(context)
        if principal is None:
            auth.refused(Refusal.MISSING)
            return end_call(context, grpc.StatusCode.UNAUTHENTICATED, auth.message)
        # Each call runs in its own asyncio task (grpc.aio), so this reaches this call only.
        PRINCIPAL.set(principal)
        return True

    return guarded(handler, enter)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED. The refused
    request is never read: no decode is spent on it either."""

    def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        return end_call(context, grpc.StatusCode.UNAUTHENTICATED, message)

    return guarded(handler, refuse, _discard)


def _discard(data: bytes) -> None:
    return None
