"""NaN and infinity in the engine, on real ONNX Runtime: a float input holding one is refused
unless the model's config opts in, found per batch; a new state holding one is never kept.

Batches are made by holding the worker in a model call while the batch's requests queue; each
culprit must fail alone, its batch-mates answer as if it had not been there, and its sequence
goes on from where it was (checked against the graph run in-process without the bad step).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.errors import InvalidArgument, InvalidModelRepository, SequenceNotFound, ServiceError
from rnnserve.runtime.base import Runtime
from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, Provider, Spinning
from rnnserve.serving.model import Limits, ServedModel
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, InferenceResult, Outcome, SequenceControl
from tests.accumulator import accumulated, configure, copy_bundled, publish_accumulator
from tests.serving.test_model import Watched

WAIT_S = 30.0
"""Generous: these waits fail a test only when what they wait for never happens."""
TOLERANCE = 1e-5
OPT_IN = {"allow_non_finite_inputs": "true"}
NOT_FINITE = [np.nan, np.inf, -np.inf]


class Gate(Watched):
    """A runtime whose calls wait while the gate is shut; it records each call's batch rows."""

    def __init__(self, inner: Runtime) -> None:
        super().__init__(inner)
        self.open = threading.Event()
        self.open.set()

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        self.rows.append(len(feeds["reading"]))
        assert self.open.wait(WAIT_S), "the test never opened the gate"
        return self.inner.run(feeds, work, alone)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    copy_bundled(root, "sensor_gru")
    copy_bundled(root, "sensor_gru", "sensor_open", **OPT_IN)
    publish_accumulator(root)
    configure(publish_accumulator(root, "accumulator_open"), **OPT_IN)
    return root


class Engine:
    """The served models of `repository` on gated CPU runtimes."""

    def __init__(self, registry: ModelRegistry, gates: dict[str, Gate]) -> None:
        self.registry = registry
        self.gates = gates

    def model(self, name: str) -> tuple[ServedModel, Gate]:
        return self.registry.get(name), self.gates[name]


@pytest.fixture
async def engine(repository: Path, request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """Batches on the worker thread (none inline) unless `request.param` says otherwise."""
    limits = getattr(request, "param", Limits(max_queue_delay_s=0.0, inline_max_work=0))
    gates: dict[str, Gate] = {}

    def factory(path: Path) -> Runtime:
        gate = Gate(cpu_runtime(path))
        gates[path.parts[-3]] = gate
        return gate

    registry = ModelRegistry(repository, factory, limits)
    await registry.load_all()
    yield Engine(registry, gates)
    for gate in gates.values():
        gate.open.set()
    await registry.stop()


def cpu_runtime(path: Path) -> OnnxRuntime:
    return OnnxRuntime(path, EngineSettings(provider=Provider.CPU, spinning=Spinning.NEVER))


class Reference:
    """A model's graph run in-process, one request at a time, carrying the state between."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(
            str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        shape = self.session.get_inputs()[1].shape[1:]
        self.h = np.zeros((1, *shape), np.float32)

    def step(self, readings: list[float]) -> np.ndarray:
        """The forecast for one request of `readings`; the state moves on."""
        x = np.asarray(readings, np.float32).reshape(1, -1, 1)
        forecast, self.h = self.session.run(["forecast", "h_out"], {"reading": x, "h_in": self.h})
        return forecast


def request(
    model: str, sequence: object, readings: list[float], start: bool = False, end: bool = False
) -> InferenceRequest:
    return InferenceRequest(
        model,
        {"reading": np.asarray(readings, np.float32).reshape(1, -1, 1)},
        sequence=SequenceControl(sequence, start=start, end=end),
    )


def submit(model: ServedModel, wanted: InferenceRequest) -> asyncio.Future[Outcome]:
    """Submit now, as the servicer does; the outcome's future (a refusal `submit` raised, or
    what its callback heard)."""
    answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    try:
        model.submit(wanted, answer.set_result)
    except ServiceError as refused:
        answer.set_result(refused)
    return answer


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited too long"
        await asyncio.sleep(0.001)


async def one_batch(
    model: ServedModel, gate: Gate, requests: list[InferenceRequest]
) -> list[Outcome]:
    """Run `requests` as one batch: queued while the worker is held in a call of its own."""
    gate.open.clear()
    calls = len(gate.rows)
    blocker = submit(model, request(model.name, "blocker", [1.0], start=True, end=True))
    await until(lambda: len(gate.rows) > calls)
    answers = [submit(model, r) for r in requests]
    gate.open.set()
    await asyncio.wait_for(blocker, WAIT_S)
    return list(await asyncio.wait_for(asyncio.gather(*answers), WAIT_S))


def forecast_of(outcome: Outcome) -> np.ndarray:
    assert isinstance(outcome, InferenceResult), outcome
    return np.asarray(outcome.outputs["forecast"])


@pytest.mark.parametrize("value", NOT_FINITE)
async def test_a_non_finite_reading_fails_alone_in_its_batch(
    engine: Engine, repository: Path, value: float
) -> None:
    model, gate = engine.model("sensor_gru")
    references = {s: Reference(repository / "sensor_gru") for s in "abc"}
    first = await one_batch(
        model, gate, [request("sensor_gru", s, [24.0, 25.0], True) for s in "abc"]
    )
    for s, outcome in zip("abc", first, strict=True):
        np.testing.assert_allclose(
            forecast_of(outcome), references[s].step([24.0, 25.0]), atol=TOLERANCE
        )
    calls = len(gate.rows)
    a, b, c = await one_batch(
        model,
        gate,
        [
            request("sensor_gru", "a", [23.0, 22.0]),
            request("sensor_gru", "b", [23.0, value]),
            request("sensor_gru", "c", [26.0, 27.0]),
        ],
    )
    assert isinstance(b, InvalidArgument), b
    assert "input reading of model sensor_gru holds NaN or infinity" in str(b)
    assert "allow_non_finite_inputs" in str(b)
    np.testing.assert_allclose(forecast_of(a), references["a"].step([23.0, 22.0]), atol=TOLERANCE)
    np.testing.assert_allclose(forecast_of(c), references["c"].step([26.0, 27.0]), atol=TOLERANCE)
    assert gate.rows[calls:] == [1, 2]  # the blocker, then a and c in one call without b
    # b goes on from its first request, as if the bad one had never been sent.
    after = await submit(model, request("sensor_gru", "b", [21.0]))
    np.testing.assert_allclose(forecast_of(after), references["b"].step([21.0]), atol=TOLERANCE)
    assert isinstance(after, InferenceResult) and after.sequence_version == 2


@pytest.mark.parametrize("engine", [Limits(max_queue_delay_s=0.0)], indirect=True)
@pytest.mark.parametrize("readings", [[np.nan], [np.inf], [24.0, -np.inf]])
async def test_a_lone_first_step_with_a_non_finite_reading_starts_nothing(
    engine: Engine, readings: list[float]
) -> None:
    """On the event loop (a lone sequence's one-step request runs inline) and off it."""
    model, gate = engine.model("sensor_gru")
    refused = await submit(model, request("sensor_gru", "lone", readings, start=True))
    assert isinstance(refused, InvalidArgument), refused
    assert "input reading of model sensor_gru holds NaN or infinity" in str(refused)
    assert not model.holds("lone") and gate.rows == []
    unknown = await submit(model, request("sensor_gru", "lone", [24.0]))
    assert isinstance(unknown, SequenceNotFound) and "its first request failed" in str(unknown)


async def test_an_end_with_a_non_finite_reading_does_not_end_its_sequence(
    engine: Engine, repository: Path
) -> None:
    """Refused before it ends the sequence, so the client can send the END again."""
    model, _ = engine.model("sensor_gru")
    reference = Reference(repository / "sensor_gru")
    first = await submit(model, request("sensor_gru", "end", [24.0], start=True))
    np.testing.assert_allclose(forecast_of(first), reference.step([24.0]), atol=TOLERANCE)
    refused = await submit(model, request("sensor_gru", "end", [25.0, np.nan], end=True))
    assert isinstance(refused, InvalidArgument), refused
    assert model.holds("end")
    last = await submit(model, request("sensor_gru", "end", [25.0, 26.0], end=True))
    np.testing.assert_allclose(forecast_of(last), reference.step([25.0, 26.0]), atol=TOLERANCE)
    assert not model.holds("end")


async def test_a_state_that_overflows_is_not_kept(engine: Engine, repository: Path) -> None:
    """Finite readings, no opt-in: the model's own arithmetic overflows the state."""
    model, gate = engine.model("accumulator")
    first = await one_batch(
        model,
        gate,
        [request("accumulator", "big", [3e38], True), request("accumulator", "small", [1.0], True)],
    )
    assert all(isinstance(o, InferenceResult) for o in first), first
    big, small, fresh = await one_batch(
        model,
        gate,
        [
            request("accumulator", "big", [3e38]),
            request("accumulator", "small", [2.0]),
            request("accumulator", "fresh", [3e38, 3e38], start=True),
        ],
    )
    assert isinstance(big, InvalidArgument), big
    assert "model accumulator produced NaN or infinity in state h_out for sequence 'big'" in str(
        big
    )
    assert "it stays at version 1" in str(big)
    assert isinstance(fresh, InvalidArgument) and "the sequence was not started" in str(fresh)
    np.testing.assert_array_equal(forecast_of(small), [[[3.0]]])  # 2.0 + the state's 1.0
    assert isinstance(small, InferenceResult) and small.sequence_version == 2
    assert not model.holds("fresh")
    # big's slot still holds the state of its first request, finite.
    support = model.sequences
    assert support is not None
    slot = support.manager.live["big"].slot
    np.testing.assert_array_equal(support.arena.tensors[0][slot], accumulated([3e38])[0])
    # Alone in its batch, a state near the largest float32 is still finite, and kept.
    same = await submit(model, request("accumulator", "big", [0.0]))
    np.testing.assert_array_equal(forecast_of(same), [[[np.float32(3e38)]]])
    assert isinstance(same, InferenceResult) and same.sequence_version == 2
    after = await submit(model, request("accumulator", "big", [-3e38]))
    np.testing.assert_array_equal(forecast_of(after), [[[0.0]]])  # -3e38 + 3e38
    assert isinstance(after, InferenceResult) and after.sequence_version == 3


async def test_with_the_opt_in_a_non_finite_reading_is_taken(
    engine: Engine, repository: Path
) -> None:
    """sensor_gru's graph keeps its state finite whatever the reading (ONNX Runtime clamps
    the gates' arguments): with the opt-in, the step runs and the sequence moves on."""
    model, gate = engine.model("sensor_open")
    references = {s: Reference(repository / "sensor_gru") for s in "ab"}
    taken = await one_batch(
        model,
        gate,
        [
            request("sensor_open", "a", [24.0, np.nan], start=True),
            request("sensor_open", "b", [np.inf, 24.0], start=True),
        ],
    )
    for s, outcome, readings in zip("ab", taken, ([24.0, np.nan], [np.inf, 24.0]), strict=True):
        np.testing.assert_allclose(
            forecast_of(outcome), references[s].step(readings), atol=TOLERANCE
        )
        assert np.isfinite(references[s].h).all()
    for s in "ab":
        after = await submit(model, request("sensor_open", s, [25.0]))
        np.testing.assert_allclose(forecast_of(after), references[s].step([25.0]), atol=TOLERANCE)
        assert isinstance(after, InferenceResult) and after.sequence_version == 2


async def test_with_the_opt_in_a_non_finite_state_is_still_not_kept(engine: Engine) -> None:
    model, gate = engine.model("accumulator_open")
    first = await one_batch(
        model,
        gate,
        [request("accumulator_open", s, [2.0], start=True) for s in ("nan", "ok", "ending")],
    )
    assert all(isinstance(o, InferenceResult) for o in first), first
    refused, ok, ending = await one_batch(
        model,
        gate,
        [
            request("accumulator_open", "nan", [np.nan]),
            request("accumulator_open", "ok", [1.0]),
            # The END's state is not kept: it is answered as it ran, NaN and all.
            request("accumulator_open", "ending", [np.nan], end=True),
        ],
    )
    assert isinstance(refused, InvalidArgument), refused
    assert "state h_out for sequence 'nan'" in str(refused) and "version 1" in str(refused)
    np.testing.assert_array_equal(forecast_of(ok), [[[3.0]]])
    assert np.isnan(forecast_of(ending)).all()
    after = await submit(model, request("accumulator_open", "nan", [1.0]))
    np.testing.assert_array_equal(forecast_of(after), [[[3.0]]])  # from the state 2.0
    assert isinstance(after, InferenceResult) and after.sequence_version == 2


async def test_explicit_states_are_refused_with_or_without_the_opt_in(
    engine: Engine, repository: Path
) -> None:
    """A client that sends its own state (no sequence_id): a NaN there is refused even where
    the config allows non-finite inputs; a NaN reading is taken only where it does."""
    reading = np.asarray([[[24.0], [np.nan]]], np.float32)
    zero = np.zeros((1, 2, 64), np.float32)
    bad = zero.copy()
    bad[0, 1, 5] = np.nan
    for name in ("sensor_gru", "sensor_open"):
        model, _ = engine.model(name)
        refused = await submit(
            model, InferenceRequest(name, {"reading": reading[:, :1], "h_in": bad})
        )
        assert isinstance(refused, InvalidArgument), refused
        assert f"state h_in of model {name} holds NaN or infinity" in str(refused)
        outcome = await submit(model, InferenceRequest(name, {"reading": reading, "h_in": zero}))
        if name == "sensor_gru":
            assert isinstance(outcome, InvalidArgument), outcome
        else:
            expected = Reference(repository / "sensor_gru").step([24.0, np.nan])
            np.testing.assert_allclose(forecast_of(outcome), expected, atol=TOLERANCE)


@pytest.mark.parametrize("value", ["yes", "True", "1", ""])
async def test_a_bad_opt_in_value_fails_the_load(tmp_path: Path, value: str) -> None:
    copy_bundled(tmp_path, "sensor_gru", allow_non_finite_inputs=value)
    copy_bundled(tmp_path, "charlm_lstm")
    registry = ModelRegistry(tmp_path, cpu_runtime, Limits())
    try:
        await registry.load_all()  # the other models load
        assert registry.get("charlm_lstm").name == "charlm_lstm"
        with pytest.raises(InvalidModelRepository) as refused:
            await registry.load("sensor_gru")
        message = str(refused.value)
        assert "model sensor_gru: parameter allow_non_finite_inputs" in message
        assert f'must be "true" or "false", got {value!r}' in message
        [entry] = [e for e in registry.index() if e.name == "sensor_gru"]
        assert entry.state == "UNAVAILABLE" and entry.reason == message
    finally:
        await registry.stop()
