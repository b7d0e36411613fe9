"""Export a recurrent network to ONNX with its state as explicit, batch-first inputs and outputs.

The legacy TorchScript exporter (`dynamo=False`) is used on purpose: it emits the native ONNX
LSTM/GRU/RNN operators and keeps the batch and time axes dynamic, while the torch.export-based
exporter pins the example's length in a Reshape after each recurrent node (`repair.py` rewrites
it; `export_module` falls back to that exporter where the legacy one fails). Every export is
checked twice before it is accepted: the declared shapes of every graph input and output, and
numerical parity with PyTorch (ONNX Runtime vs PyTorch, and step-by-step vs whole-sequence).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

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


Exporter = Literal["legacy", "dynamo"]
"""torch.onnx's two exporters: the TorchScript-based one (`dynamo=False`) and the
torch.export-based one (`dynamo=True`, torch.onnx.export's default since PyTorch 2.9)."""
EXPORTERS: dict[str, str] = {
    "legacy": "torch.onnx legacy (dynamo=False)",
    "dynamo": "torch.onnx dynamo (dynamo=True)",
}
"""How a model card and a message name each exporter."""


def export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    exporter: Exporter = "legacy",
) -> None:
    """torch.onnx.export as every rnnserve export calls it (see the module docstring), with
    `exporter`; `dynamic_axes` maps each named tensor's axes to their names.

    The dynamo exporter's graph is written whole into `path` (no external data file), and
    needs onnxscript: ExportError saying how to install it where it is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "dynamo":
        _require_onnxscript()
        # The exporter reports its progress on stdout (a command's output is its JSON report),
        # logs each pass of its optimiser, and warns about what the checks after it decide
        # (shapes, parity): the export's own report says what matters.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            _quiet(DYNAMO_LOGGERS),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                example,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=_dynamic_shapes(module, input_names, dynamic_axes),
                verbose=False,
            )
            if program is None:
                raise ExportError("torch.onnx.export(dynamo=True) returned no program")
            program.save(str(path), external_data=False)
        return
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


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401 - what the dynamo exporter writes its graph with
    except ImportError as error:
        raise ExportError(
            "torch.onnx's dynamo exporter needs onnxscript, which is not installed: "
            "pip install onnxscript (rnnserve[train] includes it)"
        ) from error


def _dynamic_shapes(
    module: nn.Module, input_names: list[str], dynamic_axes: dict[str, dict[int, str]]
) -> tuple[Any, ...]:
    """torch.export's form of `dynamic_axes`: one entry per positional input of `module`'s
    forward, its varargs as one tuple (dynamic_axes cannot describe a forward(x, *states));
    one Dim per axis name, so the batch of the data and of each state is one symbol."""
    dims: dict[str, Any] = {}
    shapes: tuple[Any, ...] = tuple(
        {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
        for axes in (dynamic_axes.get(name, {}) for name in input_names)
    )
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
        shapes = (*shapes[:named], shapes[named:])
    return shapes


DYNAMO_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
"""The loggers the dynamo exporter talks through."""


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The loggers `names` at ERROR for the block, then as they were."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
