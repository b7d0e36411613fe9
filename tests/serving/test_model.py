"""The engine on the real model: a served model against ONNX Runtime run step by step.

Sequences are stepped together, so their requests share batches: rows gathered from the arena,
restarts from zero, and requests that bring their own state, mixed. The answers must match each
sequence run alone, whether batches run on the worker thread, on the event loop, or both. The
outcome of every request comes back once, as a value; what the model held is released.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.errors import CapacityExhausted, InvalidArgument, SequenceNotFound, ServiceError
from rnnserve.runtime.base import Runtime
from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, Provider, Spinning
from rnnserve.serving.model import Limits, ServedModel
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, InferenceResult, Outcome, SequenceControl
from tests.conftest import BUNDLED

MODEL = "charlm_lstm"
VOCAB = 97
TOLERANCE = 1e-5
WAIT_S = 30.0
"""Generous: these waits fail a test only when what they wait for never happens."""


def reference(tokens: np.ndarray, restart_at: int | None = None) -> list[np.ndarray]:
    """Each request's logits for one sequence [requests, T], run alone and in order."""
    session = ort.InferenceSession(str(BUNDLED / MODEL / "1" / "model.onnx"))
    h = np.zeros((1, 2, 256), np.float32)
    c = np.zeros((1, 2, 256), np.float32)
    out = []
    for t, token in enumerate(tokens):
        if t == restart_at:
            h, c = np.zeros_like(h), np.zeros_like(c)
        logits, h, c = session.run(
            ["logits", "h_out", "c_out"], {"tokens": token.reshape(1, -1), "h_in": h, "c_in": c}
        )
        out.append(logits)
    return out


class Watched:
    """A runtime that records its calls; the first call may be held until `release` is set."""

    def __init__(self, inner: Runtime, hold_first: bool = False) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.index_bounds = inner.index_bounds
        self.rows: list[int] = []
        self.threads: list[str] = []
        self.alone: list[bool] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        call = len(self.rows)
        self.rows.append(len(next(iter(feeds.values()))))
        self.threads.append(threading.current_thread().name)
        self.alone.append(alone)
        if call == 0:
            assert self.release.wait(WAIT_S), "the test never released the first call"
        return self.inner.run(feeds, work, alone)


def cpu_runtime(path: Path) -> OnnxRuntime:
    return OnnxRuntime(path, EngineSettings(provider=Provider.CPU, spinning=Spinning.NEVER))


async def served(
    limits: Limits, hold_first: bool = False
) -> tuple[ModelRegistry, ServedModel, Watched]:
    runtimes: list[Watched] = []

    def factory(path: Path) -> Runtime:
        runtimes.append(Watched(cpu_runtime(path), hold_first and path.parts[-3] == MODEL))
        return runtimes[-1]

    registry = ModelRegistry(BUNDLED, factory, limits)
    await registry.load_all()
    model = registry.get(MODEL)
    watched = next(r for r in runtimes if r is model.runtime)
    return registry, model, watched


@pytest.fixture
async def engine(request: pytest.FixtureRequest):
    """(registry, model, watched runtime) for `request.param` limits; stopped after the test."""
    limits, hold_first = getattr(request, "param", (Limits(max_queue_delay_s=0.0), False))
    registry, model, watched = await served(limits, hold_first)
    yield registry, model, watched
    watched.release.set()
    await registry.stop()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, failing the test after WAIT_S rather than hanging it."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited too long"
        await asyncio.sleep(0.001)


def step(sequence: object, token: int, start: bool, end: bool = False) -> InferenceRequest:
    return InferenceRequest(
        MODEL,
        {"tokens": np.full((1, 1), token, dtype=np.int64)},
        outputs=("logits",),
        sequence=SequenceControl(sequence, start=start, end=end),
    )


def submit(model: ServedModel, request: InferenceRequest) -> asyncio.Future[Outcome]:
    """Submit now (not when a task first runs), as the servicer does; the outcome's future:
    the refusal that `submit` raised, or what its callback heard, once and never inside it."""
    answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    outcomes: list[Outcome] = []
    submitting = True

    def deliver(outcome: Outcome) -> None:
        assert not submitting, "answered from inside its own submission"
        outcomes.append(outcome)
        assert len(outcomes) == 1, "an outcome was delivered twice"
        answer.set_result(outcome)

    try:
        model.submit(request, deliver)
    except ServiceError as refused:
        answer.set_result(refused)
    submitting = False
    return answer


async def test_a_lone_sequence_s_calls_are_made_alone_and_company_s_are_not(engine) -> None:
    _, model, watched = engine
    assert isinstance(await submit(model, step("one", 1, start=True)), InferenceResult)
    assert isinstance(await submit(model, step("one", 2, start=False)), InferenceResult)
    assert watched.alone == [True, True]
    # A second live sequence: each call may now keep the CPU from the other's.
    assert isinstance(await submit(model, step("two", 3, start=True)), InferenceResult)
    assert isinstance(await submit(model, step("one", 4, start=False)), InferenceResult)
    assert watched.alone[2:] == [False, False]
    # "one" ends (it leaves the live sequences as its END is taken): "two" is alone again.
    assert isinstance(await submit(model, step("one", 5, start=False, end=True)), InferenceResult)
    assert isinstance(await submit(model, step("two", 6, start=False)), InferenceResult)
    assert watched.alone[5:] == [True]


async def test_a_sequence_of_another_model_is_company_too(engine) -> None:
    registry, model, watched = engine
    other = registry.get("sensor_gru")
    reading = InferenceRequest(
        "sensor_gru",
        {"reading": np.zeros((1, 1, 1), np.float32)},
        outputs=("forecast",),
        sequence=SequenceControl("elsewhere", start=True),
    )
    assert isinstance(await submit(model, step("one", 1, start=True)), InferenceResult)
    assert registry.lone() and watched.alone == [True]
    assert isinstance(await submit(other, reading), InferenceResult)
    assert not registry.lone()
    # Both models' calls now share the CPU and the event loop: neither is made alone.
    assert isinstance(await submit(model, step("one", 2, start=False)), InferenceResult)
    assert watched.alone == [True, False] and watched.threads[-1] != threading.current_thread().name


def assert_first_steps(results: list[Outcome], tokens: list[int]) -> None:
    """Each outcome is the logits of a sequence's first request on its token."""
    for result, token in zip(results, tokens, strict=True):
        assert isinstance(result, InferenceResult), result
        expected = reference(np.full((1, 1), token, dtype=np.int64))[0]
        np.testing.assert_allclose(result.outputs["logits"], expected, atol=TOLERANCE)


@pytest.mark.parametrize("inline_max_work", [0, 1, 100_000])
async def test_batched_requests_match_each_sequence_alone(inline_max_work: int) -> None:
    rng = np.random.default_rng(7)
    sequences, length, time_steps = 6, 5, 3
    tokens = rng.integers(0, VOCAB, size=(sequences, length, time_steps), dtype=np.int64)
    restart = {2: 3}  # sequence 2 starts again at its fourth request
    expected = [reference(tokens[s], restart.get(s)) for s in range(sequences)]
    limits = Limits(max_queue_delay_s=0.0, inline_max_work=inline_max_work)
    registry, model, _ = await served(limits)
    # On even rounds, a request that brings its own (zero) state, two rows of it, rides along.
    own = rng.integers(0, VOCAB, size=(2, time_steps), dtype=np.int64)
    own_expected = np.concatenate([reference(own[r : r + 1])[0] for r in range(2)])
    zeros = np.zeros((2, 2, 256), np.float32)
    try:
        for t in range(length):
            requests = [
                InferenceRequest(
                    MODEL,
                    {"tokens": tokens[s, t].reshape(1, time_steps)},
                    outputs=("logits",),
                    sequence=SequenceControl(
                        1000 + s, start=t == 0 or restart.get(s) == t, end=t == length - 1
                    ),
                )
                for s in range(sequences)
            ]
            if t % 2 == 0:
                requests.append(
                    InferenceRequest(
                        MODEL, {"tokens": own, "h_in": zeros, "c_in": zeros}, outputs=("logits",)
                    )
                )
            results = await asyncio.gather(*(model.infer(r) for r in requests))
            for s in range(sequences):
                got = results[s].outputs["logits"]
                assert got.shape == (1, time_steps, VOCAB)
                np.testing.assert_allclose(got, expected[s][t], atol=TOLERANCE, rtol=0)
                since = restart[s] if s in restart and t >= restart[s] else 0
                assert results[s].sequence_version == t - since + 1
            if t % 2 == 0:
                assert results[-1].sequence_version is None
                np.testing.assert_allclose(
                    results[-1].outputs["logits"], own_expected, atol=TOLERANCE, rtol=0
                )
        snapshot = model.snapshot()
        assert snapshot.sequences is not None
        assert snapshot.sequences.live == 0 and snapshot.sequences.state_bytes == 0
        # They shared batches: fewer model calls than requests.
        stats = snapshot.statistics
        assert stats.execution_count < stats.success_count
        assert stats.fail_count == 0
        assert sum(f.count for f in stats.batches.values()) == stats.execution_count
    finally:
        await registry.stop()


@pytest.mark.parametrize("inline_max_work", [0, 1])
async def test_a_lone_sequence_runs_on_the_event_loop_when_allowed(inline_max_work: int) -> None:
    tokens = np.random.default_rng(11).integers(0, VOCAB, size=(6, 1), dtype=np.int64)
    expected = reference(tokens)
    registry, model, watched = await served(Limits(inline_max_work=inline_max_work))
    try:
        for t, token in enumerate(tokens):
            request = InferenceRequest(
                MODEL,
                {"tokens": token.reshape(1, 1)},
                outputs=("logits",),
                sequence=SequenceControl("alone", start=t == 0, end=t == len(tokens) - 1),
            )
            result = await model.infer(request)
            np.testing.assert_allclose(result.outputs["logits"], expected[t], atol=TOLERANCE)
            assert result.sequence_version == t + 1
        on_the_loop = [name == threading.current_thread().name for name in watched.threads]
        assert all(on_the_loop) == (inline_max_work == 1)
        assert any(on_the_loop) == (inline_max_work == 1)
    finally:
        await registry.stop()


@pytest.mark.parametrize(
    "engine", [(Limits(max_queue_delay_s=0.0, inline_max_work=0), True)], indirect=True
)
async def test_the_worker_runs_the_next_batch_without_waiting_for_the_event_loop(engine) -> None:
    _, model, watched = engine
    first = submit(model, step("a", 5, start=True))
    await until(lambda: bool(watched.rows))  # the worker took "a" and holds it
    second = [submit(model, step(s, 7, start=True)) for s in ("b", "c")]
    await asyncio.sleep(0)  # "b" and "c" are handed over while the worker is busy
    watched.release.set()
    # Block the event loop: the worker must still finish "a" and go on to "b" and "c".
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while len(watched.rows) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the second batch waited for the loop"
        threading.Event().wait(0.001)
    results = await asyncio.wait_for(asyncio.gather(first, *second), WAIT_S)
    assert watched.rows == [1, 2]
    assert_first_steps(results, [5, 7, 7])


@pytest.mark.parametrize(
    "engine", [(Limits(max_queue_delay_s=0.5, inline_max_work=0), False)], indirect=True
)
async def test_requests_wait_the_queue_delay_for_company(engine) -> None:
    _, model, watched = engine
    answers = []
    for k in range(4):
        answers.append(submit(model, step(f"d{k}", k, start=True, end=True)))
        await asyncio.sleep(0)  # each in its own loop turn
    results = await asyncio.wait_for(asyncio.gather(*answers), WAIT_S)
    assert watched.rows == [4]
    assert_first_steps(results, list(range(4)))


@pytest.mark.parametrize(
    "engine", [(Limits(max_queue_delay_s=0.0, inline_max_work=0), True)], indirect=True
)
async def test_a_request_cancelled_before_it_ran_never_runs(engine) -> None:
    _, model, watched = engine
    first = asyncio.create_task(model.infer(step("e", 1, start=True)))
    await until(lambda: bool(watched.rows))  # "e" runs and is held there
    given_up = asyncio.create_task(model.infer(step("f", 2, start=True)))
    await asyncio.sleep(0.01)  # "f" is handed to the busy worker
    given_up.cancel()
    with suppress(asyncio.CancelledError):
        await given_up  # cancelled before the worker can take it
    watched.release.set()
    await asyncio.wait_for(first, WAIT_S)
    assert given_up.cancelled()
    await until(lambda: not model.busy)
    assert watched.rows == [1]  # "f" never ran
    assert not model.holds("f")  # and holds no slot
    assert model.snapshot().statistics.fail_count == 1
    # "e" goes on from its state, unaffected.
    result = await model.infer(step("e", 4, start=False, end=True))
    expected = reference(np.asarray([[1], [4]], dtype=np.int64))[1]
    np.testing.assert_allclose(result.outputs["logits"], expected, atol=TOLERANCE)


async def test_refused_requests_are_answered_once_at_once_and_hold_nothing(engine) -> None:
    _, model, watched = engine
    bad = InferenceRequest(
        MODEL, {"tokens": np.zeros((1, 1), np.float32)}, sequence=SequenceControl(9, start=True)
    )
    wrong_type = submit(model, bad)
    assert wrong_type.done()  # answered before submit returned
    assert isinstance(wrong_type.result(), InvalidArgument)
    assert "must be INT64" in str(wrong_type.result())
    unknown = await submit(model, step("never-started", 1, start=False))
    assert isinstance(unknown, SequenceNotFound) and "never started" in str(unknown)
    assert model.live_sequences == 0 and watched.rows == []
    assert model.snapshot().statistics.fail_count == 2


async def test_a_failed_model_call_fails_its_batch_and_the_model_goes_on(engine) -> None:
    _, model, watched = engine
    inner = watched.inner

    class Failing:
        def run(
            self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
        ) -> dict:
            raise RuntimeError("the runtime failed")

    watched.inner = Failing()  # type: ignore[assignment]
    failed = await submit(model, step("g", 1, start=True))
    assert isinstance(failed, ServiceError) and failed.code.name == "INTERNAL"
    assert "see the server log" in str(failed) and "runtime failed" not in str(failed)
    assert not model.holds("g")  # its first request failed: no slot is kept for it
    watched.inner = inner
    assert_first_steps([await submit(model, step("g", 1, start=True))], [1])


async def test_a_callback_that_raises_does_not_keep_others_from_their_answers(engine) -> None:
    _, model, _ = engine
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[Outcome] = loop.create_future()

    def broken(outcome: Outcome) -> None:
        raise RuntimeError("a caller's bug")

    model.submit(step("h", 1, start=True, end=True), broken)
    model.submit(step("i", 2, start=True, end=True), answered.set_result)  # after h: not inline
    assert_first_steps([await asyncio.wait_for(answered, WAIT_S)], [2])
    await until(lambda: not model.busy)
    assert model.live_sequences == 0


def token_step(sequence: object, token: int, start: bool) -> InferenceRequest:
    return InferenceRequest(
        MODEL,
        {"tokens": np.full((1, 1), token, dtype=np.int64)},
        outputs=("logits",),
        sequence=SequenceControl(sequence, start=start),
    )


@pytest.mark.parametrize("bad", [97, 200, -1, -98])
async def test_a_token_outside_the_vocabulary_is_refused_alone(engine, bad: int) -> None:
    _, model, watched = engine
    refused = await submit(model, token_step("v", bad, start=True))
    assert isinstance(refused, InvalidArgument)
    assert "takes values 0..96" in str(refused) and str(bad) in str(refused)
    assert not model.holds("v") and watched.rows == []  # refused before it was queued


@pytest.mark.parametrize(
    "engine", [(Limits(max_queue_delay_s=0.0, inline_max_work=0), True)], indirect=True
)
@pytest.mark.parametrize("checked", [True, False])
async def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered_as_without_it(
    engine, checked: bool
) -> None:
    """With the range check (`checked`) the bad request never reaches the batch; without it
    (a model whose table the server cannot see), the failed batched call is run again request
    by request, and only the culprit fails, with ONNX Runtime's reason as INVALID_ARGUMENT."""
    _, model, watched = engine
    if not checked:
        model._index_bounds = {}
    held = submit(model, token_step("held", 3, start=True))
    await until(lambda: bool(watched.rows))  # the worker is held: what follows is one batch
    old_first = submit(model, token_step("old", 5, start=True))
    watched.release.set()
    await asyncio.wait_for(asyncio.gather(held, old_first), WAIT_S)
    watched.release.clear()  # hold the next call (the first of an emptied record) again
    watched.rows.clear()
    blocker = submit(model, token_step("blocker", 1, start=True))
    await until(lambda: bool(watched.rows))
    batch = [
        submit(model, token_step("old", 200, start=False)),  # the bad one, mid-sequence
        submit(model, token_step("new", 7, start=True)),  # a START batched with it
        submit(model, token_step("held", 9, start=False)),
    ]
    watched.release.set()
    bad, new, other = await asyncio.wait_for(asyncio.gather(*batch), WAIT_S)
    await asyncio.wait_for(blocker, WAIT_S)
    assert isinstance(bad, InvalidArgument), bad
    assert ("takes values 0..96" if checked else "out of data bounds") in str(bad)
    assert_first_steps([new], [7])
    assert isinstance(other, InferenceResult)
    np.testing.assert_allclose(
        other.outputs["logits"], reference(np.asarray([[3], [9]], np.int64))[1], atol=TOLERANCE
    )
    # The bad request changed nothing: "old" goes on from its first step; "new" lives.
    after = await submit(model, token_step("old", 8, start=False))
    assert isinstance(after, InferenceResult) and after.sequence_version == 2
    np.testing.assert_allclose(
        after.outputs["logits"], reference(np.asarray([[5], [8]], np.int64))[1], atol=TOLERANCE
    )
    assert model.holds("new")


@pytest.mark.parametrize(
    "engine", [(Limits(max_sequences=2, inline_max_work=0), True)], indirect=True
)
async def test_an_ended_sequence_no_longer_counts_against_the_limit(engine) -> None:
    _, model, watched = engine
    first = submit(model, token_step("a", 1, start=True))
    await until(lambda: bool(watched.rows))  # the worker is busy: what follows is queued
    ending = submit(
        model,
        InferenceRequest(
            MODEL,
            {"tokens": np.full((1, 1), 2, np.int64)},
            outputs=("logits",),
            sequence=SequenceControl("b", start=True, end=True),
        ),
    )
    admitted = submit(model, token_step("c", 3, start=True))
    assert model.snapshot().sequences.live == 2  # a and c; b ended, its request still queued
    watched.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, ending, admitted), WAIT_S)
    assert_first_steps(results, [1, 2, 3])
    refused = await submit(model, token_step("d", 4, start=True))
    assert isinstance(refused, CapacityExhausted) and "maximum of 2" in str(refused)


@pytest.mark.parametrize(
    "engine", [(Limits(max_queue_delay_s=0.0, inline_max_work=0), True)], indirect=True
)
async def test_a_start_sent_again_after_a_cancelled_one_keeps_its_sequence(engine) -> None:
    """The first START is cancelled while queued (its client's deadline); the client sends the
    START again and is answered: the drop of the first must not forget the sequence."""
    _, model, watched = engine
    busy = submit(model, token_step("busy", 1, start=True))
    await until(lambda: bool(watched.rows))  # the worker is held
    first = asyncio.create_task(model.infer(token_step("x", 2, start=True)))
    await asyncio.sleep(0.01)
    first.cancel()
    with suppress(asyncio.CancelledError):
        await first
    again = submit(model, token_step("x", 2, start=True))
    watched.release.set()
    results = await asyncio.wait_for(asyncio.gather(busy, again), WAIT_S)
    assert_first_steps(results, [1, 2])
    after = await submit(model, token_step("x", 3, start=False))
    assert isinstance(after, InferenceResult), after
    np.testing.assert_allclose(
        after.outputs["logits"], reference(np.asarray([[2], [3]], np.int64))[1], atol=TOLERANCE
    )
