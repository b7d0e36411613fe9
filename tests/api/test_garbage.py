"""No request leaves reference cycles behind: its objects go by reference counting alone.

Every request allocates a handful of objects (decoded request, work, ticket, outcome, callback).
A cycle among them leaves all of them to Python's cyclic garbage collector, whose collections
then run often and pause the event loop: measured once at 4% of the steps per second and 1.7x
the p99 at 64 streams (docs/performance.md). The real servicer and engine run in process here,
with the collector off, and a collection afterwards must find nothing to free.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve.api.auth import Authentication
from rnnserve.api.servicer import InferenceServicer, add_to_server
from rnnserve.auth import Refusal, TokenFile
from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, Provider, Spinning
from rnnserve.serving.model import Limits
from rnnserve.serving.registry import ModelRegistry
from tests.conftest import BUNDLED

REQUESTS = 200


class Quiet:
    def observe_request(self, *args: object, **kwargs: object) -> None:
        pass


class Context:
    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


class Refusing:
    """A context that takes a refusal's status, as grpc's does."""

    def set_code(self, code: object) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def request(sequence: int, token: int, start: bool, rid: str) -> bytes:
    message = pb.ModelInferRequest(model_name="charlm_lstm", id=rid)
    message.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    message.raw_input_contents.append(np.full((1, 1), token, np.int64).tobytes())
    message.parameters["sequence_id"].int64_param = sequence
    message.parameters["sequence_start"].bool_param = start
    return message.SerializeToString()


async def stream(sequence: int) -> AsyncIterator[bytes]:
    for t in range(REQUESTS):
        yield request(sequence, t % 97, t == 0, f"{sequence}-{t}")
        await asyncio.sleep(0)  # several streams interleave: batches of several requests


async def loaded() -> tuple[ModelRegistry, InferenceServicer]:
    """The bundled models loaded, and a servicer on them (metrics that record nothing)."""
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(Provider.CPU, spinning=Spinning.NEVER)),
        Limits(max_queue_delay_s=0.0),
    )
    await registry.load_all()
    return registry, InferenceServicer(registry, Quiet())


async def test_streamed_and_unary_requests_leave_no_cycles() -> None:
    registry, servicer = await loaded()

    async def drain(sequence: int) -> int:
        answers = [a async for a in servicer.ModelStreamInfer(stream(sequence), Context())]
        return len(answers)

    async def unary(sequence: int) -> None:
        for t in range(REQUESTS // 4):
            await servicer.ModelInfer(request(sequence, t, t == 0, ""), Context())

    try:
        await drain(1)  # warm up: caches, templates, first-call allocations
        gc.collect()
        gc.disable()
        try:
            counts = await asyncio.gather(drain(2), drain(3), drain(4), unary(5), unary(6))
            found = gc.collect()
        finally:
            gc.enable()
        assert counts[:3] == [REQUESTS] * 3
        assert found == 0, f"{found} objects were left in reference cycles"
    finally:
        await registry.stop()


async def test_refused_requests_leave_no_cycles() -> None:
    """Refused in the decoder, the registry or the engine, unary or streamed: a cycle would
    hold each refused request's bytes until a collection."""
    registry, servicer = await loaded()
    unknown = pb.ModelInferRequest.FromString(request(1, 5, True, ""))
    unknown.model_name = "nope"
    refused = [
        b"\x0a\x05abc",  # not a request
        unknown.SerializeToString(),  # no such model
        request(424242, 5, False, ""),  # not a live sequence: refused by the engine
        request(1, 200, True, ""),  # a token outside the vocabulary
    ]

    async def stream() -> AsyncIterator[bytes]:
        for data in refused * 10:
            yield data

    async def unary() -> None:
        for data in refused * 10:
            context = Refusing()
            await servicer.ModelInfer(data, context)
            assert context.code != grpc.StatusCode.OK

    try:
        await unary()  # warm up
        gc.collect()
        gc.disable()
        try:
            await unary()
            answers = [a async for a in servicer.ModelStreamInfer(stream(), Context())]
            found = gc.collect()
        finally:
            gc.enable()
        assert len(answers) == len(refused) * 10
        assert found == 0, f"{found} objects were left in reference cycles"
    finally:
        await registry.stop()


@contextlib.asynccontextmanager
async def grpc_server(
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """The real servicer on the bundled models behind a real grpc.aio server on loopback
    (with `interceptors`); a channel to it."""
    registry, servicer = await loaded()
    server = grpc.aio.server(interceptors=interceptors)
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
        await registry.stop()


async def cycles(send: Callable[[], Awaitable[object]], calls: int = 20) -> int:
    """Objects a collection finds in reference cycles after `calls` calls of `send` (refused
    ones included) with the collector off."""

    async def repeat(count: int) -> None:
        for _ in range(count):
            try:
                await send()
            except grpc.aio.AioRpcError:
                pass

    await repeat(3)  # warm up
    gc.collect()
    gc.disable()
    try:
        await repeat(calls)
        return gc.collect()
    finally:
        gc.enable()


BIG_BODY = 1_000_000
"""A refused request this large held until a collection would show in the server's RSS
(tests/api/test_fuzz.py); here the cycles are counted instead."""


async def test_a_refused_call_leaves_no_more_cycles_than_an_answered_one() -> None:
    """Through a real grpc.aio server: its own calls leave a few objects in cycles, and a call
    ended with `context.abort` left about 35 more, the request's bytes among them (refused
    1.5 MB requests moved the server's RSS by 100+ MB in tests/api/test_fuzz.py)."""
    async with grpc_server() as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        answered = await cycles(lambda: call(request(7, 5, True, ""), timeout=30))
        # Not a live sequence; not a request at all.
        refused = await cycles(lambda: call(request(424242, 5, False, ""), timeout=30))
        undecodable = await cycles(lambda: call(b"\x0a\x05abc", timeout=30))
    assert refused <= answered and undecodable <= answered, (answered, refused, undecodable)


@pytest.mark.parametrize("method", ["ModelMetadata", "ModelConfig", "ModelStatistics"])
async def test_other_refused_calls_leave_no_more_cycles_than_answered_ones(method: str) -> None:
    """The other unary calls (`_unary` in the servicer) refuse as ModelInfer does: a megabyte
    model name that names no model leaves no more behind than a call that is answered."""
    async with grpc_server() as channel:
        call = getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)
        kind = getattr(pb, f"{method}Request")
        answered = await cycles(lambda: call(kind(name="sensor_gru"), timeout=30))
        unknown = kind(name="x" * BIG_BODY)
        refused = await cycles(lambda: call(unknown, timeout=30))
    assert refused <= answered, (answered, refused)


async def test_calls_refused_by_authentication_leave_no_more_cycles(tmp_path: Path) -> None:
    """The authentication interceptor's refusals (no token), unary and streamed, of megabyte
    requests, leave no more behind than answered calls with a token."""
    token = "cycles-token"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {hashlib.sha256(token.encode()).hexdigest()}\n")
    bearer = (("authorization", f"Bearer {token}"),)
    refusals: list[Refusal] = []
    big = pb.ModelInferRequest.FromString(request(9, 5, True, ""))
    big.parameters["padding"].string_param = "x" * BIG_BODY
    authentication = Authentication(TokenFile(tokens), False, refusals.append)
    async with grpc_server([authentication]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )

        async def streamed(data: bytes, metadata: tuple[tuple[str, str], ...] | None) -> None:
            async for answer in stream(iter([data]), metadata=metadata, timeout=30):
                assert not answer.error_message, answer.error_message

        answered = await cycles(
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="sensor_gru"), metadata=bearer)
        )
        unknown = pb.ModelMetadataRequest(name="x" * BIG_BODY)
        refused = await cycles(lambda: stub.ModelMetadata(unknown, metadata=None))
        answered_stream = await cycles(lambda: streamed(request(9, 5, True, ""), bearer))
        refused_stream = await cycles(lambda: streamed(big.SerializeToString(), None))
    assert len(refusals) == 2 * (3 + 20), refusals
    assert refused <= answered, (answered, refused)
    assert refused_stream <= answered_stream, (answered_stream, refused_stream)
