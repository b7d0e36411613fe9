"""How the batcher hands work to its worker thread: each event-loop turn's steps go to the worker
in one hand-off, the worker goes on to the next batch without waiting for the loop, jobs on the
worker run between batches, and abandoned steps never run.

The model is the real one on ONNX Runtime; `Watched` only records each call as it passes it on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress

import numpy as np

from rnnserve.runtime.base import Runtime
from rnnserve.runtime.onnx import SPIN_NEVER, EngineSettings, OnnxRuntime
from rnnserve.serving.model import Limits, ServedModel
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, InferenceResult, SequenceControl
from tests.batching.test_batcher import MODEL, TOLERANCE, VOCAB, reference
from tests.conftest import BUNDLED

WAIT_S = 30.0
"""Generous: these waits fail a test only when what they wait for never happens."""


class Watched:
    """A runtime that records its calls; the first call may be held until `release` is set."""

    def __init__(self, inner: Runtime, hold_first: bool = False) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.rows: list[int] = []
        self.release = threading.Event()
        self.second_done = threading.Event()
        if not hold_first:
            self.release.set()

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None
    ) -> dict[str, np.ndarray]:
        call = len(self.rows)
        self.rows.append(len(feeds["tokens"]))
        if call == 0:
            assert self.release.wait(WAIT_S), "the test never released the first call"
        try:
            return self.inner.run(feeds, work)
        finally:
            if call == 1:
                self.second_done.set()


async def served(delay_s: float = 0.0, hold_first: bool = False) -> tuple[ModelRegistry, Watched]:
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(provider="cpu", spinning=SPIN_NEVER)),
        Limits(max_queue_delay_s=delay_s, inline_max_steps=0),
    )
    await registry.load_all()
    model = registry.get(MODEL)
    watched = Watched(model.batcher.runtime, hold_first)
    model.batcher.runtime = watched
    return registry, watched


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, failing the test after WAIT_S rather than hanging it."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited too long"
        await asyncio.sleep(0.001)


def step_request(sequence: object, token: int, start: bool, end: bool = False) -> InferenceRequest:
    return InferenceRequest(
        MODEL,
        {"tokens": np.full((1, 1), token, dtype=np.int64)},
        outputs=("logits",),
        sequence=SequenceControl(sequence, start=start, end=end),
    )


def assert_first_steps(results: list[InferenceResult], tokens: list[int]) -> None:
    """Each result is the logits of a sequence's first step on its token."""
    for result, token in zip(results, tokens, strict=True):
        expected = reference(np.full((1, 1), token, dtype=np.int64))[0]
        np.testing.assert_allclose(result.outputs["logits"], expected, atol=TOLERANCE)


def submit(model: ServedModel, request: InferenceRequest) -> asyncio.Future[InferenceResult]:
    """Queue a request's step now (not when a task first runs), as the servicer does."""
    answer: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()

    def done(step: object) -> None:
        try:
            answer.set_result(model.finish(step))  # type: ignore[arg-type]
        except BaseException as error:  # noqa: BLE001 - the test reads it from the future
            answer.set_exception(error)

    model.submit(request, done)
    return answer


def test_the_worker_runs_the_next_batch_without_waiting_for_the_event_loop() -> None:
    asyncio.run(next_batch_while_the_loop_is_busy())


async def next_batch_while_the_loop_is_busy() -> None:
    registry, watched = await served(hold_first=True)
    model = registry.get(MODEL)
    try:
        first = submit(model, step_request("a", 5, start=True))
        await until(lambda: bool(watched.rows))  # the worker took "a" and holds it
        second = [submit(model, step_request(s, 7, start=True)) for s in ("b", "c")]
        await asyncio.sleep(0)  # "b" and "c" are handed over while the worker is busy
        watched.release.set()
        # Block the event loop: the worker must still finish "a" and go on to "b" and "c".
        assert watched.second_done.wait(WAIT_S), "the second batch waited for the event loop"
        results = await asyncio.wait_for(asyncio.gather(first, *second), WAIT_S)
        assert watched.rows == [1, 2]
        assert_first_steps(results, [5, 7, 7])
    finally:
        await registry.stop()


def test_jobs_on_the_worker_run_between_batches_under_load() -> None:
    asyncio.run(a_job_while_sequences_step())


async def a_job_while_sequences_step() -> None:
    registry, watched = await served()
    model = registry.get(MODEL)
    stop = asyncio.Event()
    steps = 0

    async def sequence(name: str) -> None:
        nonlocal steps
        await submit(model, step_request(name, 1, start=True))
        while not stop.is_set():
            await submit(model, step_request(name, 2, start=False))
            steps += 1
        await submit(model, step_request(name, 3, start=False, end=True))

    def job() -> str:
        return threading.current_thread().name

    loops = [asyncio.create_task(sequence(f"s{k}")) for k in range(8)]
    try:
        await until(lambda: steps >= 50)
        thread = await asyncio.wait_for(model.batcher.on_worker(job), WAIT_S)
        assert thread.startswith(f"batch-{MODEL}")
        before = steps
        await until(lambda: steps >= before + 50)  # batches go on after the job
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), WAIT_S)
        await registry.stop()
    assert model.live_sequences == 0
    assert not model.busy


def test_steps_wait_the_queue_delay_for_company() -> None:
    asyncio.run(steps_across_loop_turns())


async def steps_across_loop_turns() -> None:
    registry, watched = await served(delay_s=0.5)
    model = registry.get(MODEL)
    try:
        answers = []
        for k in range(4):
            answers.append(submit(model, step_request(f"d{k}", k, start=True, end=True)))
            await asyncio.sleep(0)  # each in its own loop turn
        results = await asyncio.wait_for(asyncio.gather(*answers), WAIT_S)
        assert watched.rows == [4]
        assert_first_steps(results, list(range(4)))
    finally:
        await registry.stop()


def test_a_step_abandoned_before_it_ran_never_runs() -> None:
    asyncio.run(abandon_a_queued_step())


async def abandon_a_queued_step() -> None:
    registry, watched = await served(hold_first=True)
    model = registry.get(MODEL)
    try:
        first = asyncio.create_task(model.infer(step_request("e", 1, start=True)))
        await until(lambda: bool(watched.rows))  # "e" runs and is held there
        given_up = asyncio.create_task(model.infer(step_request("f", 2, start=True)))
        await asyncio.sleep(0.01)  # "f" is handed to the busy worker
        given_up.cancel()
        with suppress(asyncio.CancelledError):
            await given_up  # abandoned before the worker can take it
        watched.release.set()
        await asyncio.wait_for(first, WAIT_S)
        assert given_up.cancelled()
        await until(lambda: not model.busy)
        assert watched.rows == [1]  # "f" never ran
        assert not model.holds("f")
        # "e" goes on from its state, unaffected.
        result = await model.infer(step_request("e", 4, start=False, end=True))
        expected = reference(np.asarray([[1], [4]], dtype=np.int64))[1]
        np.testing.assert_allclose(result.outputs["logits"], expected, atol=TOLERANCE)
    finally:
        await registry.stop()


def test_small_calls_run_on_a_single_threaded_twin_with_the_same_answers() -> None:
    path = BUNDLED / MODEL / "1" / "model.onnx"
    twin = OnnxRuntime(path, EngineSettings("cpu", intra_op_threads=2, parallel_min_work=8))
    alone = OnnxRuntime(path, EngineSettings("cpu", intra_op_threads=1, parallel_min_work=8))
    assert twin.parallel_min_work == 8 and twin.serial_session is not twin.session
    assert alone.parallel_min_work == 0 and alone.serial_session is alone.session
    rng = np.random.default_rng(3)
    feeds = {
        "tokens": rng.integers(0, VOCAB, size=(4, 2), dtype=np.int64),
        "h_in": rng.standard_normal((4, 2, 256)).astype(np.float32),
        "c_in": rng.standard_normal((4, 2, 256)).astype(np.float32),
    }
    small, large, single = twin.run(feeds, work=1), twin.run(feeds), alone.run(feeds, work=1)
    for name in ("logits", "h_out", "c_out"):
        np.testing.assert_allclose(small[name], large[name], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(small[name], single[name], atol=TOLERANCE, rtol=0)
