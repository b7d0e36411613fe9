"""Write a network into a model repository in Triton's layout.

<repository>/<name>/config.pbtxt        text-format inference.ModelConfig
<repository>/<name>/model_card.json     how the model was made and how good it is
<repository>/<name>/<version>/model.onnx
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.models import graph
from rnnserve.models.architectures import RecurrentNet, RecurrentSpec, recurrent_parameter_count
from rnnserve.models.export import EXPORTERS, check_parity, export_onnx, interface
from rnnserve.models.graph import (
    CARD_FILE,
    CONFIG_FILE,
    DEFAULT_IDLE_SECONDS,
    DEFAULT_MAX_BATCH_SIZE,
    MODEL_FILE,
    Published,
    parse_config,
    render_config,
)
from rnnserve.models.signature import Signature

# The names the bundled path and its tests import from here; graph.py holds them for every path.
__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "MODEL_FILE",
    "Published",
    "model_config",
    "parse_config",
    "publish",
    "render_config",
]


def model_config(
    name: str,
    spec: RecurrentSpec,
    signature: Signature,
    streamable: bool,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> mc.ModelConfig:
    """The model's configuration; the batch axis is implicit (max_batch_size > 0)."""
    return graph.model_config(
        name,
        interface(spec, signature, streamable),
        _parameters(spec, signature, streamable),
        max_batch_size,
        idle_seconds,
    )


def _parameters(spec: RecurrentSpec, signature: Signature, streamable: bool) -> dict[str, str]:
    return {
        "cell": spec.cell,
        "streamable": "true" if streamable else "false",
        "description": signature.description,
        **dict(signature.parameters),
    }


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
    written to a temporary file first, and a refused export leaves no folder it made.
    """
    full_card = {
        "name": name,
        "version": version,
        "architecture": asdict(net.spec),
        "streamable": streamable,
        "signature": asdict(signature),
        "parameters": parameter_card(net),
        "export": {"opset": graph.OPSET, "exporter": EXPORTERS["legacy"]},
        "git_revision": git_revision(),
        **(card or {}),
    }
    with graph.staged(repository, name, version) as staging:
        export_onnx(net, signature, staging, streamable)
        return graph.publish_staged(
            staging,
            interface(net.spec, signature, streamable),
            lambda path: check_parity(net, signature, path, streamable),
            name,
            _parameters(net.spec, signature, streamable),
            full_card,
            max_batch_size,
            idle_seconds,
        )
