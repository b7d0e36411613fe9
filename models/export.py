"""Export a recurrent network to ONNX with its state as explicit, batch-first inputs and outputs.

The legacy TorchScript exporter (`dynamo=False`) is used on purpose: it emits the native ONNX
LSTM/GRU/RNN operators and keeps the batch and time axes dynamic, while the torch.export-based
exporter has been seen to pin an output's time axis to the example's length. Every export is
checked twice before it is accepted: the declared shapes of every graph input and output, and
numerical parity with PyTorch (ONNX Runtime vs PyTorch, and step-by-step vs whole-sequence).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnserve.models.architectures import RecurrentNet, RecurrentSpec
from rnnserve.models.signature import Signature

OPSET = 17
BATCH, TIME = "batch", "time"
PARITY_TOLERANCE = 1e-5
PARITY_CASES = ((1, 1), (1, 50), (7, 1), (7, 50))
"""(batch, steps) pairs checked at every export."""


class ExportError(Exception):
    """An export that must not be accepted; the message says why."""


@dataclass(frozen=True)
class ParityReport:
    """Largest differences found; the check is on the scaled ones.

    A difference is scaled by max(1, the tensor's largest magnitude): tensors of unit scale
    (outputs after a softmax, h) are held to an absolute 1e-5, while tensors that grow (an LSTM's
    cell state c, logits) are held to 1e-5 of their size, since float32 cannot do better there.
    """

    max_abs_diff_vs_torch: float
    max_abs_diff_steps_vs_whole: float
    max_scaled_diff_vs_torch: float
    max_scaled_diff_steps_vs_whole: float
    cases: tuple[tuple[int, int], ...]
    tolerance: float

    def as_card(self) -> dict[str, Any]:
        return asdict(self)


def state_io_names(spec: RecurrentSpec) -> tuple[list[str], list[str]]:
    return [f"{s}_in" for s in spec.state_names], [f"{s}_out" for s in spec.state_names]


class _Graph(nn.Module):
    """The flat signature the ONNX graph gets: (x, *states_in) -> (y, *states_out)."""

    def __init__(self, net: RecurrentNet, streamable: bool) -> None:
        super().__init__()
        self.net = net
        self.streamable = streamable

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new_state = self.net(x, tuple(state) if state else None)
        return (y, *new_state) if self.streamable else (y,)


def expected_shapes(
    spec: RecurrentSpec, signature: Signature, streamable: bool
) -> dict[str, list[int | str]]:
    """Every graph input and output with its declared shape (strings are dynamic axes)."""
    x: list[int | str] = [BATCH, TIME] if spec.vocab_size else [BATCH, TIME, spec.input_size]
    shapes: dict[str, list[int | str]] = {
        signature.input_name: x,
        signature.output_name: [BATCH, TIME, spec.output_size],
    }
    if streamable:
        ins, outs = state_io_names(spec)
        for name in ins + outs:
            shapes[name] = [BATCH, *spec.state_shape]
    return shapes


def declared_shapes(onnx_path: Path) -> dict[str, list[int | str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


def check_declared_shapes(
    onnx_path: Path, spec: RecurrentSpec, signature: Signature, streamable: bool
) -> None:
    expected = expected_shapes(spec, signature, streamable)
    declared = declared_shapes(onnx_path)
    if declared != expected:
        raise ExportError(
            f"{onnx_path}: declared graph shapes {declared} differ from the expected {expected}"
        )


def export_onnx(net: RecurrentNet, signature: Signature, path: Path, streamable: bool) -> None:
    spec = net.spec
    if streamable and not spec.streamable:
        raise ExportError(
            "a bidirectional network reads the sequence backwards too, so its state cannot be "
            "carried from one request to the next; export it without --streaming"
        )
    net.eval()
    ins, outs = state_io_names(spec)
    batch, steps = 2, 3
    if spec.vocab_size:
        example_x = torch.zeros((batch, steps), dtype=torch.int64)
    else:
        example_x = torch.zeros((batch, steps, spec.input_size))
    example_state = net.zero_state(batch) if streamable else ()
    sequence_axes = {0: BATCH, 1: TIME}
    dynamic_axes: dict[str, dict[int, str]] = {
        signature.input_name: sequence_axes,
        signature.output_name: sequence_axes,
    }
    if streamable:
        dynamic_axes.update({name: {0: BATCH} for name in ins + outs})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see the module docstring); its deprecation
        # notices, its own and those of what it calls inside torch, are about that choice. The
        # batch-size warning asks for what is done here: the initial state is a graph input.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        # nn.RNN's own input checks compare fixed sizes while tracing; the shape and parity
        # checks below prove the graph right for other batch sizes and lengths.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            # In eval mode: the exporter restores the wrapper's mode afterwards, recursively.
            _Graph(net, streamable).eval(),
            (example_x, *example_state),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[signature.input_name, *(ins if streamable else [])],
            output_names=[signature.output_name, *(outs if streamable else [])],
            dynamic_axes=dynamic_axes,
        )
    _stamp_metadata(path, spec, signature, streamable)
    check_declared_shapes(path, spec, signature, streamable)


def _stamp_metadata(
    path: Path, spec: RecurrentSpec, signature: Signature, streamable: bool
) -> None:
    import onnx

    model = onnx.load(str(path))
    model.producer_name = "rnnserve"
    entries = {
        "rnnserve.spec": json.dumps(asdict(spec), sort_keys=True),
        "rnnserve.signature": json.dumps(asdict(signature), sort_keys=True),
        "rnnserve.streamable": json.dumps(streamable),
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def random_inputs(
    spec: RecurrentSpec, net: RecurrentNet, batch: int, steps: int, rng: np.random.Generator
) -> np.ndarray:
    if spec.vocab_size:
        return rng.integers(0, spec.vocab_size, size=(batch, steps), dtype=np.int64)
    # Inputs within two scales of the centre the network normalises to, as real data is.
    scale = net.input_scale.numpy()
    shift = net.input_shift.numpy()
    raw = rng.uniform(-2, 2, (batch, steps, spec.input_size)).astype(np.float32)
    return (raw * scale + shift).astype(np.float32)


def check_parity(
    net: RecurrentNet,
    signature: Signature,
    onnx_path: Path,
    streamable: bool,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """ONNX Runtime against PyTorch on random inputs and states, and step-by-step vs whole."""
    import onnxruntime as ort

    spec = net.spec
    net.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ins, _ = state_io_names(spec)
    rng = np.random.default_rng(seed)
    vs_torch = (0.0, 0.0)
    steps_vs_whole = (0.0, 0.0)
    for batch, steps in PARITY_CASES:
        x = random_inputs(spec, net, batch, steps, rng)
        feeds: dict[str, np.ndarray] = {signature.input_name: x}
        if streamable:
            for name in ins:
                feeds[name] = rng.uniform(-1, 1, (batch, *spec.state_shape)).astype(np.float32)
        ours = session.run(None, feeds)
        with torch.no_grad():
            state = tuple(torch.from_numpy(feeds[n]) for n in ins) if streamable else None
            y, new_state = net(torch.from_numpy(x), state)
        theirs = [y.numpy(), *(s.numpy() for s in new_state)] if streamable else [y.numpy()]
        vs_torch = _worst(vs_torch, *(_diff(a, b) for a, b in zip(ours, theirs, strict=True)))
        if streamable and steps > 1:
            steps_vs_whole = _worst(steps_vs_whole, _steps_vs_whole(session, feeds, ins, ours))
    if vs_torch[1] > tolerance or steps_vs_whole[1] > tolerance:
        raise ExportError(
            f"{onnx_path}: parity check failed (scaled max |onnx - torch| = {vs_torch[1]:.3g}, "
            f"scaled max |step-by-step - whole| = {steps_vs_whole[1]:.3g}, "
            f"tolerance {tolerance:g})"
        )
    return ParityReport(
        vs_torch[0], steps_vs_whole[0], vs_torch[1], steps_vs_whole[1], PARITY_CASES, tolerance
    )


def _steps_vs_whole(
    session: Any, feeds: dict[str, np.ndarray], state_inputs: list[str], whole: list[np.ndarray]
) -> tuple[float, float]:
    """Feed the steps one at a time carrying the state; compare with one call over all steps."""
    x_name = next(name for name in feeds if name not in state_inputs)
    x = feeds[x_name]
    state = [feeds[name] for name in state_inputs]
    outputs = []
    for t in range(x.shape[1]):
        y, *state = session.run(
            None, {x_name: x[:, t : t + 1], **dict(zip(state_inputs, state, strict=True))}
        )
        outputs.append(y)
    stepped = [np.concatenate(outputs, axis=1), *state]
    return _worst(*(_diff(a, b) for a, b in zip(stepped, whole, strict=True)))


def _diff(a: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, the same scaled by max(1, max |reference|))."""
    if a.shape != reference.shape:
        raise ExportError(f"output shapes differ: {a.shape} vs {reference.shape}")
    diff = float(np.max(np.abs(a.astype(np.float64) - reference), initial=0.0))
    return diff, diff / max(1.0, float(np.max(np.abs(reference), initial=0.0)))


def _worst(*diffs: tuple[float, float]) -> tuple[float, float]:
    return max(d[0] for d in diffs), max(d[1] for d in diffs)
