"""Domain errors, each carrying the gRPC status code the API edge answers with.

Domain code raises these; one place in the API layer turns them into statuses. Their messages
are shown to clients as they are, so they say what was wrong and what to do.
"""

from __future__ import annotations

import grpc


class CommandError(Exception):
    """A problem the person at the terminal can fix; `rnnserve` prints it without a traceback
    and exits with `exit_code` (2: a usage error, 1: the job failed)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ServiceError(Exception):
    """An error a client or operator can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    limit: str | None = None
    """For a request refused by one of the server's limits: which one (the `reason` label of
    rnnserve_limit_refusals_total); None for every other error."""
    retry_after_s: float | None = None
    """When a retry can succeed, in seconds from now, where the server knows (a rate limit's
    next token): the HTTP port's Retry-After (RFC 9110 section 10.2.3)."""


class InvalidArgument(ServiceError):
    """A request the client must fix: malformed, or names, types or shapes the model refuses."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    """No model, or no loaded version, of that name (never there, or unloaded)."""

    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ServiceError):
    """A model that cannot serve now: it failed to load, has no ready version, or is being
    unloaded."""

    code = grpc.StatusCode.UNAVAILABLE


class SequenceNotFound(ServiceError):
    """A continuation for a sequence that is not live (never started, ended or evicted).

    INVALID_ARGUMENT, as Triton's sequence batcher answers a request without START for a
    sequence it does not hold ("must specify the START flag on the first request of the
    sequence"); clients key their retries on it. The message says which id and why.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(ServiceError):
    """A request over one of the server's limits (sequences, request rate, request bytes):
    RESOURCE_EXHAUSTED, as gRPC answers a message over its size limit. `limit` says which."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, limit: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class CapacityExhausted(LimitExceeded):
    """A new sequence for a model version that already holds its maximum of live sequences."""

    def __init__(self, message: str, limit: str = "model_sequences") -> None:
        super().__init__(message, limit)


class TooManySteps(InvalidArgument):
    """A request carrying more time steps than its model takes in one request (the request
    must be split, so INVALID_ARGUMENT rather than RESOURCE_EXHAUSTED: waiting never helps)."""

    limit = "time_steps"


class PermissionDenied(ServiceError):
    """An authenticated caller asking for what its principal may not do (an admin call)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ShuttingDown(ServiceError):
    """The server (or the replica handing the sequence over) is shutting down: retry, on
    another replica."""

    code = grpc.StatusCode.UNAVAILABLE


class InvalidModelRepository(ServiceError):
    """A model repository, or a model in it, that cannot be served: layout, config.pbtxt, or a
    config that contradicts the graph."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StateMismatch(ServiceError):
    """A stored state that this model version cannot continue (written for other state shapes)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    """A step that lost a race (another replica advanced the sequence first): not applied."""

    code = grpc.StatusCode.ABORTED


class StoreUnavailable(ServiceError):
    """The state store cannot be reached; the message names it."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreOutcomeUnknown(StoreUnavailable):
    """A write to the state store whose reply was lost (a timeout, a connection that broke
    after the command went out): it may or may not have been applied."""


class StoreRejected(StoreUnavailable):
    """The state store and this server do not accept each other: a wrong password or user, a
    server certificate that does not verify, or a client certificate it refuses. Waiting does
    not help; the server refuses to start with it."""


class UnusableCredentials(ServiceError):
    """A certificate, key, CA or password file that cannot be used: missing, unreadable, not
    PEM, or a key that does not match its certificate. The message names the file and flag."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CannotListen(ServiceError):
    """An address the server cannot listen on (the gRPC port, the metrics endpoint): a port in
    use, a host that is not this machine's, a port that needs privileges. The server does not
    start; the message names the address, the port, and the flag and variable that change it."""

    code = grpc.StatusCode.UNAVAILABLE


class AnswerTooLarge(ServiceError):
    """The answer to a request would not fit in one gRPC message (--max-message-bytes); the
    request was refused before it ran."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    limit = "answer_bytes"


class Unauthenticated(ServiceError):
    """The call's principal is no longer one the server knows (its token was revoked while
    its stream was open)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class RequestCancelled(ServiceError):
    """The request was cancelled (its client went away) before it ran; it was not applied."""

    code = grpc.StatusCode.CANCELLED


class InternalError(ServiceError):
    """Something failed that the client cannot fix; the details are in the server log only."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "internal error; see the server log") -> None:
        super().__init__(message)
