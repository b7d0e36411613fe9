"""No request leaves reference cycles behind: its objects go by reference counting alone.

Every request allocates a handful of objects (decoded request, work, ticket, outcome, callback).
A cycle among them leaves all of them to Python's cyclic garbage collector, whose collections
then run often and pause the event loop: measured once at 4% of the steps per second and 1.7x
the p99 at 64 streams (docs/performance.md). The real servicer and engine run in process here,
with the collector off, and a collection afterwards must find nothing to free.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import grpc
import numpy as np

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api.servicer import InferenceServicer, add_to_server
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


async def test_a_refused_call_leaves_no_more_cycles_than_an_answered_one() -> None:
    """Through a real grpc.aio server: its own calls leave a few objects in cycles, and a call
    ended with `context.abort` left about 35 more, the request's bytes among them (refused
    1.5 MB requests moved the server's RSS by 100+ MB in tests/api/test_fuzz.py)."""
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(Provider.CPU, spinning=Spinning.NEVER)),
        Limits(max_queue_delay_s=0.0),
    )
    await registry.load_all()
    server = grpc.aio.server()
    add_to_server(InferenceServicer(registry, Quiet()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=None,
                response_deserializer=None,
            )

            async def cycles(data: bytes) -> int:
                async def send(count: int) -> None:
                    for _ in range(count):
                        try:
                            await call(data, timeout=30)
                        except grpc.aio.AioRpcError:
                            pass

                await send(3)  # warm up
                gc.collect()
                gc.disable()
                try:
                    await send(20)
                    return gc.collect()
                finally:
                    gc.enable()

            answered = await cycles(request(7, 5, True, ""))
            refused = await cycles(request(424242, 5, False, ""))  # not a live sequence
            undecodable = await cycles(b"\x0a\x05abc")
        assert refused <= answered and undecodable <= answered, (answered, refused, undecodable)
    finally:
        await server.stop(None)
        await registry.stop()
