"""Versions, reloads and unloads, and whole-sequence (bidirectional) models."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.models.architectures import RecurrentSpec
from rnnserve.models.publish import parse_config, publish, render_config
from tests.factories import SIGNATURE, publish_versions, random_net, run_onnx
from tests.server import RunningServer, serving

GRACE_S = 2.0


def x_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    bidirectional = RecurrentSpec(
        cell="lstm", input_size=3, hidden_size=8, output_size=2, bidirectional=True
    )
    publish(random_net(bidirectional), SIGNATURE, root, "bidir_lstm", streamable=False)
    publish_versions(root, "multi_gru", {1: 1, 2: 2}, policy_all=True)
    publish_versions(root, "reload_gru", {1: 3})
    publish_versions(root, "short_gru", {1: 5})
    config_path = root / "short_gru" / "config.pbtxt"
    config = parse_config(config_path.read_text())
    config.parameters["max_steps_per_request"].string_value = "4"
    config_path.write_text(render_config(config))
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory) -> Iterator[RunningServer]:
    # The `client` fixture of tests/api/conftest.py connects to this server.
    with serving(
        tmp_path_factory.mktemp("lifecycle"),
        "--model-repository", str(repository), "--unload-grace-s", str(GRACE_S),
    ) as running:  # fmt: skip
        yield running


def test_bidirectional_model_serves_whole_sequences_only(client, repository) -> None:
    x = np.random.default_rng(0).standard_normal((3, 11, 3)).astype(np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("bidir_lstm", [x_input(x[:1])], sequence_id=1, sequence_start=True)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not streamable" in caught.value.message()
    result = client.infer("bidir_lstm", [x_input(x)])
    expected = run_onnx(repository / "bidir_lstm" / "1" / "model.onnx", x)
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-5)
    assert not client.get_model_config("bidir_lstm").config.HasField("sequence_batching")


def test_metadata_lists_versions_and_hides_states(client) -> None:
    metadata = client.get_model_metadata("multi_gru")
    assert list(metadata.versions) == ["1", "2"]
    assert [t.name for t in metadata.inputs] == ["x"]
    assert [list(t.shape) for t in metadata.inputs] == [[-1, -1, 3]]
    config = client.get_model_config("multi_gru").config
    assert [s.input_name for s in config.sequence_batching.state] == ["h_in"]
    assert [i.name for i in config.input] == ["x"]


def test_requests_name_a_version_or_get_the_latest(client, repository) -> None:
    x = np.random.default_rng(1).standard_normal((1, 5, 3)).astype(np.float32)
    outputs = {}
    for version in ("1", "2", ""):
        result = client.infer(
            "multi_gru",
            [x_input(x)],
            model_version=version,
            sequence_id=50 + len(outputs),
            sequence_start=True,
            sequence_end=True,
        )
        outputs[version] = (result.get_response().model_version, result.as_numpy("y"))
    for version in ("1", "2"):
        expected = run_onnx(repository / "multi_gru" / version / "model.onnx", x)
        np.testing.assert_allclose(outputs[version][1], expected, rtol=1e-5, atol=1e-5)
    assert outputs[""][0] == "2"
    np.testing.assert_array_equal(outputs[""][1], outputs["2"][1])


def test_a_live_sequence_stays_on_its_version_across_a_reload(client, repository) -> None:
    x = np.random.default_rng(2).standard_normal((1, 6, 3)).astype(np.float32)
    v1 = repository / "reload_gru" / "1" / "model.onnx"
    first = client.infer("reload_gru", [x_input(x[:, :3])], sequence_id=70, sequence_start=True)
    assert first.get_response().model_version == "1"

    publish_versions(repository, "reload_gru", {2: 4})  # a new version lands on disk
    client.load_model("reload_gru")
    fresh = client.infer(
        "reload_gru", [x_input(x)], sequence_id=71, sequence_start=True, sequence_end=True
    )
    assert fresh.get_response().model_version == "2"

    rest = client.infer("reload_gru", [x_input(x[:, 3:])], sequence_id=70, sequence_end=True)
    assert rest.get_response().model_version == "1"
    joined = np.concatenate([first.as_numpy("y"), rest.as_numpy("y")], axis=1)
    np.testing.assert_allclose(joined, run_onnx(v1, x), rtol=1e-5, atol=1e-5)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        index = client.get_model_repository_index().models
        versions = [(m.version, m.state) for m in index if m.name == "reload_gru"]
        if versions == [("2", "READY")]:
            break
        time.sleep(0.1)
    assert versions == [("2", "READY")]


def test_unload_ends_live_sequences_after_the_grace_period(client, repository) -> None:
    x = np.ones((1, 1, 3), np.float32)
    client.infer("multi_gru", [x_input(x)], sequence_id=90, sequence_start=True)
    client.unload_model("multi_gru")
    with pytest.raises(InferenceServerException) as caught:
        client.infer("multi_gru", [x_input(x)], sequence_id=91, sequence_start=True)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    # Within the grace period the live sequence goes on.
    client.infer("multi_gru", [x_input(x)], sequence_id=90)
    # Once the grace is over the version is gone from the index (bounded wait, no fixed sleep).
    deadline = time.monotonic() + GRACE_S + 30
    while any(
        m.name == "multi_gru" and m.version for m in client.get_model_repository_index().models
    ):
        assert time.monotonic() < deadline, "the unloaded version never went away"
        time.sleep(0.05)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("multi_gru", [x_input(x)], sequence_id=90)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "unloaded" in caught.value.message()
    assert not client.is_model_ready("multi_gru")

    client.load_model("multi_gru")
    assert client.is_model_ready("multi_gru")
    again = client.infer(
        "multi_gru", [x_input(x)], sequence_id=92, sequence_start=True, sequence_end=True
    )
    assert again.as_numpy("y").shape == (1, 1, 2)


def test_a_load_during_the_unload_grace_keeps_the_version_and_its_sequences(
    client, repository
) -> None:
    x = np.ones((1, 1, 3), np.float32)
    first = client.infer("reload_gru", [x_input(x)], sequence_id=95, sequence_start=True)
    client.unload_model("reload_gru")
    assert not client.is_model_ready("reload_gru")
    # Still described while it unloads: statistics and metadata name it, a START is told why.
    assert client.get_model_metadata("reload_gru").name == "reload_gru"
    stats = client.get_inference_statistics("reload_gru").model_stats
    assert stats and stats[0].inference_count >= 1
    with pytest.raises(InferenceServerException) as caught:
        client.infer("reload_gru", [x_input(x)], sequence_id=96, sequence_start=True)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "being unloaded" in caught.value.message()
    client.load_model("reload_gru")
    assert client.is_model_ready("reload_gru")  # at once, not after the grace
    deadline = time.monotonic() + GRACE_S + 1.0
    while time.monotonic() < deadline:  # past the grace the version and the sequence remain
        time.sleep(0.1)
    version = first.get_response().model_version
    rest = client.infer("reload_gru", [x_input(x)], sequence_id=95, sequence_end=True)
    assert rest.get_response().model_version == version
    index = [(m.version, m.state) for m in client.get_model_repository_index().models
             if m.name == "reload_gru"]  # fmt: skip
    assert index == [(version, "READY")]


def test_loading_an_unknown_model_fails_clearly(client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("nothing_here")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "no model 'nothing_here'" in caught.value.message()


def test_a_broken_model_folder_is_reported_not_fatal(client, repository) -> None:
    broken = repository / "broken_gru"
    shutil.copytree(repository / "reload_gru", broken)
    (broken / "config.pbtxt").write_text(
        'name: "broken_gru" platform: "onnxruntime_onnx" '
        'max_batch_size: 8 input [{ name: "nope" '
        "data_type: TYPE_FP32 dims: [-1, 3] }]"
    )
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("broken_gru")
    assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "'nope'" in caught.value.message()
    assert client.is_server_live()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken_gru"].state == "UNAVAILABLE"
    assert "nope" in index["broken_gru"].reason


def test_a_model_config_sets_its_own_step_limit(client) -> None:
    x = np.zeros((1, 5, 3), np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("short_gru", [x_input(x)], sequence_id=1, sequence_start=True)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "short_gru carries 1..4 time steps, got 5" in caught.value.message()
    client.infer(
        "short_gru", [x_input(x[:, :4])], sequence_id=1, sequence_start=True, sequence_end=True
    )
