"""Small random networks and repositories built through the real export path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.models.architectures import RecurrentNet, RecurrentSpec
from rnnserve.models.publish import parse_config, publish, render_config
from rnnserve.models.signature import Signature

SIGNATURE = Signature(input_name="x", output_name="y", description="test model")


def random_net(spec: RecurrentSpec, seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    net = RecurrentNet(spec)
    with torch.no_grad():
        # Non-trivial normalisation, so the buffers are known to be exported too.
        net.input_shift.uniform_(-1, 1)
        net.input_scale.uniform_(0.5, 2)
        net.output_shift.uniform_(-1, 1)
        net.output_scale.uniform_(0.5, 2)
    return net.eval()


def small_gru(seed: int) -> RecurrentNet:
    spec = RecurrentSpec(cell="gru", input_size=3, hidden_size=8, output_size=2, num_layers=2)
    return random_net(spec, seed)


def publish_versions(
    repository: Path, name: str, versions: dict[int, int], policy_all: bool = False
) -> None:
    """Publish `name` with one random GRU per version (version -> seed)."""
    for version, seed in versions.items():
        publish(small_gru(seed), SIGNATURE, repository, name, version=version, idle_seconds=60)
    if policy_all:
        config_path = repository / name / "config.pbtxt"
        config = parse_config(config_path.read_text())
        config.version_policy.all.SetInParent()
        config_path.write_text(render_config(config))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """The output `y` of the model file at `path` for `x` [B, T, 3], from the zero state: what
    a sequence served by that file must answer, request by request."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": x}
    for tensor in session.get_inputs()[1:]:
        feeds[tensor.name] = np.zeros((x.shape[0], *tensor.shape[1:]), np.float32)
    return session.run(["y"], feeds)[0]
