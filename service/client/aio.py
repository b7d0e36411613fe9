"""The asyncio client: many sequences (sessions) over one shared ModelStreamInfer stream.

    async with Client("127.0.0.1:8001") as client:
        async with client.session("sensor_gru") as s:
            forecast = await s.step(readings)  # [B=1, T, 1] in, [1, T, 1] out

Shapes are batch-first, as the server's protocol carries them: an input is [B, T, F...] (a
[T, F...] array gets B=1 added), an output [B, T, O...]. Inside a server-side sequence B is 1;
in explicit-state mode any B.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import ArrayLike

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve._pb import model_config_pb2 as mc
from rnnserve.client.closing import AsyncClosing
from rnnserve.client.errors import (
    Aborted,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OutputLost,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
    from_stream_error,
)
from rnnserve.client.sequence import SEQUENCE_ID_HEADER, sequence_id_header
from rnnserve.repository.signature import WIRE_DTYPES, wire_name

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

# A restarted server should be found again within the retry window, not after gRPC's default
# reconnect backoff (1 s, growing to 120 s).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: its name, wire data type (FP32, INT64...) and the dimensions
    after the batch (-1: any length, the time axis)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def datatype_numpy(self) -> np.dtype[np.generic]:
        """The numpy type the data travels as (little-endian)."""
        return WIRE_DTYPES[self.datatype]


@dataclass(frozen=True)
class StateInfo:
    """One recurrent state the server carries: sent as `input_name`, returned as
    `output_name`, [B, *dims] batch-first."""

    input_name: str
    output_name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about a served model (from ModelConfig and ModelReady)."""

    name: str
    versions: tuple[str, ...]
    """The versions the repository index lists (empty when only the config was read)."""
    ready: bool
    streamable: bool
    """Whether a sequence can be fed a few time steps at a time (False for a bidirectional
    network, which needs the whole sequence in one request)."""
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    states: tuple[StateInfo, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)
    """The config's string parameters (description, unit, vocabulary...)."""
    reason: str = ""
    """Why the model is not ready, where the server says."""

    @classmethod
    def from_config(
        cls, config: mc.ModelConfig, ready: bool, versions: Sequence[str] = ()
    ) -> ModelInfo:
        """The info a ModelConfig carries, with the readiness and versions given."""
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        return cls(
            name=config.name,
            versions=tuple(versions),
            ready=ready,
            streamable=parameters.get("streamable", "true") == "true",
            inputs=tuple(
                TensorInfo(i.name, wire_name(i.data_type), tuple(i.dims)) for i in config.input
            ),
            outputs=tuple(
                TensorInfo(o.name, wire_name(o.data_type), tuple(o.dims)) for o in config.output
            ),
            states=tuple(
                StateInfo(s.input_name, s.output_name, wire_name(s.data_type), tuple(s.dims))
                for s in config.sequence_batching.state
            ),
            parameters=parameters,
        )


@dataclass(frozen=True)
class Health:
    """The server's answers to ServerLive, ServerReady and grpc.health.v1 (overall)."""

    live: bool
    ready: bool
    serving: str
    """SERVING, NOT_SERVING (draining) or UNKNOWN."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a step that failed UNAVAILABLE is sent again (where that is safe: see Session), and
    how long a step refused by a request-rate limit waits to be sent again."""

    attempts: int = 20
    """Sends of one step that failed UNAVAILABLE, in all, the first included (1: never
    retry)."""
    timeout_s: float = 30.0
    """Seconds from the first send after which no retry starts (rate refusals included)."""
    backoff_s: float = 0.1
    """Seconds to wait before the first retry after UNAVAILABLE; doubles each time, up to
    `max_backoff_s`."""
    max_backoff_s: float = 2.0
    rate_limited: bool = True
    """Whether a step refused RESOURCE_EXHAUSTED by a request-rate limit ("retry in X s": the
    server refused it before reading it, so it is always safe to send again) is sent again
    after the wait the server names, for as long as `timeout_s` allows."""


def _read_pem(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


_BROKEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
"""Codes that end a stream as a whole when its connection breaks (besides UNAVAILABLE)."""


class _Stream:
    """One ModelStreamInfer call; answers are matched to requests by request id.

    The stream breaks as a whole (the server died, the connection dropped): every request
    waiting on it then fails with the same error, and the client opens a new stream.
    """

    def __init__(self, stub: Any, metadata: Metadata) -> None:
        self._queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self.broken: ClientError | None = None
        self._call = stub.ModelStreamInfer(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[pb.ModelInferRequest]:
        while (request := await self._queue.get()) is not None:
            yield request

    async def _read(self) -> None:
        error: ClientError = Unavailable(
            "the server closed the stream", grpc.StatusCode.UNAVAILABLE
        )
        try:
            async for reply in self._call:
                answer = reply.infer_response
                future = self._pending.pop(answer.id, None)
                if future is None or future.done():
                    logger.warning("an answer for no waiting request (id %r)", answer.id)
                elif reply.error_message:
                    future.set_exception(from_stream_error(reply.error_message))
                else:
                    future.set_result(answer)
        except grpc.aio.AioRpcError as failure:
            error = from_rpc_error(failure)
            if failure.code() in _BROKEN:
                # Answers to requests travel in-band; a status that ends the whole stream
                # means the connection broke (a server killed mid-write shows as INTERNAL
                # "Internal error from Core"): whether the requests on it ran is unknown, as
                # after UNAVAILABLE, and the same (safe) retries apply.
                error = Unavailable(
                    f"the stream broke ({failure.code().name}: {failure.details()})",
                    grpc.StatusCode.UNAVAILABLE,
                )
        except asyncio.CancelledError:
            error = ClientError("the client closed the stream", grpc.StatusCode.CANCELLED)
        finally:
            self.broken = error
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    def send(self, request: pb.ModelInferRequest) -> asyncio.Future[pb.ModelInferResponse]:
        """Queue `request`; the future is its answer (or the error that answered it)."""
        if self.broken is not None:
            raise type(self.broken)(self.broken.message, self.broken.code)
        future: asyncio.Future[pb.ModelInferResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        self._queue.put_nowait(request)
        return future

    async def close(self, timeout_s: float = 5.0) -> None:
        """Half-close, let the answers still due arrive, then end the call."""
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        except TimeoutError:
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class Client(AsyncClosing):
    """A connection to an rnnserve (or Triton) server at `url` (host:port); asyncio.

    Use it as `async with Client(url) as client`, or call `open()` and `close()`. Sessions it
    makes share one bidirectional ModelStreamInfer stream (answers are matched by request id);
    unary calls (health, models) go over the same channel.

    TLS: `tls=True` verifies the server against `root_certificates` (a PEM file; default: the
    system's CAs); `private_key` and `certificate_chain` (PEM files) are the client's
    certificate for mutual TLS. Any of the files turns TLS on. `token` is sent on every call as
    `authorization: Bearer <token>` (what a server started with --auth-tokens asks for).

    `timeout_s` (seconds) bounds each unary call and the wait for each step's answer
    (DeadlineExceeded; a step so abandoned is settled by its session's next step). `retry`
    says which failed steps are sent again (RetryPolicy). Errors are ClientError subclasses
    (rnnserve.client.errors), each with the gRPC status code and the server's message.
    """

    def __init__(
        self,
        url: str,
        *,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        token: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._tls = tls or any(
            f is not None for f in (root_certificates, private_key, certificate_chain)
        )
        self._pem = (root_certificates, private_key, certificate_chain)
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._stream: _Stream | None = None
        self._stream_lock: asyncio.Lock | None = None
        self._configs: dict[tuple[str, str], ModelInfo] = {}
        self._ids = itertools.count(1)

    async def open(self) -> Client:
        """Create the channel (it connects on the first call). Raises OSError for a TLS file
        that cannot be read."""
        if self._tls:
            credentials = grpc.ssl_channel_credentials(*(_read_pem(p) for p in self._pem))
            self._channel = grpc.aio.secure_channel(self.url, credentials, _CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.url, _CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._stream_lock = asyncio.Lock()
        return self

    async def close(self) -> None:
        """Close the shared stream (answers still due are awaited briefly) and the channel."""
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # ------------------------------------------------------------------ unary calls
    async def _unary(self, method: str, request: Any) -> Any:
        if self._stub is None:
            raise ClientError("the client is not open: use `async with Client(url)`")
        try:
            return await getattr(self._stub, method)(
                request, metadata=self._metadata, timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def health(self) -> Health:
        """Liveness, readiness and the grpc.health.v1 status. Raises Unavailable when the
        server cannot be reached."""
        live = await self._unary("ServerLive", pb.ServerLiveRequest())
        ready = await self._unary("ServerReady", pb.ServerReadyRequest())
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                metadata=self._metadata,
                timeout=self.timeout_s,
            )
            serving = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.UNIMPLEMENTED:  # Triton has no Health
                raise from_rpc_error(error) from None
            serving = "UNKNOWN"
        return Health(live=live.live, ready=ready.ready, serving=serving)

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        """The model's inputs, outputs, states and readiness (cached per client). Raises
        NotFound for an unknown model or version."""
        key = (model, version)
        if key not in self._configs:
            config = await self._unary(
                "ModelConfig", pb.ModelConfigRequest(name=model, version=version)
            )
            ready = await self._unary(
                "ModelReady", pb.ModelReadyRequest(name=model, version=version)
            )
            self._configs[key] = ModelInfo.from_config(config.config, ready.ready)
        return self._configs[key]

    async def models(self) -> list[ModelInfo]:
        """Every model of the server's repository, with its versions and readiness; a model
        that failed to load has ready False, its reason, and no inputs or outputs."""
        index = await self._unary("RepositoryIndex", pb.RepositoryIndexRequest())
        by_name: dict[str, list[Any]] = {}
        for entry in index.models:
            by_name.setdefault(entry.name, []).append(entry)
        found = []
        for name, entries in sorted(by_name.items()):
            versions = tuple(sorted((e.version for e in entries if e.version), key=_version_key))
            reasons = "; ".join(e.reason for e in entries if e.reason)
            ready = any(e.state == "READY" for e in entries)
            try:
                config = await self._unary("ModelConfig", pb.ModelConfigRequest(name=name))
            except ClientError:
                found.append(ModelInfo(name, versions, False, False, (), (), (), {}, reasons))
                continue
            info = ModelInfo.from_config(config.config, ready, versions)
            found.append(
                ModelInfo(
                    info.name, versions, ready, info.streamable, info.inputs,
                    info.outputs, info.states, info.parameters, reasons,
                )
            )  # fmt: skip
        return found

    # ------------------------------------------------------------------ sessions
    def session(
        self,
        model: str,
        *,
        version: str = "",
        explicit_state: bool = False,
        sequence_id: int | str | None = None,
        own_stream: bool = False,
    ) -> Session:
        """A session of `model`: a server-side sequence, or with `explicit_state` a state the
        client keeps (see Session). Use it as `async with client.session(model) as s`.

        `own_stream` gives the session a stream of its own carrying its id in the
        x-sequence-id header, for a proxy that routes sequences by header to replicas without
        a shared state store (deploy/envoy); by default sessions share the client's stream.
        """
        return Session(
            self,
            model,
            version=version,
            explicit_state=explicit_state,
            sequence_id=sequence_id,
            own_stream=own_stream,
        )

    def _next_id(self) -> str:
        return str(next(self._ids))

    def _forget(self, model: str) -> None:
        """Drop what was read of `model`: it was unloaded, and may come back changed."""
        self._configs = {key: info for key, info in self._configs.items() if key[0] != model}

    async def _shared_stream(self) -> _Stream:
        assert self._stream_lock is not None, "the client is not open"
        async with self._stream_lock:
            if self._stream is None or self._stream.broken is not None:
                self._stream = self._open_stream(self._metadata)
            return self._stream

    def _open_stream(self, metadata: Metadata) -> _Stream:
        if self._stub is None:
            raise ClientError("the client is not open: use `async with Client(url)`")
        return _Stream(self._stub, metadata)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


@dataclass
class _Abandoned:
    """Steps of a sequence whose caller stopped waiting for their answers (a deadline, a
    cancelled await): the server may still apply them. Only the latest one's answer is kept;
    with the version check at most one of the `count` steps sent from `version` applies."""

    answer: asyncio.Future[pb.ModelInferResponse]
    version: int
    """The sequence's version the steps were sent from (0: before its START)."""
    count: int
    start: bool
    """Whether the first of them was the sequence's START."""
    end: bool
    """Whether the latest of them ends the sequence."""


_OUTCOME_UNKNOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
"""A step that failed so may or may not have been applied: its answer, not the step, was
lost."""


class Session(AsyncClosing):
    """One sequence of a model: its steps run in order on the server, which carries the state.

    A session picks an unguessable 63-bit sequence id (`secrets`) unless given one, sends
    START with its first step and END with `step(..., end=True)` or on `close()` (then a step
    of zeros, whose output is dropped: the protocol ends a sequence only with a request).

    Explicit-state mode (`explicit_state=True`): no sequence id; the session sends the state
    itself (`h_in`, `c_in`: zeros at first, [B, *dims] float32) and asks for the new one
    (`h_out`, `c_out`), so any replica can serve any step. `state` reads it (a dict keyed by
    the state input names) and, assigned, restores it: a saved state continues exactly where
    it was saved.

    Retries (Client.retry): a step answered UNAVAILABLE, or lost with a broken stream, is sent
    again only where that cannot apply it twice:
    - explicit state: always (the request carries the state; the server keeps nothing);
    - a START: always (a START for a live id restarts the sequence from the zero state);
    - a later step: only when the server reported the sequence's `sequence_version` (rnnserve
      does, Triton does not). The step is sent with the version the session last saw. If the
      server answers ABORTED "is at version v+1" to a retry, the step had been applied and its
      answer lost: the session moves on to v+1 and raises OutputLost; the state is right and
      the next step continues it (only that step's output is gone, as the server does not keep
      answers). An END retried after it had been applied finds the sequence gone
      (INVALID_ARGUMENT): that too is OutputLost, and the session counts as ended.
    A step refused RESOURCE_EXHAUSTED by a request-rate limit ("retry in X s") was not read by
    the server: it is sent again after the wait the server names, within `RetryPolicy.timeout_s`.

    Abandoned steps: a step whose answer the caller stops waiting for (DeadlineExceeded after
    `Client.timeout_s`, or its `await` cancelled, as Ctrl-C does) may still be applied by the
    server; its output is lost either way, as with OutputLost. The session settles it with its
    next step (or `close()`): that step is sent with the version the session last saw, and if
    the server reports the sequence one step further on, the abandoned step was applied and the
    session adopts that version and sends the step again from it; if the server reports the
    sequence ended (an abandoned END), the session counts as ended. So a session goes on from
    whatever the server holds, and `sequence_version` says which it was.
    Any other error is raised at once and leaves the session where it was.
    """

    def __init__(
        self,
        client: Client,
        model: str,
        *,
        version: str = "",
        explicit_state: bool = False,
        sequence_id: int | str | None = None,
        own_stream: bool = False,
    ) -> None:
        self.client = client
        self.model = model
        self.version = version
        self.explicit_state = explicit_state
        if explicit_state and sequence_id is not None:
            raise ValueError("an explicit-state session has no sequence id")
        self.sequence_id: int | str | None = (
            None if explicit_state else (sequence_id or secrets.randbits(63) or 1)
        )
        self.info: ModelInfo | None = None
        self.sequence_version: int | None = None
        """How many requests the server says the sequence has advanced through."""
        self._own_stream = own_stream
        self._stream: _Stream | None = None
        self._state: dict[str, np.ndarray] | None = None
        self._started = False
        self._ended = False
        self._abandoned: _Abandoned | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> Session:
        """Read the model's config. Raises NotFound for an unknown model, Unavailable when the
        server cannot be reached, InvalidArgument for explicit state on a stateless model."""
        self.info = await self.client.model_info(self.model, self.version)
        if self.explicit_state and not self.info.states:
            raise InvalidArgument(f"model {self.model} declares no state to keep explicitly")
        if self._own_stream:
            self._stream = self.client._open_stream(self._stream_metadata())
        return self

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        """Explicit-state mode: the state after the last step (None before the first), keyed
        by state input name (h_in, c_in), each [B, *dims]. Assign a saved one to restore it,
        or None to start again from zeros."""
        if self._state is None:
            return None
        return {name: array.copy() for name, array in self._state.items()}

    @state.setter
    def state(self, value: Mapping[str, ArrayLike] | None) -> None:
        if not self.explicit_state:
            raise ValueError("the state of a server-side sequence stays on the server")
        self._state = None if value is None else {k: np.asarray(v) for k, v in value.items()}

    async def step(
        self, x: ArrayLike | Mapping[str, ArrayLike], *, end: bool = False
    ) -> np.ndarray:
        """Send new time steps; return the model's first output for them.

        `x` is the model's (first) input, [B, T, F...] or [T, F...] (B=1 added), of the
        config's data type (charlm_lstm: int64 token ids [B, T]; sensor_gru: float32 readings
        in degC [B, T, 1]); a mapping gives several inputs by name. The output is [B, T, O...]
        (a forecast in the model's unit, logits, probabilities). `end=True` ends the sequence
        after this step. Raises the ClientError subclasses listed in Session's description;
        DeadlineExceeded when no answer came within `Client.timeout_s` seconds (the step may
        still be applied: the next step settles it).
        """
        outputs = await self.infer(x, end=end)
        assert self.info is not None
        return outputs[self.info.outputs[0].name]

    async def infer(
        self, x: ArrayLike | Mapping[str, ArrayLike], *, end: bool = False
    ) -> dict[str, np.ndarray]:
        """Like `step`, returning every output by name (states excluded)."""
        if self.info is None:
            await self.open()
        assert self.info is not None
        async with self._lock:
            inputs = self._inputs(x)
            self._settle()
            if self._ended:
                raise ClientError(f"sequence {self.sequence_id} has ended")
            answer = await self._send(inputs, end)
            outputs = _outputs(answer)
            if self.explicit_state:
                self._state = {s.input_name: outputs.pop(s.output_name) for s in self.info.states}
            else:
                self._advanced(answer, end)
            return outputs

    async def close(self) -> None:
        """End the sequence if it is open (a step of zeros with END; its output is dropped)
        and close the session's own stream, if it has one. Raises what a step raises."""
        try:
            if self.info is not None and not self.explicit_state:
                async with self._lock:
                    self._settle()
                    if (self._started or self._abandoned is not None) and not self._ended:
                        zeros = {
                            i.name: np.zeros(
                                (1, 1, *(max(d, 1) for d in i.dims[1:])), i.datatype_numpy
                            )
                            for i in self.info.inputs
                        }
                        try:
                            self._advanced(await self._send(zeros, end=True), end=True)
                        except OutputLost:
                            pass  # the END took effect
        finally:
            if self._stream is not None:
                await self._stream.close()

    # ------------------------------------------------------------------ internals
    def _inputs(self, x: ArrayLike | Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        assert self.info is not None
        given = x if isinstance(x, Mapping) else {self.info.inputs[0].name: x}
        inputs = {}
        for spec in self.info.inputs:
            if spec.name not in given:
                raise InvalidArgument(f"model {self.model} needs input {spec.name}")
            array = np.asarray(given[spec.name], dtype=WIRE_DTYPES[spec.datatype])
            if array.ndim == len(spec.dims):
                array = array[None]
            if array.ndim != len(spec.dims) + 1 or any(
                d >= 0 and d != n for d, n in zip(spec.dims, array.shape[1:], strict=True)
            ):
                raise InvalidArgument(
                    f"input {spec.name} of {self.model} is [B, {', '.join(map(_dim, spec.dims))}]"
                    f", got an array of shape {list(array.shape)}"
                )
            inputs[spec.name] = np.ascontiguousarray(array)
        unknown = set(given) - set(inputs)
        if unknown:
            raise InvalidArgument(f"model {self.model} has no input {', '.join(sorted(unknown))}")
        return inputs

    def _request(self, inputs: Mapping[str, np.ndarray], end: bool) -> pb.ModelInferRequest:
        assert self.info is not None
        request = pb.ModelInferRequest(
            model_name=self.model, model_version=self.version, id=self.client._next_id()
        )
        tensors = dict(inputs)
        if self.explicit_state:
            batch = next(iter(inputs.values())).shape[0]
            for spec in self.info.states:
                saved = (self._state or {}).get(spec.input_name)
                if saved is None:
                    saved = np.zeros((batch, *spec.dims), WIRE_DTYPES[spec.datatype])
                tensors[spec.input_name] = np.ascontiguousarray(
                    saved, dtype=WIRE_DTYPES[spec.datatype]
                )
            wanted = [o.name for o in self.info.outputs] + [s.output_name for s in self.info.states]
            for name in wanted:
                request.outputs.add(name=name)
        for name, array in tensors.items():
            datatype = next(
                (i.datatype for i in self.info.inputs if i.name == name),
                next((s.datatype for s in self.info.states if s.input_name == name), "FP32"),
            )
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        if not self.explicit_state:
            parameters = request.parameters
            if isinstance(self.sequence_id, str):
                parameters["sequence_id"].string_param = self.sequence_id
            else:
                assert self.sequence_id is not None
                parameters["sequence_id"].int64_param = self.sequence_id
            # After an abandoned START whose fate is unknown, the step continues the sequence
            # that START would have begun; "never started" then says to send the START again.
            start = not self._started and self._abandoned is None
            parameters["sequence_start"].bool_param = start
            parameters["sequence_end"].bool_param = end
            expected = self.sequence_version if self._started else None
            if not self._started and self._abandoned is not None:
                expected = 1
            if expected is not None:
                parameters["sequence_version"].int64_param = expected
        return request

    def _advanced(self, answer: pb.ModelInferResponse, end: bool) -> None:
        """A step of the sequence was answered: the server's version accounts for every step
        abandoned before it."""
        self._started, self._ended = True, end
        self._abandoned = None
        if "sequence_version" in answer.parameters:
            self.sequence_version = answer.parameters["sequence_version"].int64_param

    def _settle(self) -> None:
        """Learn what became of the abandoned steps from the latest one's answer, if it came."""
        abandoned = self._abandoned
        if abandoned is None or not abandoned.answer.done() or abandoned.answer.cancelled():
            return
        failure = abandoned.answer.exception()
        if failure is None:
            logger.debug(
                "an abandoned step of sequence %s was applied; the session goes on from it",
                self.sequence_id,
            )
            self._advanced(abandoned.answer.result(), abandoned.end)
        elif isinstance(failure, Aborted) and self._adopt(failure):
            pass
        elif isinstance(failure, ClientError) and failure.code not in _OUTCOME_UNKNOWN:
            if abandoned.count == 1:  # refused: not applied
                self._abandoned = None

    def _adopt(self, refusal: Aborted | InvalidArgument) -> bool:
        """Whether `refusal` of a step tells what became of the abandoned steps; if so, the
        session now stands where the server does."""
        abandoned = self._abandoned
        if abandoned is None:
            return False
        if isinstance(refusal, Aborted):
            reported = refusal.sequence_version
            if reported is None or not 0 < reported - abandoned.version <= abandoned.count:
                return False
            logger.debug(
                "an abandoned step of sequence %s was applied (the server is at version %d); "
                "the session goes on from it",
                self.sequence_id,
                reported,
            )
            self.sequence_version, self._started = reported, True
            self._abandoned = None
            return True
        if not _not_live(refusal):
            return False
        if abandoned.end:  # an abandoned END was applied
            self._abandoned = None
            self._started = self._ended = True
            return True
        if abandoned.start and not self._started:  # an abandoned START was not
            self._abandoned = None
            return True
        return False

    def _abandon(
        self, answer: asyncio.Future[pb.ModelInferResponse], start: bool, end: bool
    ) -> None:
        """The caller stopped waiting for `answer`, to a step of the sequence."""
        answer.add_done_callback(_retrieved)
        if self.explicit_state:
            return  # the server keeps nothing: the step changed nothing the session relies on
        before = self._abandoned
        if before is not None:
            self._abandoned = _Abandoned(
                answer, before.version, before.count + 1, before.start, end
            )
        else:
            version = (self.sequence_version or 0) if self._started else 0
            self._abandoned = _Abandoned(answer, version, 1, start, end)

    def _retry_is_safe(self) -> bool:
        return self.explicit_state or not self._started or self.sequence_version is not None

    async def _send(self, inputs: Mapping[str, np.ndarray], end: bool) -> pb.ModelInferResponse:
        policy = self.client.retry
        first = time.monotonic()
        failures = 0  # sends that failed UNAVAILABLE
        while True:
            request = self._request(inputs, end)
            try:
                return await self._exchange(request)
            except Unavailable as error:
                failures += 1
                elapsed = time.monotonic() - first
                if (
                    failures >= policy.attempts
                    or elapsed >= policy.timeout_s
                    or not self._retry_is_safe()
                ):
                    raise
                wait = min(policy.backoff_s * 2 ** (failures - 1), policy.max_backoff_s)
                logger.info(
                    "step of %s unavailable (%s); sending it again in %.1f s",
                    self.model,
                    error.message,
                    wait,
                )
                await asyncio.sleep(wait)
            except ResourceExhausted as error:
                wait = error.retry_after_s
                if (
                    wait is None
                    or not policy.rate_limited
                    or time.monotonic() - first + wait >= policy.timeout_s
                ):
                    raise
                logger.debug("step of %s rate-limited; sent again in %.3f s", self.model, wait)
                await asyncio.sleep(max(wait, 0.001))
            except (Aborted, InvalidArgument) as error:
                if self.explicit_state:
                    raise
                self._refused(error, end, resent=failures > 0)
            except NotFound:
                self.client._forget(self.model)  # unloaded: a later session reads it again
                raise

    def _refused(self, error: Aborted | InvalidArgument, end: bool, resent: bool) -> None:
        """A step of the sequence was refused ABORTED or INVALID_ARGUMENT: return to send it
        again from where the server stands (an abandoned step was applied, or an abandoned
        START was not); raise OutputLost where the refusal shows that the step itself was
        applied before its answer was lost (`resent`: it was sent again after UNAVAILABLE);
        else raise `error`."""
        if self._adopt(error):
            if not self._ended:
                return
            message = f"sequence {self.sequence_id} has ended: its END was applied"
            if end:
                raise OutputLost(message, error.code) from error
            raise ClientError(message) from error
        if not resent or not self._started:
            raise error
        assert self.sequence_version is not None
        applied = self.sequence_version + 1
        if isinstance(error, Aborted) and error.sequence_version == applied:
            self.sequence_version = applied
            self._ended = end
            raise OutputLost(
                f"step {applied} of sequence {self.sequence_id} was applied before "
                f"its answer was lost; the sequence goes on from it"
            ) from error
        if isinstance(error, InvalidArgument) and end:
            self._ended = True
            raise OutputLost(
                f"the END of sequence {self.sequence_id} was applied before its answer was lost"
            ) from error
        raise error

    def _stream_metadata(self) -> Metadata:
        header = (SEQUENCE_ID_HEADER, sequence_id_header(self.sequence_id or 0))
        return (*self.client._metadata, header)

    async def _current_stream(self) -> _Stream:
        if not self._own_stream:
            return await self.client._shared_stream()
        if self._stream is None or self._stream.broken is not None:
            # A broken stream stays broken: every later step would fail on it.
            self._stream = self.client._open_stream(self._stream_metadata())
        return self._stream

    async def _exchange(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        stream = await self._current_stream()
        answer = stream.send(request)
        # Read without indexing: indexing a protobuf map adds the key.
        flags = {
            k: v.bool_param for k, v in request.parameters.items() if k.startswith("sequence_")
        }
        start, end = flags.get("sequence_start", False), flags.get("sequence_end", False)
        try:
            # asyncio.wait, not wait_for: a late answer still reaches the future, and the next
            # step learns from it what became of this one.
            done, _ = await asyncio.wait((answer,), timeout=self.client.timeout_s)
        except asyncio.CancelledError:
            self._abandon(answer, start, end)
            raise
        if not done:
            self._abandon(answer, start, end)
            raise DeadlineExceeded(
                f"no answer within {self.client.timeout_s} s (the step may still be applied: "
                f"the session's next step settles it)",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return answer.result()


def _not_live(refusal: InvalidArgument) -> bool:
    """Whether `refusal` says the sequence is not live (rnnserve), or needs a START (Triton)."""
    return "not live" in refusal.message or "START" in refusal.message


def _retrieved(answer: asyncio.Future[pb.ModelInferResponse]) -> None:
    """Mark an abandoned answer's failure as seen (asyncio logs one never retrieved)."""
    if not answer.cancelled():
        answer.exception()


def _dim(d: int) -> str:
    return "T" if d < 0 else str(d)


def _outputs(answer: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    outputs = {}
    for tensor, raw in zip(answer.outputs, answer.raw_output_contents, strict=True):
        array = np.frombuffer(raw, WIRE_DTYPES[tensor.datatype])
        outputs[tensor.name] = array.reshape(tuple(tensor.shape))
    return outputs
