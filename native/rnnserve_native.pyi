"""rnnserve's native transport: the gRPC port served in Rust (tonic on tokio).

Rust serves HTTP/2, TLS, framing, flow control and authentication; Python's engine takes what
arrived in batches (`take`, when `wake_fd` turns readable) and hands answers back in batches
(`answer`). See rnnserve/api/native.py, its one user.
"""

from os import PathLike

__version__: str

Arrival = tuple[int, bool, bool, bytes, str | None, float]
"""(key, came on a stream, holds a provisional reservation for its answer (a deep stream's
request: say its answer's size in `answer`'s `reserved`), ModelInferRequest wire bytes,
principal or None, arrival time in seconds on CLOCK_MONOTONIC, the clock of
time.perf_counter())."""
Call = tuple[int, str, bytes, str | None]
"""(key, method name within inference.GRPCInferenceService, request wire bytes, principal)."""
Taken = tuple[
    list[Arrival],
    list[Call],
    list[int],
    list[tuple[int, str]],
    tuple[int, int, int],
    tuple[int, int, int],
    bool,
]
"""(arrivals, calls, keys cancelled after they were taken, log records as (Python logging
level, message), authentication refusals since the last take as (missing, malformed, unknown),
inference requests since the last take by protocol as (grpc, http, websocket), whether the
transport has stopped)."""

class Transport:
    """The gRPC port: started once, fed answers, stopped once."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        threads: int,
        max_message_bytes: int,
        http_port: int | None = None,
        tls_cert: str | PathLike[str] | None = None,
        tls_key: str | PathLike[str] | None = None,
        tls_client_ca: str | PathLike[str] | None = None,
        tokens: bool = False,
        auth_message: str = "",
        cold_methods: list[str] = ...,
        descriptors: bytes = b"",
        spin_us: int = 0,
        http_header_timeout_s: float = 10.0,
        http_body_timeout_s: float = 60.0,
    ) -> None:
        """`threads`: tokio's worker threads; `max_message_bytes`: the largest message either
        way; `http_port`: the HTTP port (the KServe v2 REST protocol, 0 for a free one), or
        None for none; `tokens`: callers present bearer tokens (`set_tokens` names them); with
        `tls_client_ca`, mutual TLS names principals too; `auth_message`: what a call refused
        authentication is told; `cold_methods`: the service's methods besides ModelInfer and
        ModelStreamInfer that Python answers (taken as calls); `descriptors`: an encoded
        FileDescriptorSet of the served services, for reflection; `spin_us`: how long a unary
        call, the only one waiting for Python, polls for its answer before it sleeps, in
        microseconds (0: never); `http_header_timeout_s`, `http_body_timeout_s`: how long the
        HTTP port waits for a request's headers (then closes the connection), then its body
        (then answers 408).
        ValueError when TLS has a certificate without a key or the reverse, or a timeout is
        not positive."""

    def start(self) -> int:
        """Bind and serve; the port bound. OSError when the address cannot be bound,
        ValueError when a TLS file cannot be used (the message names it)."""

    def http_port(self) -> int | None:
        """The HTTP port bound, or None when the transport serves none."""

    def wake_fd(self) -> int:
        """A descriptor that turns readable when there is something to take."""

    def spin_for_arrivals(self, max_us: int) -> bool:
        """Spin up to `max_us` microseconds, the GIL released, for something to take; whether
        something came."""

    def take(self) -> Taken:
        """Everything that arrived since the last take; requests of calls that ended
        meanwhile are dropped, never handed over."""

    def answer(
        self,
        ok: list[tuple[int, bytes]],
        failed: list[tuple[int, int, str, float]],
        reserved: list[tuple[int, int]],
    ) -> None:
        """Answer by key: `ok` with response wire bytes, `failed` with (gRPC status code,
        message, seconds until a retry can succeed or 0 when unknown: the HTTP port's
        Retry-After); `reserved`: what the answers to stream requests decoded meanwhile will take,
        by key (a deep stream reserves that much for each). Answers to calls that ended are
        dropped."""

    def set_health(self, service: str, serving: bool) -> None:
        """grpc.health.v1 status of `service` ("" is the server): SERVING or NOT_SERVING."""

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""

    def set_tokens(self, tokens: list[tuple[bytes, str]]) -> None:
        """The bearer tokens callers may present, as (SHA-256 digest, principal) pairs."""

    def set_answer_bound(self, per_request_byte: float, fixed: int) -> None:
        """The most bytes an answer takes: per_request_byte x its request's bytes + fixed."""

    def outstanding(self) -> int:
        """Requests handed over (or queued) and not answered."""

    def stop(self, grace_s: float) -> None:
        """No new connections or calls; those in flight get `grace_s` seconds, then are
        answered UNAVAILABLE and a take reports the transport stopped."""

    def close(self) -> None:
        """End the transport's threads and what connections they still hold."""
