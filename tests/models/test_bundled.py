"""The committed model repository: layout, configs, declared shapes and the quality it claims.

The quality numbers are recomputed here with ONNX Runtime on the committed graphs, on the same
held-out splits the cards describe, so a card cannot claim what its model does not do.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.models.export import BATCH, TIME, declared_shapes
from rnnserve.models.publish import parse_config, render_config
from tests.conftest import BUNDLED

MODELS = ("charlm_lstm", "sensor_gru", "digits_lstm")


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(BUNDLED / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def card(name: str) -> dict:
    return json.loads((BUNDLED / name / "model_card.json").read_text())


def config(name: str) -> mc.ModelConfig:
    return parse_config((BUNDLED / name / "config.pbtxt").read_text())


def stream(sess: ort.InferenceSession, x: np.ndarray, chunk: int) -> np.ndarray:
    """Run a whole sequence through the graph `chunk` steps per call, carrying the state."""
    names = [i.name for i in sess.get_inputs()]
    feeds = {
        i.name: np.zeros((x.shape[0], *i.shape[1:]), np.float32) for i in sess.get_inputs()[1:]
    }
    outputs = []
    for start in range(0, x.shape[1], chunk):
        y, *states = sess.run(None, {names[0]: x[:, start : start + chunk], **feeds})
        feeds = dict(zip(names[1:], states, strict=True))
        outputs.append(y)
    return np.concatenate(outputs, axis=1)


def test_repository_is_small_and_in_triton_layout() -> None:
    assert sorted(p.name for p in BUNDLED.iterdir() if p.is_dir()) == sorted(MODELS)
    for name in MODELS:
        assert {p.name for p in (BUNDLED / name).iterdir()} == {
            "config.pbtxt",
            "model_card.json",
            "1",
        }
        assert [p.name for p in (BUNDLED / name / "1").iterdir()] == ["model.onnx"]
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total < 8 * 2**20


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trips_through_the_proto(name: str) -> None:
    text = (BUNDLED / name / "config.pbtxt").read_text()
    parsed = parse_config(text)
    assert render_config(parsed) == text
    as_json = json_format.MessageToJson(parsed)
    assert json_format.Parse(as_json, mc.ModelConfig()) == parsed
    assert mc.ModelConfig.FromString(parsed.SerializeToString()) == parsed


@pytest.mark.parametrize("name", MODELS)
def test_config_describes_the_graph(name: str) -> None:
    cfg = config(name)
    assert cfg.name == name
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size > 0
    shapes = declared_shapes(BUNDLED / name / "1" / "model.onnx")
    for tensor in [*cfg.input, *cfg.output]:
        # The config leaves out the batch axis; -1 is the dynamic time axis.
        assert shapes[tensor.name] == [BATCH, *[TIME if d == -1 else d for d in tensor.dims]]
    batching = cfg.sequence_batching
    assert batching.max_sequence_idle_microseconds > 0
    expected_states = ["h", "c"] if name.endswith("lstm") else ["h"]
    assert [s.input_name for s in batching.state] == [f"{s}_in" for s in expected_states]
    assert [s.output_name for s in batching.state] == [f"{s}_out" for s in expected_states]
    for state in batching.state:
        assert shapes[state.input_name] == [BATCH, *state.dims]
        assert shapes[state.output_name] == [BATCH, *state.dims]
        assert state.data_type == mc.TYPE_FP32
        (initial,) = state.initial_state
        assert initial.zero_data and list(initial.dims) == list(state.dims)
    # States are the server's: clients never see them as inputs or outputs.
    assert not {t.name for t in [*cfg.input, *cfg.output]} & {"h_in", "c_in", "h_out", "c_out"}


@pytest.mark.parametrize("name", MODELS)
def test_card_records_how_the_model_was_made(name: str) -> None:
    info = card(name)
    assert info["name"] == name
    assert len(info["data"]["sha256"]) == 64
    assert all(size > 0 for size in info["data"]["split_sizes"].values())
    assert info["parameters"]["recurrent"] == info["parameters"]["recurrent_closed_form"]
    assert info["training"]["seconds"] > 0 and info["training"]["epochs_run"] >= 1
    parity = info["export"]["parity"]
    assert parity["max_scaled_diff_vs_torch"] < 1e-5
    assert parity["max_scaled_diff_steps_vs_whole"] < 1e-5
    assert parity["max_abs_diff_vs_torch"] < 1e-4
    assert info["git_revision"] != "unknown"


@pytest.mark.parametrize("name", MODELS)
def test_one_step_at_a_time_equals_the_whole_sequence(name: str) -> None:
    sess = session(name)
    first = sess.get_inputs()[0]
    rng = np.random.default_rng(1)
    if first.type == "tensor(int64)":
        x = rng.integers(0, 97, size=(3, 40), dtype=np.int64)
    else:
        x = (rng.standard_normal((3, 40, first.shape[2])) * 3 + 8).astype(np.float32)
    np.testing.assert_allclose(stream(sess, x, 1), stream(sess, x, 40), atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream(sess, x, 7), stream(sess, x, 40), atol=1e-5, rtol=0)


def test_digits_accuracy_on_the_held_out_split() -> None:
    from rnnserve.models.zoo import DigitRows

    task = DigitRows()
    test = task.split["test"]
    probabilities = stream(session("digits_lstm"), task.images[test], 8)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    accuracy = float((probabilities[:, -1].argmax(-1) == task.labels[test]).mean())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(card("digits_lstm")["metrics"]["test_accuracy"], abs=1e-6)
    # Streaming makes sense: the answer firms up as rows arrive.
    early = float((probabilities[:, 3].argmax(-1) == task.labels[test]).mean())
    assert early < accuracy


def test_sensor_forecast_beats_repeating_the_last_value() -> None:
    from rnnserve.models.zoo import SensorForecast

    task = SensorForecast()
    forecasts = stream(session("sensor_gru"), task.series[None, :, None], 1)[0, :, 0]
    tail = slice(task.val_end, len(task.series))
    errors = forecasts[task.val_end - 1 : -1] - task.series[tail]
    rmse = float(np.sqrt(np.mean(errors**2)))
    naive = float(np.sqrt(np.mean((task.series[task.val_end - 1 : -1] - task.series[tail]) ** 2)))
    metrics = card("sensor_gru")["metrics"]
    assert rmse < 0.8 * naive
    assert rmse == pytest.approx(metrics["test_rmse"], rel=1e-4)
    assert naive == pytest.approx(metrics["test_naive_rmse"], rel=1e-6)


def test_char_model_beats_the_unigram_baseline_by_far() -> None:
    from rnnserve.models.zoo import CharLM

    task = CharLM()
    ids = task.test_ids[None, :]
    logits = stream(session("charlm_lstm"), ids[:, :-1], 512)[0]
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    bits = float(-log_probs[np.arange(len(logits)), ids[0, 1:]].mean() / np.log(2))
    metrics = card("charlm_lstm")["metrics"]
    assert bits == pytest.approx(metrics["test_bits_per_char"], abs=1e-3)
    assert bits < 0.5 * metrics["test_unigram_baseline_bits_per_char"]
    vocabulary = config("charlm_lstm").parameters["vocabulary"].string_value
    assert len(vocabulary) == logits.shape[-1]
