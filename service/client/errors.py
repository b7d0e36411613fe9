"""The client's exceptions: one class per kind of failure a caller handles differently, each
carrying the gRPC status code and the server's message."""

from __future__ import annotations

import re

import grpc


class ClientError(Exception):
    """The server (or the transport to it) refused or failed a call.

    `code` is the gRPC status (None where the client itself found the problem) and `message`
    the server's text, without the `[CODE]` prefix a stream error carries.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code.name}: {message}" if code is not None else message)
        self.code = code
        self.message = message


class Unavailable(ClientError):
    """UNAVAILABLE: the server cannot be reached, is draining, or its state store is down.
    Raised once the retries the session allows are spent (or at once where a retry is unsafe)."""


class NotFound(ClientError):
    """NOT_FOUND: an unknown model or version, or one that was unloaded."""


class InvalidArgument(ClientError):
    """INVALID_ARGUMENT: an input of the wrong name, type or shape, a token outside the
    vocabulary, or a sequence the server does not know (never started, ended, evicted, or lost
    with a server that kept its states in memory)."""


class ResourceExhausted(ClientError):
    """RESOURCE_EXHAUSTED: a live-sequence limit (the model's, the principal's or the
    server's), a request-rate limit, or a message too large. A session sends a step refused by
    a request-rate limit again after the wait the server names (RetryPolicy.rate_limited), and
    raises this once RetryPolicy.timeout_s would be past."""

    @property
    def retry_after_s(self) -> float | None:
        """For a request-rate refusal, the seconds after which the server takes a request
        again ("retry in X s"); None otherwise."""
        found = re.search(r"retry in (\d+(?:\.\d+)?) s", self.message)
        return float(found.group(1)) if found else None


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: the server authenticates callers, and this one sent no token it knows
    (nor, under mutual TLS, a certificate naming a principal)."""


class PermissionDenied(ClientError):
    """PERMISSION_DENIED: the principal may not do this (loading or unloading models needs an
    admin principal)."""


class Aborted(ClientError):
    """ABORTED: the sequence is not at the version the session expected (another client or
    replica advanced it); the step was not applied."""

    @property
    def sequence_version(self) -> int | None:
        """The version the server says the sequence is at, when it says."""
        found = re.search(r"is at version (\d+)", self.message)
        return int(found.group(1)) if found else None


class OutputLost(ClientError):
    """The step was applied on the server, but its answer was lost (the connection broke or the
    replica died after running it) and the server does not send outputs again.

    The session's state is the one an uninterrupted run would have: the caller may go on with
    its next step; only this step's output is missing.
    """


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout. A session's step so
    abandoned may still be applied by the server; the session's next step settles which (see
    rnnserve.client.Session)."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}
_PREFIX = re.compile(r"\[([A-Z_]+)\] ?(.*)", re.DOTALL)


def error_for(code: grpc.StatusCode | None, message: str) -> ClientError:
    """The exception for a status code and its message."""
    kind = _BY_CODE.get(code, ClientError) if code is not None else ClientError
    return kind(message, code)


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    """The exception for a failed call (grpc.aio.AioRpcError and grpc.Call both have these)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return error_for(code, details)


def from_stream_error(text: str) -> ClientError:
    """The exception for a stream answer's `error_message`, "[CODE] message" in rnnserve's
    streams (Triton sends the message alone: then the code is unknown)."""
    found = _PREFIX.fullmatch(text)
    if found and found.group(1) in grpc.StatusCode.__members__:
        return error_for(grpc.StatusCode[found.group(1)], found.group(2))
    return ClientError(text)
