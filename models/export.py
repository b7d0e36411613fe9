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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnserve.models import graph
from rnnserve.models.architectures import RecurrentNet, RecurrentSpec
from rnnserve.models.graph import (
    BATCH,
    OPSET,
    PARITY_CASES,
    PARITY_TOLERANCE,
    TIME,
    ExportError,
    ParityReport,
    declared_shapes,
)
from rnnserve.models.signature import Signature

# One set of checks and tolerances for every graph (graph.py); re-exported for the bundled path.
__all__ = [
    "BATCH",
    "OPSET",
    "PARITY_CASES",
    "PARITY_TOLERANCE",
    "TIME",
    "ExportError",
    "ParityReport",
    "declared_shapes",
]


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


def interface(spec: RecurrentSpec, signature: Signature, streamable: bool) -> graph.Interface:
    """A bundled network's graph interface (strings in shapes are dynamic axes)."""
    x: tuple[int | str, ...] = (BATCH, TIME) if spec.vocab_size else (BATCH, TIME, spec.input_size)
    states = ()
    if streamable:
        states = tuple(
            graph.StatePair(i, o, spec.state_shape)
            for i, o in zip(*state_io_names(spec), strict=True)
        )
    return graph.Interface(
        inputs=(graph.Tensor(signature.input_name, "int64" if spec.vocab_size else "float32", x),),
        outputs=(graph.Tensor(signature.output_name, "float32", (BATCH, TIME, spec.output_size)),),
        states=states,
    )


def expected_shapes(
    spec: RecurrentSpec, signature: Signature, streamable: bool
) -> dict[str, list[int | str]]:
    """Every graph input and output with its declared shape (strings are dynamic axes)."""
    return interface(spec, signature, streamable).expected_shapes()


def check_declared_shapes(
    onnx_path: Path, spec: RecurrentSpec, signature: Signature, streamable: bool
) -> None:
    graph.check_shapes(onnx_path, interface(spec, signature, streamable))


def export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """torch.onnx.export as every rnnserve export calls it (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see the module docstring); its deprecation
        # notices, its own and those of what it calls inside torch, are about that choice. The
        # batch-size warning asks for what is done here: the initial state is a graph input.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        # nn.RNN's own input checks compare fixed sizes while tracing; the shape and parity
        # checks prove the graph right for other batch sizes and lengths.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            # In eval mode: the exporter restores the wrapper's mode afterwards, recursively.
            module.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
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
    export_graph(
        _Graph(net, streamable),
        (example_x, *example_state),
        path,
        [signature.input_name, *(ins if streamable else [])],
        [signature.output_name, *(outs if streamable else [])],
        dynamic_axes,
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


def torch_reference(module: nn.Module, interface: graph.Interface) -> graph.Reference:
    """`module` (taking and returning the graph's flat signature) run in PyTorch on the feeds."""

    def run(feeds: graph.Feeds) -> list[np.ndarray]:
        args = [feeds[t.name] for t in interface.inputs]
        args += [feeds[s.input_name] for s in interface.states]
        with torch.no_grad():
            results = module(*(torch.from_numpy(a) for a in args))
        return [r.numpy() for r in results]

    return run


def check_parity(
    net: RecurrentNet,
    signature: Signature,
    onnx_path: Path,
    streamable: bool,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """ONNX Runtime against PyTorch on random inputs and states, and step-by-step vs whole."""
    spec = net.spec
    net.eval()
    return graph.check_parity(
        onnx_path,
        interface(spec, signature, streamable),
        lambda _tensor, batch, steps, rng: random_inputs(spec, net, batch, steps, rng),
        torch_reference(_Graph(net, streamable).eval(), interface(spec, signature, streamable)),
        "torch",
        seed,
        tolerance,
    )
