"""A real server on loopback, real tritonclient, and ONNX Runtime in-process as the reference."""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from tests.conftest import BUNDLED
from tests.server import RunningServer, serving

MODELS = ("charlm_lstm", "sensor_gru", "digits_lstm")
INPUTS = {"charlm_lstm": "tokens", "sensor_gru": "reading", "digits_lstm": "pixels"}
OUTPUTS = {"charlm_lstm": "logits", "sensor_gru": "forecast", "digits_lstm": "probabilities"}


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, serving_transport: str
) -> Iterator[RunningServer]:
    """The server most API tests share, on each transport its modules are tested on."""
    workdir = tmp_path_factory.mktemp(f"server-{serving_transport}")
    flags = ("--max-queue-delay-us", "500")
    with serving(workdir, *flags, transport=serving_transport) as running:
        yield running


TOKENS = {"alice": "alice-token-0123", "bob": "bob-token-4567", "root": "root-token-89ab"}
"""Principals and their bearer tokens, as `token_file` lists them."""


def bearer(principal: str) -> dict[str, str]:
    """The call metadata that names `principal` (a key of TOKENS)."""
    return {"authorization": f"Bearer {TOKENS[principal]}"}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --auth-tokens file naming the principals of TOKENS."""
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(
        "".join(f"{p} {hashlib.sha256(t.encode()).hexdigest()}\n" for p, t in TOKENS.items())
    )
    return path


@pytest.fixture
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.target) as connection:
        yield connection


class Reference:
    """The committed ONNX graph run in-process over a whole sequence: what the server must match."""

    def __init__(self, repository: Path = BUNDLED) -> None:
        self._sessions = {
            name: ort.InferenceSession(
                str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
            for name in MODELS
        }

    def run(self, model: str, x: np.ndarray) -> np.ndarray:
        """The model's main output for `x` [B, T, ...] from the zero state."""
        return self.outputs(model, x)[OUTPUTS[model]]

    def outputs(
        self,
        model: str,
        x: np.ndarray,
        names: Sequence[str] = (),
        state: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """`names` (the main output by default) for `x` from `state` (zero where not given)."""
        session = self._sessions[model]
        feeds = {INPUTS[model]: x}
        for tensor in session.get_inputs()[1:]:
            zero = np.zeros((x.shape[0], *tensor.shape[1:]), np.float32)
            feeds[tensor.name] = (state or {}).get(tensor.name, zero)
        wanted = list(names or (OUTPUTS[model],))
        return dict(zip(wanted, session.run(wanted, feeds), strict=True))


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


def sequence_data(model: str, steps: int, rng: np.random.Generator) -> np.ndarray:
    """A realistic input for one sequence of `steps` time steps, batch 1."""
    if model == "charlm_lstm":
        return rng.integers(1, 97, size=(1, steps), dtype=np.int64)
    if model == "sensor_gru":
        return (24 + 2 * rng.standard_normal((1, steps, 1))).astype(np.float32)
    return rng.integers(0, 17, size=(1, steps, 8)).astype(np.float32)


def infer_input(model: str, x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(
        INPUTS[model], list(x.shape), "INT64" if x.dtype == np.int64 else "FP32"
    )
    tensor.set_data_from_numpy(x)
    return tensor


class Stream:
    """tritonclient's callback stream, with results collected by request id."""

    def __init__(
        self, client: triton.InferenceServerClient, headers: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.results: queue.Queue = queue.Queue()
        client.start_stream(
            callback=lambda result, error: self.results.put((result, error)), headers=headers
        )

    def collect(self, count: int, timeout: float = 30) -> dict[str, tuple]:
        collected = {}
        for _ in range(count):
            result, error = self.results.get(timeout=timeout)
            key = result.get_response().id if result is not None else f"error-{len(collected)}"
            collected[key] = (result, error)
        return collected

    def close(self) -> None:
        self.client.stop_stream()
