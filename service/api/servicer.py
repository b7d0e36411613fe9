"""inference.GRPCInferenceService: the Open Inference Protocol with Triton's extensions.

This layer only translates between protocol messages and the engine (`rnnserve.serving`):
it decodes a request, hands it to the model version the registry resolves, and encodes the
outcome that comes back. Errors become statuses through `rnnserve.api.status` alone: a unary
call carries its error as its status, a stream in the response's `error_message` (as Triton
does), and the stream stays open. A call that ends before its answers are out (cancelled,
disconnected, past its deadline, or cut off by shutdown) cancels its requests that have not
started: they never run and are not applied.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from rnnserve import __version__
from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve._pb import model_config_pb2 as mc
from rnnserve.api.auth import MESSAGE, PRINCIPAL
from rnnserve.api.codec import (
    RequestDecoder,
    encode_response,
    encode_stream_error,
    encode_stream_response,
)
from rnnserve.api.handlers import end_call
from rnnserve.api.parsing import checked_handler
from rnnserve.api.status import status_of
from rnnserve.errors import ServiceError, Unauthenticated
from rnnserve.serving.model import ModelState, ServedModel
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, InferenceResult, Outcome
from rnnserve.serving.snapshot import ModelSnapshot

logger = logging.getLogger(__name__)

EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "sequence",
    "statistics",
    "explicit_state",
)
"""What ServerMetadata advertises: only what is implemented."""

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

UNKNOWN_MODEL = "_unknown"
"""Metric label for requests naming a model that is not served: client input never becomes a
label."""


class Cancellable(Protocol):
    """What the engine hands back for a queued request (`ServedModel.submit`)."""

    def cancel(self) -> None:
        """Drop the request unless it has started."""
        ...


class RequestObserver(Protocol):
    """Where the outcome and durations of each inference request go (the server's metrics)."""

    def observe_request(
        self,
        model: str,
        version: str,
        outcome: str,
        total_s: float,
        queue_s: float | None = None,
        compute_s: float | None = None,
    ) -> None:
        """One request of model `version`: `outcome` is OK or a status code's name; durations
        in seconds (total: decode to encode; queue and compute: the engine's)."""
        ...

    def refused_by_limit(self, limit: str) -> None:
        """A request was refused by one of the server's limits (`ServiceError.limit`)."""
        ...


Failure = tuple[grpc.StatusCode, str] | tuple[grpc.StatusCode, str, float]
"""A unary call's error: its status code and message, and when a retry can succeed (seconds
from now) where the server knows."""
Answer = bytes | Failure
"""What answers a request: a response's wire bytes, or its error (a unary call's; a stream's
errors are responses)."""

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def _unary(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """A unary method whose errors end the call with their status (`status_of`)."""
    empty = getattr(pb, f"{method.__name__}Response")

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - mapped to a status in one place
            # The status is set, not raised (see `end_call`); the empty one is never sent.
            end_call(context, *status_of(error))
            response: Response = empty()
            return response

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the model registry; `observer` hears every request.

    `max_stream_bytes`: what one stream may hold before it stops being read (`_Outbox`): the
    server's largest message, so that a client may queue requests whose answers fill one.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        observer: RequestObserver,
        max_stream_bytes: int = 64 * 1024 * 1024,
        known: Callable[[str], bool] | None = None,
    ) -> None:
        self.registry = registry
        self.observer = observer
        self.decoder = RequestDecoder()
        self.max_stream_bytes = max_stream_bytes
        self.known = known
        """Whether a principal the transport authenticated is still known (None: no check).
        Checked at every request: a stream authenticates once, when it opens, and a token
        revoked after that must not keep it going."""

    # ------------------------------------------------------------------ health
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        """Liveness (Open Inference Protocol): live=true whenever the server answers; OK."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        """Readiness (OIP): true while models are loaded and no shutdown has begun; OK."""
        return pb.ServerReadyResponse(ready=self.registry.ready)

    @_unary
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        """Model readiness (OIP): version and server ready; an unknown one is false, OK."""
        try:
            model = self.registry.get(request.name, request.version, any_state=True)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.state is ModelState.READY and self.registry.ready)

    # ------------------------------------------------------------------ metadata
    @_unary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        """Server metadata (OIP): name, version and the extensions implemented; OK."""
        return pb.ServerMetadataResponse(
            name="rnnserve", version=__version__, extensions=list(EXTENSIONS)
        )

    @_unary
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        """Model metadata (OIP): versions, platform, inputs and outputs (batch axis -1, states
        left out); NOT_FOUND, UNAVAILABLE, or INVALID_ARGUMENT for a version not a number."""
        model = self.registry.get(request.name, request.version, any_state=True)
        versions = self.registry.versions(model.name)
        response = pb.ModelMetadataResponse(
            name=model.name, versions=[str(v) for v in versions], platform=model.config.platform
        )
        # The batch axis leads every tensor; recurrent states are the server's and not listed.
        for spec in model.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])
        for spec in model.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])
        return response

    @_unary
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        """Triton's ModelConfig of the version; NOT_FOUND, UNAVAILABLE or INVALID_ARGUMENT."""
        model = self.registry.get(request.name, request.version, any_state=True)
        config = mc.ModelConfig()
        config.CopyFrom(model.config)
        return pb.ModelConfigResponse(config=config)

    @_unary
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        """Triton's ModelStatistics (statistics extension) of every loaded version, or of the
        named model's; NOT_FOUND, UNAVAILABLE or INVALID_ARGUMENT (as ModelMetadata)."""
        snapshots = self.registry.snapshot()
        if request.name:
            model = self.registry.get(request.name, request.version, any_state=True)  # or NOT_FOUND
            snapshots = [
                s
                for s in snapshots
                if s.name == model.name and (not request.version or s.version == model.version)
            ]
        response = pb.ModelStatisticsResponse()
        for snapshot in snapshots:
            _statistics(snapshot, response.model_stats.add())
        return response

    # ------------------------------------------------------------------ repository
    @_unary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        """Triton's repository index: models on disk or loaded, with state and reason; OK."""
        response = pb.RepositoryIndexResponse()
        for entry in self.registry.index():
            if request.ready and entry.state != "READY":
                continue
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    @_unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        """Load or reload a model by folder name (Triton's model_repository extension): OK once
        it serves exactly the versions its folder asks for; NOT_FOUND, INVALID_ARGUMENT,
        FAILED_PRECONDITION (invalid repository) or UNAVAILABLE (a version failed to load, or
        the server is shutting down), and then it serves what it did before; PERMISSION_DENIED
        for a principal not in the admin list when callers authenticate."""
        self.registry.policy.require_admin(PRINCIPAL.get())
        await self.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version of a model, its live sequences retiring in the background
        (Triton's model_repository extension); NOT_FOUND when it is not loaded;
        PERMISSION_DENIED for a principal not in the admin list when callers authenticate."""
        self.registry.policy.require_admin(PRINCIPAL.get())
        await self.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ shared memory
    # No shared-memory regions are supported, so there is never one to list or unregister;
    # answering these (as load generators call them on exit) keeps clients' cleanup happy.
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        """Triton's system shared-memory status: no region is ever registered, so none; OK."""
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        """Triton's system shared-memory unregister: nothing is registered; OK."""
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        """Triton's CUDA shared-memory status: no region is ever registered, so none; OK."""
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        """Triton's CUDA shared-memory unregister: nothing is registered; OK."""
        return pb.CudaSharedMemoryUnregisterResponse()

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, data: bytes, context: Any) -> bytes:
        """One inference (OIP); its metrics are recorded whatever the outcome.

        An error is the call's status: INVALID_ARGUMENT (a bad input or value, too many time
        steps, or a sequence that is not live or not the caller's), NOT_FOUND,
        FAILED_PRECONDITION (a stored state of other shapes), RESOURCE_EXHAUSTED (a sequence,
        request-rate or request-size limit, or an answer too large), ABORTED (lost a race, or
        sequence_version differs), UNAVAILABLE (model not ready, shutting down, state store
        down), CANCELLED; anything unexpected INTERNAL.
        """
        started = time.perf_counter()
        labels = (UNKNOWN_MODEL, "")
        try:
            request = self.decode(data, PRINCIPAL.get(), started)
            model = self.registry.resolve(request)
            labels = model.labels
            result = await model.infer(request)
            response = encode_response(result, request.id)
        except Exception as error:  # noqa: BLE001 - mapped to a status in one place
            # Set, not raised through `context.abort` (see `end_call`; measured: 100+ MB of
            # refused 1.5 MB requests held in cycles that way).
            end_call(context, *self.failed(error, labels, started))
            return b""
        except asyncio.CancelledError as error:
            self.failed(error, labels, started)
            raise
        self.succeeded(result, labels, started)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        """Triton's streaming inference: requests are taken in arrival order and answered as
        they finish.

        An error answers that request alone, in `error_message` as "[CODE] message" (the codes
        of ModelInfer); the stream stays open and ends OK. A client that half-closes gets every
        answer; a stream that ends otherwise (cancelled, disconnected, deadline, shutdown)
        drops its requests that have not started, as ModelInfer does.
        """
        outbox = _Outbox(self.max_stream_bytes)
        reader = asyncio.create_task(self._read_stream(request_iterator, outbox))
        try:
            while (response := await outbox.next()) is not None:
                yield response
        finally:
            reader.cancel()  # first: nothing is submitted after this
            # Nothing is outstanding after a normal end; otherwise no one waits for the rest.
            outbox.cancel_outstanding()
        await reader

    async def _read_stream(self, request_iterator: AsyncIterator[bytes], outbox: _Outbox) -> None:
        """Submit each request as it arrives; its outcome puts the answer in `outbox`.

        No task or future per request: a request is submitted synchronously (so the requests
        of one sequence keep their order) and the engine calls back once with its outcome.
        """
        try:
            async for data in request_iterator:
                self._stream_one(data, outbox)
                if outbox.full:
                    # Read no more until the client has taken answers: gRPC's flow control
                    # then holds the client's requests back, and memory stays bounded.
                    await outbox.room()
        finally:
            outbox.close()

    def _stream_one(self, data: bytes, outbox: _Outbox) -> None:
        held = len(data)  # what the stream holds for this request until it is answered
        key = outbox.expect(held)

        def reserve(model: ServedModel, request: InferenceRequest) -> None:
            nonlocal held
            if outbox.deep:
                reserved = model.answer_bytes_of(request)
                outbox.reserve(reserved)
                held += reserved

        # The reply names its request by `key`, never by its ticket: the ticket holds the
        # work, which holds this callback, and a cycle would leave every request's objects to
        # the cyclic garbage collector (measured: 4% of steps/s and p99 x1.7 at 64 streams).
        def reply(answer: Answer) -> None:
            assert isinstance(answer, bytes)  # in-band: errors are answers too
            outbox.put(answer, key, held)

        ticket = self.submit(data, reply, in_band=True, principal=PRINCIPAL.get(), resolved=reserve)
        if ticket is not None:
            outbox.track(key, ticket)

    def submit(
        self,
        data: bytes,
        reply: Callable[[Answer], None],
        *,
        in_band: bool,
        principal: str = "",
        received: float | None = None,
        resolved: Callable[[ServedModel, InferenceRequest], None] | None = None,
    ) -> Cancellable | None:
        """Admit, decode and submit one ModelInferRequest's wire bytes; `reply` hears its
        answer once, on the event loop: the response's bytes, or its error as (status code,
        message), or with `in_band` (a stream's request) as a response whose `error_message`
        says "[CODE] message".

        Whatever the transport, this is what a request means. `received` is when the transport
        received it (`time.perf_counter()` seconds; now when None); `resolved(model, request)`
        is called once its model is known, before it is submitted. Returns the ticket to
        cancel it with while it waits, or None when it was refused (and answered) at once; an
        accepted request is never answered inside this call.
        """
        started = time.perf_counter() if received is None else received
        try:
            request = self.decode(data, principal, started)
            model = self.registry.resolve(request)
        except Exception as error:  # noqa: BLE001 - each request is answered
            code, text = self.failed(error, (UNKNOWN_MODEL, ""), started)
            reply(encode_stream_error(*_echo_of(data), f"[{code.name}] {text}") if in_band
                  else _failure(code, text, error))  # fmt: skip
            return None
        if resolved is not None:
            resolved(model, request)
        labels = model.labels

        def answer(outcome: Outcome | Exception) -> None:
            if isinstance(outcome, InferenceResult):
                encode = encode_stream_response if in_band else encode_response
                reply(encode(outcome, request.id))
                self.succeeded(outcome, labels, started)
                return
            code, text = self.failed(outcome, labels, started)
            if in_band:
                message = f"[{code.name}] {text}"
                reply(encode_stream_error(request.model, request.version, request.id, message))
            else:
                reply(_failure(code, text, outcome))

        try:
            return model.submit(request, answer)
        except Exception as error:  # noqa: BLE001 - refused, or a model stopped meanwhile
            answer(error)
            return None

    def decode(self, data: bytes, principal: str, received: float) -> InferenceRequest:
        """The request in `data`, from `principal`, if the policy admits it; raises the
        ServiceError that refuses it (Unauthenticated, LimitExceeded, InvalidArgument)."""
        if self.known is not None and not self.known(principal):
            raise Unauthenticated(MESSAGE)
        self.registry.policy.admit(principal, len(data))
        return self.decoder.decode(data, principal, received)

    def succeeded(self, result: InferenceResult, labels: tuple[str, str], started: float) -> None:
        """Record a request answered OK (started at `started`, perf_counter seconds)."""
        self.observer.observe_request(
            *labels, "OK", time.perf_counter() - started, result.queue_s, result.compute_s
        )

    def failed(
        self, error: BaseException, labels: tuple[str, str], started: float
    ) -> tuple[grpc.StatusCode, str]:
        """Record a failed request; the status code and message its client gets."""
        code, text = status_of(error)
        self.observer.observe_request(*labels, code.name, time.perf_counter() - started)
        limit = getattr(error, "limit", None)
        if limit is not None:
            self.observer.refused_by_limit(limit)
        return code, text


def _failure(code: grpc.StatusCode, text: str, error: BaseException) -> Failure:
    retry = getattr(error, "retry_after_s", None)
    return (code, text) if retry is None else (code, text, retry)


def _echo_of(data: bytes) -> tuple[str, str, str]:
    """Model, version and id of a request that could not be decoded, as far as they can be read."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except Exception:  # noqa: BLE001 - not a request at all: nothing to echo
        return "", "", ""
    return message.model_name, message.model_version, message.id


MAX_STREAM_OUTSTANDING = 1024
"""Requests one stream may have read and not answered before the server stops reading it."""
SHALLOW_STREAM = 4
"""Outstanding requests of a stream whose answers are not reserved ahead (a stream's usual
one, or a few pipelined), so its requests take no estimate."""


class _Outbox:
    """One stream's answers in the order they are ready, whether more are coming, and the
    queued requests they will answer (to cancel them when no one is left to read them).

    It also bounds what the stream holds: while it is `full` (more than `max_held` bytes of
    requests read and not answered and of answers not yet taken by its client, or
    MAX_STREAM_OUTSTANDING requests), the reader awaits `room()` before reading the next
    request; one message over the bound still goes through.
    """

    __slots__ = (
        "_items",
        "_waiter",
        "_outstanding",
        "_closed",
        "_queued",
        "_read",
        "_held",
        "_room",
        "_max_held",
    )

    def __init__(self, max_held: int) -> None:
        self._max_held = max_held
        self._items: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._outstanding = 0
        self._closed = False
        self._queued: dict[int, Cancellable] = {}
        self._read = 0
        self._held = 0
        """Bytes of the requests read and not answered, and of the answers not yet taken."""
        self._room: asyncio.Future[None] | None = None

    def expect(self, nbytes: int) -> int:
        """A request of `nbytes` was read; its answer will come through `put`. Its key in this
        stream."""
        self._outstanding += 1
        self._read += 1
        self._held += nbytes
        return self._read

    @property
    def deep(self) -> bool:
        """Whether several requests are outstanding: then each reserves its answer's bytes
        (`reserve`), as answers many times their request's size would otherwise pile up
        before the first of them is counted."""
        return self._outstanding > SHALLOW_STREAM

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` more for the latest request's answer, until it comes."""
        self._held += nbytes

    @property
    def full(self) -> bool:
        """Whether the stream holds as much as it may: read nothing more for now."""
        return self._held > self._max_held or self._outstanding >= MAX_STREAM_OUTSTANDING

    async def room(self) -> None:
        """Return once the stream is no longer `full`."""
        while self.full:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def track(self, key: int, ticket: Cancellable) -> None:
        """Request `key` was queued as `ticket`, to be answered later through `put`."""
        self._queued[key] = ticket

    def put(self, response: bytes, key: int, held: int) -> None:
        """The answer to request `key`, which held `held` bytes (`expect` and `reserve`)."""
        self._queued.pop(key, None)
        self._items.append(response)
        self._outstanding -= 1
        self._held += len(response) - held
        self._wake()

    def cancel_outstanding(self) -> None:
        """No one will read the answers still to come: drop the requests that have not
        started (they are answered CANCELLED and never applied); a running one finishes."""
        queued, self._queued = self._queued, {}
        for ticket in queued.values():
            ticket.cancel()

    def close(self) -> None:
        """No more requests: the stream ends once every answer is out."""
        self._closed = True
        self._wake()

    async def next(self) -> bytes | None:
        """The next answer, or None once the requests ended and everything is answered."""
        while not self._items:
            if self._closed and self._outstanding == 0:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._items.popleft()
        self._held -= len(item)
        if self._room is not None and not self.full:
            room, self._room = self._room, None
            if not room.done():
                room.set_result(None)
        return item

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, except that inference requests and
    responses stay wire bytes (`codec` reads and writes them faster than protobuf's objects),
    and other requests that do not parse are INVALID_ARGUMENT (`parsing`)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        wire = method.name in _WIRE_METHODS
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = checked_handler(
            kind(
                getattr(servicer, method.name),
                request_deserializer=None if wire else request.FromString,
                response_serializer=None if wire else response.SerializeToString,
            )
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


_WIRE_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})
"""Methods whose requests arrive and responses leave as wire bytes (see `codec`)."""


def _statistics(model: ModelSnapshot, out: pb.ModelStatistics) -> None:
    stats = model.statistics
    out.name = model.name
    out.version = str(model.version)
    out.last_inference = stats.last_inference_ms
    out.inference_count = stats.inference_count
    out.execution_count = stats.execution_count
    infer = out.inference_stats
    infer.success.count, infer.success.ns = stats.success_count, stats.success_ns
    infer.fail.count, infer.fail.ns = stats.fail_count, stats.fail_ns
    infer.queue.count, infer.queue.ns = stats.success_count, stats.queue_ns
    infer.compute_infer.count, infer.compute_infer.ns = stats.success_count, stats.compute_ns
    infer.compute_input.count = infer.compute_output.count = stats.success_count
    for size, figures in sorted(stats.batches.items()):
        batch = out.batch_stats.add(batch_size=size)
        batch.compute_infer.count, batch.compute_infer.ns = figures.count, figures.compute_ns
        batch.compute_input.count = batch.compute_output.count = figures.count
