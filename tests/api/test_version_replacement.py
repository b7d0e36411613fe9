"""A version replaced by a load, as a client hears it on each transport: its sequences go on
through the unload grace, exactly, and are then told NOT_FOUND that their version was unloaded
(unary and in-band on a stream), as the README promises; the id begins again on the new one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.api.conftest import Stream
from tests.factories import publish_versions, run_onnx
from tests.server import serving

MODEL = "swap_gru"
GRACE_S = 1.0
X = np.random.default_rng(3).standard_normal((1, 4, 3)).astype(np.float32)


def x_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def served_versions(client: triton.InferenceServerClient) -> list[tuple[str, str]]:
    index = client.get_model_repository_index().models
    return [(m.version, m.state) for m in index if m.name == MODEL]


def test_a_replaced_versions_sequence_is_told_its_version_was_unloaded(
    tmp_path: Path, serving_transport: str
) -> None:
    repository = tmp_path / "repository"
    publish_versions(repository, MODEL, {1: 1})
    flags = ("--model-repository", str(repository), "--unload-grace-s", str(GRACE_S))
    with (
        serving(tmp_path / "server", *flags, transport=serving_transport) as server,
        triton.InferenceServerClient(server.target) as client,
    ):
        first = client.infer(MODEL, [x_input(X[:, :2])], sequence_id=7, sequence_start=True)
        publish_versions(repository, MODEL, {2: 2})
        client.load_model(MODEL)  # answers once version 2 serves
        assert client.is_model_ready(MODEL, "2")

        # In the grace, the sequence goes on on version 1, exactly.
        second = client.infer(MODEL, [x_input(X[:, 2:3])], sequence_id=7)
        assert second.get_response().model_version == "1"
        joined = np.concatenate([first.as_numpy("y"), second.as_numpy("y")], axis=1)
        v1 = repository / MODEL / "1" / "model.onnx"
        np.testing.assert_allclose(joined, run_onnx(v1, X[:, :3]), rtol=1e-5, atol=1e-5)

        deadline = time.monotonic() + GRACE_S + 30
        while served_versions(client) != [("2", "READY")]:
            assert time.monotonic() < deadline, served_versions(client)
            time.sleep(0.05)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [x_input(X[:, 3:])], sequence_id=7)
        assert caught.value.status() == "StatusCode.NOT_FOUND", caught.value.message()
        assert "was ended when version 1 was unloaded" in caught.value.message()
        stream = Stream(client)
        try:
            client.async_stream_infer(MODEL, [x_input(X[:, 3:])], sequence_id=7, request_id="s")
            [(result, error)] = stream.collect(1).values()
        finally:
            stream.close()
        assert result is None and error.message().startswith("[NOT_FOUND] "), error
        assert "was ended when version 1 was unloaded" in error.message()
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [x_input(X[:, :2])], model_version="1")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert "version 1 was unloaded" in caught.value.message()

        # The id begins again, on version 2, exactly.
        again = client.infer(MODEL, [x_input(X[:, :2])], sequence_id=7, sequence_start=True)
        rest = client.infer(MODEL, [x_input(X[:, 2:])], sequence_id=7, sequence_end=True)
        assert rest.get_response().model_version == "2"
        joined = np.concatenate([again.as_numpy("y"), rest.as_numpy("y")], axis=1)
        v2 = repository / MODEL / "2" / "model.onnx"
        np.testing.assert_allclose(joined, run_onnx(v2, X), rtol=1e-5, atol=1e-5)
