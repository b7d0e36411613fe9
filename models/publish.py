"""Write a network into a model repository in Triton's layout.

<repository>/<name>/config.pbtxt        text-format inference.ModelConfig
<repository>/<name>/model_card.json     how the model was made and how good it is
<repository>/<name>/<version>/model.onnx
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.models.architectures import RecurrentNet, RecurrentSpec, recurrent_parameter_count
from rnnserve.models.export import ParityReport, check_parity, export_onnx, state_io_names
from rnnserve.models.signature import Signature

CONFIG_FILE = "config.pbtxt"
CARD_FILE = "model_card.json"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_IDLE_SECONDS = 300.0
DEFAULT_MAX_SEQUENCES = 4096
DEFAULT_QUEUE_DELAY_US = 0


@dataclass(frozen=True)
class Published:
    config_path: Path
    onnx_path: Path
    card_path: Path
    parity: ParityReport


def model_config(
    name: str,
    spec: RecurrentSpec,
    signature: Signature,
    streamable: bool,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> mc.ModelConfig:
    """The model's configuration; the batch axis is implicit (max_batch_size > 0)."""
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    config.input.add(
        name=signature.input_name,
        data_type=mc.TYPE_INT64 if spec.vocab_size else mc.TYPE_FP32,
        dims=[-1] if spec.vocab_size else [-1, spec.input_size],
    )
    config.output.add(
        name=signature.output_name, data_type=mc.TYPE_FP32, dims=[-1, spec.output_size]
    )
    if streamable:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = int(idle_seconds * 1_000_000)
        batching.oldest.max_candidate_sequences = DEFAULT_MAX_SEQUENCES
        batching.oldest.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
        # Triton's implicit state: the server owns h (and c), clients never send them.
        for state_in, state_out in zip(*state_io_names(spec), strict=True):
            state = batching.state.add(
                input_name=state_in,
                output_name=state_out,
                data_type=mc.TYPE_FP32,
                dims=list(spec.state_shape),
            )
            state.initial_state.add(
                data_type=mc.TYPE_FP32, dims=list(spec.state_shape), zero_data=True, name="zero"
            )
    parameters = {
        "cell": spec.cell,
        "streamable": "true" if streamable else "false",
        "description": signature.description,
        **dict(signature.parameters),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def render_config(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Dirty means the training and export code differs from the commit; the repository
        # being written to is an output, not code.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "models", ":!models/repository"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}"


def parameter_card(net: RecurrentNet) -> dict[str, Any]:
    actual = net.recurrent_parameters()
    closed_form = recurrent_parameter_count(net.spec)
    if actual != closed_form:
        raise AssertionError(f"recurrent parameters {actual} != closed form {closed_form}")
    return {
        "recurrent": actual,
        "recurrent_closed_form": closed_form,
        "closed_form": "gates * (X*H + H*H + 2H) per layer and direction (PyTorch keeps "
        "b_ih and b_hh); gates = 4 LSTM, 3 GRU, 1 RNN",
        "total": sum(p.numel() for p in net.parameters()),
    }


def publish(
    net: RecurrentNet,
    signature: Signature,
    repository: Path,
    name: str,
    version: int = 1,
    streamable: bool = True,
    card: dict[str, Any] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> Published:
    """Export, check and write one model version with its config and card.

    Nothing is written over a good model unless the new export passed its checks: the graph is
    written to a temporary file first.
    """
    model_dir = repository / name
    onnx_path = model_dir / str(version) / MODEL_FILE
    staging = onnx_path.with_suffix(".onnx.partial")
    export_onnx(net, signature, staging, streamable)
    try:
        parity = check_parity(net, signature, staging, streamable)
    except Exception:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(onnx_path)
    config = model_config(name, net.spec, signature, streamable, max_batch_size, idle_seconds)
    config_path = model_dir / CONFIG_FILE
    config_path.write_text(render_config(config))
    card_path = model_dir / CARD_FILE
    full_card = {
        "name": name,
        "version": version,
        "architecture": asdict(net.spec),
        "streamable": streamable,
        "signature": asdict(signature),
        "parameters": parameter_card(net),
        "export": {
            "opset": 17,
            "exporter": "torch.onnx legacy (dynamo=False)",
            "parity": parity.as_card(),
        },
        "git_revision": git_revision(),
        **(card or {}),
    }
    card_path.write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
    return Published(config_path, onnx_path, card_path, parity)
