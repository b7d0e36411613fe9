"""NaN and infinity over the wire: refused INVALID_ARGUMENT, unary and stream, only for the
request that holds them, and never in a stored state (the Redis record read back with the
store's own decoding)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.sessions.store import StateKey, decode_state
from tests.accumulator import accumulated, configure, copy_bundled, publish_accumulator
from tests.api.conftest import Reference, Stream, infer_input
from tests.redis_server import RunningRedis
from tests.server import RunningServer, serving

NOT_FINITE = [np.nan, np.inf, -np.inf]
QUEUE_DELAY_US = 50_000
"""Long enough that requests sent together from one thread meet in one batch."""


def readings(*values: float) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(1, -1, 1)


def reading_input(x: np.ndarray) -> triton.InferInput:
    return infer_input("sensor_gru", x)


def version_of(result: triton.InferResult) -> int:
    return int(result.get_response().parameters["sequence_version"].int64_param)


def refused(call) -> str:
    """The message of the INVALID_ARGUMENT `call` must raise."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    return str(caught.value.message())


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("how", ["unary", "stream"])
def test_a_non_finite_reading_is_refused_and_changes_nothing(
    client, reference: Reference, value: float, how: str
) -> None:
    sid = f"nan-{how}-{value}"
    first, bad, after = readings(24.0, 25.0), readings(23.0, value), readings(22.0, 21.0)
    expected = reference.run("sensor_gru", np.concatenate([first, after], axis=1))
    steps = [(first, True, False), (bad, False, False), (after, False, True)]
    if how == "unary":
        client.infer("sensor_gru", [reading_input(first)], sequence_id=sid, sequence_start=True)
        message = refused(lambda: client.infer("sensor_gru", [reading_input(bad)], sequence_id=sid))
        last = client.infer(
            "sensor_gru", [reading_input(after)], sequence_id=sid, sequence_end=True
        )
    else:
        stream = Stream(client)
        try:
            for k, (x, start, end) in enumerate(steps):
                stream.client.async_stream_infer(
                    "sensor_gru",
                    [reading_input(x)],
                    request_id=str(k),
                    sequence_id=sid,
                    sequence_start=start,
                    sequence_end=end,
                )
            answers = stream.collect(3)
        finally:
            stream.close()
        [(_, error)] = [a for key, a in answers.items() if key.startswith("error")]
        assert "INVALID_ARGUMENT" in str(error)
        message = str(error)
        last = answers["2"][0]
    assert "input reading of model sensor_gru holds NaN or infinity" in message
    assert "allow_non_finite_inputs" in message
    np.testing.assert_allclose(last.as_numpy("forecast"), expected[:, 2:], rtol=1e-5, atol=1e-5)
    assert version_of(last) == 2


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    copy_bundled(root, "sensor_gru")
    publish_accumulator(root)
    configure(publish_accumulator(root, "accumulator_open"), allow_non_finite_inputs="true")
    configure(publish_accumulator(root, "accumulator_bad"), allow_non_finite_inputs="yes")
    return root


@pytest.fixture(scope="module")
def guarded(
    repository: Path, redis_server: RunningRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Its states in Redis (written every step), and requests that wait for company."""
    with serving(
        tmp_path_factory.mktemp("guarded"),
        "--model-repository", str(repository),
        "--state-store", redis_server.url, "--state-durability", "step",
        "--max-queue-delay-us", str(QUEUE_DELAY_US),
    ) as running:  # fmt: skip
        yield running


def batched_rows(server: RunningServer, model: str) -> tuple[float, float]:
    """(rows run, model calls made) for `model` so far."""
    found = {}
    for line in server.scrape().splitlines():
        for name in ("rnnserve_batch_size_sum", "rnnserve_batch_size_count"):
            if line.startswith(name + "{") and f'model="{model}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
    return found["rnnserve_batch_size_sum"], found["rnnserve_batch_size_count"]


def test_in_a_batch_of_streams_only_the_culprit_fails(
    guarded: RunningServer, reference: Reference
) -> None:
    rng = np.random.default_rng(13)
    ids = [f"batched-{k}" for k in range(4)]
    culprit = ids[1]
    data = {sid: (24 + 2 * rng.standard_normal((1, 3, 1))).astype(np.float32) for sid in ids}
    sent = {sid: x.copy() for sid, x in data.items()}
    sent[culprit][0, 1, 0] = np.nan
    clients = [triton.InferenceServerClient(guarded.target) for _ in ids]
    streams = [Stream(c) for c in clients]
    answers: dict[int, dict[str, tuple]] = {}
    try:
        for t in range(3):  # each round's requests are sent together, and batch
            for stream, sid in zip(streams, ids, strict=True):
                stream.client.async_stream_infer(
                    "sensor_gru",
                    [reading_input(sent[sid][:, t : t + 1])],
                    request_id=f"{sid}-{t}",
                    sequence_id=sid,
                    sequence_start=t == 0,
                    sequence_end=t == 2,
                )
            answers[t] = {}
            for stream in streams:
                answers[t].update(stream.collect(1))
    finally:
        for stream, connection in zip(streams, clients, strict=True):
            stream.close()
            connection.close()
    rows, calls = batched_rows(guarded, "sensor_gru")
    assert rows > calls, f"the streams never shared a batch ({rows} rows in {calls} calls)"
    [error] = [e for r, e in answers[1].values() if r is None]
    assert f"{culprit}-1" not in answers[1]
    assert "INVALID_ARGUMENT" in str(error)
    assert "input reading of model sensor_gru holds NaN or infinity" in str(error)
    for sid in ids:
        # The culprit's sequence goes on as if its bad step had never been sent.
        kept = [0, 2] if sid == culprit else [0, 1, 2]
        expected = reference.run("sensor_gru", data[sid][:, kept])
        for position, t in enumerate(kept):
            result, failure = answers[t][f"{sid}-{t}"]
            assert failure is None, failure
            np.testing.assert_allclose(
                result.as_numpy("forecast"),
                expected[:, position : position + 1],
                rtol=1e-5,
                atol=1e-5,
            )
            assert version_of(result) == position + 1


@pytest.mark.parametrize(
    ("model", "good", "bad"),
    [("accumulator", 3e38, 3e38), ("accumulator_open", 2.0, np.nan)],
    ids=["overflow", "opt-in-nan"],
)
def test_a_non_finite_state_is_never_stored(
    guarded: RunningServer, redis_server: RunningRedis, model: str, good: float, bad: float
) -> None:
    """Without the opt-in the state overflows on finite readings; with it, a NaN reading is
    taken but would make the state NaN. Either way the record in Redis stays as it was."""
    sid = f"stored-{model}"
    with triton.InferenceServerClient(guarded.target) as client:

        def step(value: float, start: bool = False, end: bool = False) -> triton.InferResult:
            return client.infer(
                model,
                [reading_input(readings(value))],
                sequence_id=sid,
                sequence_start=start,
                sequence_end=end,
            )

        assert version_of(step(good, start=True)) == 1
        message = refused(lambda: step(bad))
        assert f"model {model} produced NaN or infinity in state h_out" in message
        assert f"sequence {sid!r}" in message and "it stays at version 1" in message
        with redis_server.client() as store:
            record = store.get(str(StateKey(model, 1, sid)))
        assert record is not None
        stored = decode_state(record)
        assert stored.version == 1
        [state] = stored.tensors
        assert np.isfinite(state).all()
        np.testing.assert_array_equal(state, accumulated([good])[0])
        last = step(-1.0, end=True)  # forecast: the reading + the stored state
        np.testing.assert_array_equal(last.as_numpy("forecast"), readings(good - 1.0))
        assert version_of(last) == 2


def test_a_bad_opt_in_value_fails_the_model_load(guarded: RunningServer) -> None:
    with triton.InferenceServerClient(guarded.target) as client:
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["accumulator_bad"].state == "UNAVAILABLE"
        assert index["accumulator_bad"].reason == (
            'model accumulator_bad: parameter allow_non_finite_inputs must be "true" or '
            "\"false\", got 'yes'"
        )
        assert client.is_model_ready("accumulator_open")
    assert "accumulator_bad" in guarded.log_text()
