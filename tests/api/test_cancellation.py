"""A stream that ends before its answers are out leaves no work behind (issue 12).

Eight long steps are queued on one sequence, then the stream ends: cancelled by its client,
its client killed, past its deadline, or cut off by the server's shutdown. The steps that had
not started must never run: at most the running one (and one a worker already took) finishes,
the rest are counted CANCELLED, the next answer's `sequence_version` agrees with what ran, and
another client is answered behind the running step rather than behind all eight. A stream that
half-closes normally still gets every answer.

Steps are longer than the server's default (`--max-steps-per-request`), so that a cancellation
that takes a few scheduler ticks on a busy 2-core machine still lands within the first step.
"""

from __future__ import annotations

import asyncio
import http.client
import pickle
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api.servicer import InferenceServicer
from rnnserve.errors import InvalidArgument
from rnnserve.serving.policy import Policy, PolicySettings
from rnnserve.serving.request import InferenceRequest, InferenceResult, OnOutcome
from tests.server import RunningServer, serving

MODEL = "charlm_lstm"
LONG = 16_384
"""Time steps of a long request: about 0.3 s of compute on the 2-core test machine."""
QUEUED = 8
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER = "/inference.GRPCInferenceService/ModelInfer"
WAIT_S = 60.0
"""Generous: a wait fails a test only when what it waits for never happens."""
CHANNEL = [("grpc.max_receive_message_length", 64 << 20)]
"""A long step's logits (6 MB and more) are over gRPC's default 4 MB."""


# ---------------------------------------------------------------------------- requests
def request(sequence_id: int, steps: int, *, start: bool = False, rid: str = "") -> bytes:
    """A ModelInferRequest of `steps` tokens on `sequence_id`, as wire bytes."""
    tokens = np.random.default_rng(sequence_id).integers(1, 97, size=(1, steps), dtype=np.int64)
    message = pb.ModelInferRequest(model_name=MODEL, id=rid)
    message.inputs.add(name="tokens", datatype="INT64", shape=[1, steps])
    message.raw_input_contents.append(tokens.tobytes())
    message.parameters["sequence_id"].int64_param = sequence_id
    if start:
        message.parameters["sequence_start"].bool_param = True
    return message.SerializeToString()


def marker(sequence_id: int) -> bytes:
    """A request refused at once (no input `chars`), so answered as soon as it is read: its
    answer proves the server has read every request sent before it. It touches no state."""
    message = pb.ModelInferRequest(model_name=MODEL, id="marker")
    message.inputs.add(name="chars", datatype="INT64", shape=[1, 1])
    message.raw_input_contents.append(np.ones((1, 1), np.int64).tobytes())
    message.parameters["sequence_id"].int64_param = sequence_id
    return message.SerializeToString()


def version_of(answer: pb.ModelStreamInferResponse | pb.ModelInferResponse) -> int:
    response = answer.infer_response if isinstance(answer, pb.ModelStreamInferResponse) else answer
    return response.parameters["sequence_version"].int64_param


# ---------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class Served:
    server: RunningServer
    step_s: float
    """Seconds one request of LONG steps takes on this machine, now."""


def measure_step(server: RunningServer, sequence_id: int, steps: int = LONG) -> float:
    """Warm the model up and time requests of `steps` on a sequence of their own."""
    with grpc.insecure_channel(server.target, CHANNEL) as channel:
        infer = channel.unary_unary(INFER, request_serializer=None)
        infer(request(sequence_id, 1, start=True), timeout=WAIT_S)
        took = []
        for _ in range(3):
            started = time.perf_counter()
            infer(request(sequence_id, steps), timeout=WAIT_S)
            took.append(time.perf_counter() - started)
    return statistics.median(took)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, serving_transport: str) -> Iterator[Served]:
    flags = ("--max-steps-per-request", str(LONG))
    workdir = tmp_path_factory.mktemp("cancellation")
    with serving(workdir, *flags, transport=serving_transport) as server:
        yield Served(server, measure_step(server, 1))


async def outcomes(server: RunningServer) -> dict[str, float]:
    """rnnserve_requests_total of the model, by outcome."""
    text = await asyncio.to_thread(server.scrape)
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rnnserve_requests_total" and sample.labels["model"] == MODEL
    }


def delta(after: dict[str, float], before: dict[str, float], outcome: str) -> int:
    return int(after.get(outcome, 0) - before.get(outcome, 0))


async def settled(server: RunningServer, before: dict[str, float], count: int) -> tuple[int, int]:
    """Wait until `count` requests since `before` were answered OK or CANCELLED; how many of
    each."""
    deadline = time.monotonic() + WAIT_S
    while True:
        after = await outcomes(server)
        ok, cancelled = delta(after, before, "OK"), delta(after, before, "CANCELLED")
        if ok + cancelled >= count or time.monotonic() > deadline:
            return ok, cancelled
        await asyncio.sleep(0.02)


def assert_no_traceback(server: RunningServer) -> None:
    """No traceback at all: gRPC's own one for a client that left mid-write (grpc/grpc#32551)
    is logged as one INFO line by rnnserve's logging."""
    log = server.log_text()
    assert "Traceback" not in log, log


# ---------------------------------------------------------------------------- streams
def open_stream(
    channel: grpc.aio.Channel, timeout: float | None = None
) -> grpc.aio.StreamStreamCall:
    method = channel.stream_stream(
        STREAM,
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    call: grpc.aio.StreamStreamCall = method(timeout=timeout)
    return call


async def read(call: grpc.aio.StreamStreamCall) -> pb.ModelStreamInferResponse:
    answer = await asyncio.wait_for(call.read(), WAIT_S)
    assert answer is not grpc.aio.EOF, "the stream ended early"
    assert isinstance(answer, pb.ModelStreamInferResponse)
    return answer


async def queue_long_steps(
    call: grpc.aio.StreamStreamCall, sequence_id: int, steps: int = LONG
) -> int:
    """START the sequence, then queue QUEUED requests of `steps` and a marker; return once the
    server has read them all (the marker is answered), with how many were answered by then."""
    await call.write(request(sequence_id, 1, start=True))
    assert version_of(await read(call)) == 1
    for k in range(QUEUED):
        await call.write(request(sequence_id, steps, rid=f"step-{k}"))
    await call.write(marker(sequence_id))
    answered = 0
    while (answer := await read(call)).infer_response.id != "marker":
        answered += 1
    assert answer.error_message.startswith("[INVALID_ARGUMENT]"), answer.error_message
    return answered


# How a stream ends; each returns how many of its steps are known to have finished by then.
async def cancel(channel: grpc.aio.Channel, served: Served, sequence_id: int) -> int:
    call = open_stream(channel)
    finished = await queue_long_steps(call, sequence_id)
    call.cancel()
    return finished


async def stall_then_cancel(channel: grpc.aio.Channel, served: Served, sequence_id: int) -> int:
    """Cancel while a step's answer (6 MB) is being written, unread: gRPC then drops the
    stream's generator suspended at its `yield`, rather than cancelling it inside a wait."""
    call = open_stream(channel)
    finished = await queue_long_steps(call, sequence_id)
    before = await outcomes(served.server)
    deadline = time.monotonic() + WAIT_S
    while (done := delta(await outcomes(served.server), before, "OK")) < 1:
        assert time.monotonic() < deadline, "no step finished"
        await asyncio.sleep(0.01)
    call.cancel()
    return finished + done


async def miss_deadline(channel: grpc.aio.Channel, served: Served, sequence_id: int) -> int:
    """A deadline that falls while the first steps run (the marker comes well before it)."""
    call = open_stream(channel, timeout=0.25 + served.step_s)
    finished = await queue_long_steps(call, sequence_id)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() is not grpc.aio.EOF:
            finished += 1
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert finished <= QUEUED - 3, "the deadline fell after most steps ran: nothing to drop"
    return finished


CLIENT = """
import pickle, queue, sys, time
import grpc
target, path = sys.argv[1:]
start, steps, marker = pickle.loads(open(path, "rb").read())
outgoing = queue.Queue()
channel = grpc.insecure_channel(target, [("grpc.max_receive_message_length", -1)])
method = channel.stream_stream("{stream}", request_serializer=None)
answers = method(iter(outgoing.get, None))
outgoing.put(start)
next(answers)
for step in steps:
    outgoing.put(step)
outgoing.put(marker)
finished = 0
while b"[INVALID_ARGUMENT]" not in next(answers):
    finished += 1
print(finished, flush=True)
time.sleep(600)
""".replace("{stream}", STREAM)


async def kill_client(channel: grpc.aio.Channel, served: Served, sequence_id: int) -> int:
    """A client process that queued its steps is killed (its connection drops)."""
    batch = served.server.log_path.parent / f"client-{sequence_id}.pickle"
    steps = [request(sequence_id, LONG, rid=f"step-{k}") for k in range(QUEUED)]
    batch.write_bytes(
        pickle.dumps((request(sequence_id, 1, start=True), steps, marker(sequence_id)))
    )
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, served.server.target, str(batch),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), WAIT_S)
        finished = int(line)
    finally:
        client.kill()
        await client.wait()
    return finished


Ending = Callable[[grpc.aio.Channel, Served, int], Awaitable[int]]
IN_FLIGHT = 2
"""Steps that may still run once a stream has ended: the one running, and one a worker took
before the cancellation reached it."""


@pytest.mark.parametrize(
    ("end", "sequence_id"),
    [(cancel, 100), (kill_client, 110), (miss_deadline, 120), (stall_then_cancel, 130)],
    ids=["cancelled", "client-killed", "deadline", "unread-then-cancelled"],
)
async def test_a_stream_that_ends_drops_its_queued_steps(
    served: Served, end: Ending, sequence_id: int
) -> None:
    server = served.server
    async with grpc.aio.insecure_channel(server.target, CHANNEL) as channel:
        before = await outcomes(server)
        finished = await end(channel, served, sequence_id)

        # Another client is answered behind the step that runs, not behind all eight (counted,
        # not timed: a busy machine slows every step alike).
        infer = channel.unary_unary(
            INFER, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )
        await infer(request(sequence_id + 1, 1, start=True), timeout=WAIT_S)
        ran_first = delta(await outcomes(server), before, "OK") - 2  # START, and its own
        assert ran_first <= finished + IN_FLIGHT, f"another client waited for {ran_first} steps"

        ok, cancelled = await settled(server, before, 2 + QUEUED)
        ran = ok - 2
        assert ran + cancelled == QUEUED, (ran, cancelled)
        assert ran <= finished + IN_FLIGHT, f"{ran} of the {QUEUED} steps ran, for no one"

        # The state says what ran: START, the steps that ran, and this one.
        continued = await infer(request(sequence_id, 1), timeout=WAIT_S)
        assert version_of(continued) == 1 + ran + 1
    assert_no_traceback(server)


async def test_a_half_closed_stream_gets_every_answer(served: Served) -> None:
    sequence_id = 200
    steps = LONG // 8
    async with grpc.aio.insecure_channel(served.server.target, CHANNEL) as channel:
        call = open_stream(channel)
        await call.write(request(sequence_id, 1, start=True))
        for k in range(QUEUED):
            await call.write(request(sequence_id, steps, rid=f"step-{k}"))
        await call.done_writing()
        answers = [await read(call) for _ in range(1 + QUEUED)]
        assert await asyncio.wait_for(call.read(), WAIT_S) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert [a.error_message for a in answers] == [""] * (1 + QUEUED)
    assert [version_of(a) for a in answers] == list(range(1, 2 + QUEUED))
    assert [a.infer_response.id for a in answers[1:]] == [f"step-{k}" for k in range(QUEUED)]
    assert_no_traceback(served.server)


async def watch(server: RunningServer, seen: list[dict[str, float]]) -> None:
    """Scrape the request counts until the server is gone."""
    while True:
        try:
            seen.append(await outcomes(server))
        except (OSError, http.client.HTTPException):
            return
        await asyncio.sleep(0.01)


async def test_shutdown_drops_the_queued_steps_of_the_streams_it_cuts_off(
    tmp_path: Path, serving_transport: str
) -> None:
    flags = ("--max-steps-per-request", str(LONG), "--shutdown-grace-s", "0.1")
    with serving(tmp_path, *flags, transport=serving_transport) as server:
        async with grpc.aio.insecure_channel(server.target, CHANNEL) as channel:
            before = await outcomes(server)
            call = open_stream(channel)
            finished = await queue_long_steps(call, 2)
            seen: list[dict[str, float]] = []
            watcher = asyncio.create_task(watch(server, seen))
            assert await asyncio.to_thread(server.stop) == 0
            await asyncio.wait_for(watcher, WAIT_S)
            with pytest.raises(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
    # Counted while the server stops: with the fault it runs all eight first, for no one.
    ran = max((delta(counts, before, "OK") - 1 for counts in seen), default=0)  # less START
    assert ran <= finished + IN_FLIGHT, (
        f"shutdown ran {ran} of the {QUEUED} steps of a stream it cut off"
    )
    assert_no_traceback(server)


# ---------------------------------------------------------------------------- unit level
class Ticket:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeModel:
    """Answers request ids starting "inline" right after the callback that submitted them (as
    the engine's inline path does), refuses ids starting "refused" (raising, as the engine's
    checks do), and queues the rest until `answer_queued`."""

    name, version, labels = MODEL, 1, (MODEL, "1")

    def __init__(self) -> None:
        self.tickets: dict[str, Ticket] = {}
        self.queued: dict[str, OnOutcome] = {}

    def submit(self, request: InferenceRequest, on_outcome: OnOutcome) -> Ticket:
        if request.id.startswith("refused"):
            raise InvalidArgument("no")
        ticket = self.tickets[request.id] = Ticket()
        if request.id.startswith("inline"):
            result = InferenceResult(MODEL, 1, {}, sequence_version=1)
            asyncio.get_running_loop().call_soon(on_outcome, result)
        else:
            self.queued[request.id] = on_outcome
        return ticket

    def answer_bytes_of(self, request: InferenceRequest) -> int:
        return 0  # what a deep stream reserves: nothing to bound here

    def answer_queued(self, rid: str) -> None:
        self.queued.pop(rid)(InferenceResult(MODEL, 1, {}, sequence_version=2))


class FakeRegistry:
    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.policy = Policy(PolicySettings())

    def resolve(self, request: InferenceRequest) -> FakeModel:
        return self.model


class Quiet:
    def observe_request(self, *args: object, **kwargs: object) -> None:
        pass


def servicer_over(model: FakeModel) -> InferenceServicer:
    return InferenceServicer(FakeRegistry(model), Quiet())  # type: ignore[arg-type]


def small(rid: str) -> bytes:
    message = pb.ModelInferRequest(model_name=MODEL, id=rid)
    message.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    message.raw_input_contents.append(np.ones((1, 1), np.int64).tobytes())
    return message.SerializeToString()


async def requests(ids: list[str], then_wait: bool) -> AsyncIterator[bytes]:
    for rid in ids:
        yield small(rid)
    if then_wait:
        await asyncio.Event().wait()  # the client never half-closes


IDS = ["inline-0", "refused-1", "queued-2", "inline-3", "queued-4", "queued-5"]


async def all_queued(model: FakeModel) -> None:
    """Until every queued request of IDS was read and submitted."""
    while len(model.queued) < 3:
        await asyncio.sleep(0)


async def answered_ids(stream: AsyncIterator[bytes], count: int) -> list[str]:
    return [
        pb.ModelStreamInferResponse.FromString(await anext(stream)).infer_response.id
        for _ in range(count)
    ]


@pytest.mark.parametrize("how", ["closed-between-answers", "cancelled-while-waiting"])
async def test_only_the_unanswered_requests_of_an_abandoned_stream_are_cancelled(
    how: str,
) -> None:
    model = FakeModel()
    stream = servicer_over(model).ModelStreamInfer(requests(IDS, then_wait=True), None)
    assert set(await answered_ids(stream, 3)) == {"inline-0", "refused-1", "inline-3"}
    await all_queued(model)
    model.answer_queued("queued-4")
    assert await answered_ids(stream, 1) == ["queued-4"]
    if how == "closed-between-answers":
        await stream.aclose()  # suspended at its yield, as when gRPC drops the generator
        await asyncio.sleep(0)  # let the cancelled reader finish
    else:
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        waiting.cancel()  # inside its wait for the next answer, as a cancelled RPC
        with pytest.raises(asyncio.CancelledError):
            await waiting
    cancelled = {rid for rid, ticket in model.tickets.items() if ticket.cancelled}
    assert cancelled == {"queued-2", "queued-5"}


async def test_a_half_closed_stream_cancels_nothing_and_answers_everything() -> None:
    model = FakeModel()
    stream = servicer_over(model).ModelStreamInfer(requests(IDS, then_wait=False), None)
    first = await answered_ids(stream, 3)
    await all_queued(model)
    for rid in ("queued-5", "queued-2", "queued-4"):
        model.answer_queued(rid)
    rest = [pb.ModelStreamInferResponse.FromString(a).infer_response.id async for a in stream]
    # Refused at once, answered right after the submitting callback, then as they came.
    assert first + rest == ["refused-1", "inline-0", "inline-3", "queued-5", "queued-2", "queued-4"]
    assert not any(ticket.cancelled for ticket in model.tickets.values())
