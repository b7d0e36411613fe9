"""Export any PyTorch recurrent module, not only the bundled architectures.

The module's forward takes the input and an optional state and returns the output and the new
state: `forward(x, state=None) -> (y, new_state)`, the state a tensor or a (nested) tuple of
tensors, each in PyTorch's [layers * directions, B, H] layout or batch-first. A wrapper makes
every state a batch-first graph input and output with a dynamic batch axis (and a time-major
module's data [T, B, ...] batch-first [B, T, ...]); then the graph goes through the same checks
and publication as the bundled models (graph.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from rnnserve.models import graph
from rnnserve.models.export import EXPORTERS, Exporter, export_graph, torch_reference
from rnnserve.models.graph import BATCH, TIME, ExportError, Published
from rnnserve.models.publish import git_revision
from rnnserve.models.repair import repair

logger = logging.getLogger(__name__)

StateLayout = Literal["auto", "layers_first", "batch_first"]
ExporterChoice = Literal["auto", "legacy", "dynamo"]
Structure = Any
"""The nesting of a module's state: None for a tensor, else a tuple of structures."""


def _flatten(state: Any, where: str) -> tuple[list[torch.Tensor], Structure]:
    if isinstance(state, torch.Tensor):
        return [state], None
    if isinstance(state, tuple | list) and state:
        leaves: list[torch.Tensor] = []
        structure = []
        for k, part in enumerate(state):
            part_leaves, part_structure = _flatten(part, f"{where}[{k}]")
            leaves += part_leaves
            structure.append(part_structure)
        return leaves, tuple(structure)
    raise ExportError(
        f"the module returned {type(state).__name__} as {where}; the state must be a tensor or "
        "a tuple of tensors (forward(x, state=None) -> (y, new_state))"
    )


def _unflatten(leaves: Sequence[torch.Tensor], structure: Structure) -> Any:
    def build(node: Structure, at: int) -> tuple[Any, int]:
        if node is None:
            return leaves[at], at + 1
        parts = []
        for child in node:
            part, at = build(child, at)
            parts.append(part)
        return tuple(parts), at

    return build(structure, 0)[0]


def _to_batch_first(tensor: torch.Tensor, batch_axis: int) -> torch.Tensor:
    return tensor if batch_axis == 0 else tensor.movedim(batch_axis, 0)


def _from_batch_first(tensor: torch.Tensor, batch_axis: int) -> torch.Tensor:
    # contiguous: PyTorch's RNN modules refuse a non-contiguous hidden state.
    return tensor if batch_axis == 0 else tensor.movedim(0, batch_axis).contiguous()


class _BatchFirst(nn.Module):
    """The flat, batch-first signature the graph gets: (x, *states_in) -> (y, *states_out)."""

    def __init__(
        self,
        module: nn.Module,
        structure: Structure,
        batch_axes: tuple[int, ...],
        time_major: bool,
    ) -> None:
        super().__init__()
        self.module = module
        self.structure = structure
        self.batch_axes = batch_axes
        self.time_major = time_major

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.time_major:
            x = x.transpose(0, 1)
        own = [_from_batch_first(s, a) for s, a in zip(states, self.batch_axes, strict=True)]
        y, new_state = self.module(x, _unflatten(own, self.structure))
        leaves, _ = _flatten(new_state, "new state")
        if self.time_major:
            y = y.transpose(0, 1)
        return (y, *(_to_batch_first(s, a) for s, a in zip(leaves, self.batch_axes, strict=True)))


@dataclass(frozen=True)
class _Probe:
    output: torch.Tensor
    leaves: list[torch.Tensor]
    structure: Structure


def _probe(module: nn.Module, x: torch.Tensor) -> _Probe:
    with torch.no_grad():
        try:
            result = module(x)
        except Exception as error:
            raise ExportError(
                f"the module failed on the example input {list(x.shape)} without a state: "
                f"{type(error).__name__}: {error}; forward(x, state=None) must start from "
                "its initial state when none is given"
            ) from error
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise ExportError(
            f"the module returned {type(result).__name__}; it must return (output, new_state) "
            "so the state can be carried from one request to the next"
        )
    output, state = result
    if not isinstance(output, torch.Tensor):
        raise ExportError(f"the module's output is {type(output).__name__}, not a tensor")
    leaves, structure = _flatten(state, "new state")
    return _Probe(output, leaves, structure)


def _grow(x: torch.Tensor, axis: int) -> torch.Tensor:
    """`x` one longer along `axis` (its first slice repeated)."""
    return torch.cat([x, x.narrow(axis, 0, 1)], dim=axis)


def _batch_axes(first: _Probe, wider: _Probe, layout: StateLayout, batch: int) -> tuple[int, ...]:
    """Each state's batch axis: the one axis whose size followed the batch size."""
    axes = []
    for k, (a, b) in enumerate(zip(first.leaves, wider.leaves, strict=True)):
        changed = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]
        if len(changed) != 1 or changed[0] > 1:
            raise ExportError(
                f"state {k} is {list(a.shape)} for a batch of {batch} and {list(b.shape)} for "
                f"{batch + 1}: a state needs one batch axis, first ([B, ...]) or second "
                "(PyTorch's [layers * directions, B, H]); a state that does not follow the "
                "batch cannot be kept per sequence"
            )
        found = changed[0]
        wanted = {"layers_first": 1, "batch_first": 0}.get(layout, found)
        if wanted != found:
            raise ExportError(
                f"state {k} is {list(a.shape)} for a batch of {batch}: its batch axis is "
                f"{found}, but state_layout={layout!r} says {wanted}; pass "
                f"state_layout={'batch_first' if found == 0 else 'layers_first'!r} or 'auto'"
            )
        axes.append(found)
    return tuple(axes)


def default_state_names(structure: Structure, count: int) -> list[str]:
    """h for one tensor; h, c for an LSTM's (h, c); state0, state1, ... otherwise."""
    if structure is None:
        return ["h"]
    if structure == (None, None):
        return ["h", "c"]
    return [f"state{k}" for k in range(count)]


def _dtype_name(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in graph.CONFIG_TYPES:
        raise ExportError(f"tensors of {tensor.dtype} cannot be served; use float32 or int64")
    return name


def export_module(
    module: nn.Module,
    example_input: torch.Tensor,
    repository: Path | str,
    name: str,
    version: int = 1,
    *,
    state_layout: StateLayout = "auto",
    time_major: bool = False,
    input_name: str = "input",
    output_name: str = "output",
    state_names: Sequence[str] | None = None,
    description: str = "",
    card: dict[str, Any] | None = None,
    tolerance: float = graph.PARITY_TOLERANCE,
    max_batch_size: int = graph.DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = graph.DEFAULT_IDLE_SECONDS,
    exporter: ExporterChoice = "auto",
) -> Published:
    """Export `module` to ONNX with batch-first state, check it, and publish it as
    `repository/name/version`.

    `module.forward(x, state=None)` returns `(y, new_state)`. `example_input` is one batch,
    [B, T, ...] (float features, or int64 token ids [B, T]), or [T, B, ...] with `time_major`
    (nn.LSTM's default, batch_first=False); the graph and the server take [B, T, ...] either way.
    Each state's batch axis is found by running the module at two batch sizes; `state_layout`
    ("layers_first": PyTorch's [layers * directions, B, H], "batch_first": [B, ...]) makes it a
    requirement. States are named `state_names` (default: h, or h and c for an LSTM's (h, c),
    else state0, state1, ...) with `_in` and `_out` graph tensors.

    `exporter` picks torch.onnx's exporter: "auto" tries the legacy one, then the dynamo one
    (`EXPORTER_ORDER`), and publishes the first graph that passes the shape and parity checks;
    a dynamo graph that pins the example's length after a recurrent node is repaired first.
    `Published.exporter` (and the card's `export.exporter`) says which was published, and
    `Published.repairs` what was rewritten. Raises ExportError for a module that does not fit,
    or when no exporter's graph passes, saying what was found and what to do; nothing is left
    in `repository` then.
    """
    repository = Path(repository)
    module.eval()
    batch_axis, time_axis = (1, 0) if time_major else (0, 1)
    if example_input.dim() < 2:
        raise ExportError(
            f"the example input is {list(example_input.shape)}: it needs a batch and a time axis"
        )
    batch, steps = example_input.shape[batch_axis], example_input.shape[time_axis]
    first = _probe(module, example_input)
    if not first.leaves:
        raise ExportError("the module returned no state: nothing to carry between requests")
    expected = (steps, batch) if time_major else (batch, steps)
    if tuple(first.output.shape[:2]) != expected:
        raise ExportError(
            f"the output is {list(first.output.shape)} for an input of "
            f"{list(example_input.shape)}: it must keep the input's "
            f"{'[T, B' if time_major else '[B, T'}, ...] axes (one output per time step)"
        )
    wider = _probe(module, _grow(example_input, batch_axis))
    axes = _batch_axes(first, wider, state_layout, batch)
    for k, leaf in enumerate(first.leaves):
        if leaf.dtype != torch.float32:
            raise ExportError(f"state {k} is {leaf.dtype}; a carried state must be float32")
    names = list(state_names or default_state_names(first.structure, len(first.leaves)))
    if len(names) != len(first.leaves):
        raise ExportError(
            f"{len(names)} state names for {len(first.leaves)} state tensors: {names}"
        )
    ins, outs = [f"{n}_in" for n in names], [f"{n}_out" for n in names]
    shapes = [
        tuple(int(d) for i, d in enumerate(leaf.shape) if i != axis)
        for leaf, axis in zip(first.leaves, axes, strict=True)
    ]
    data_dims = [d for i, d in enumerate(example_input.shape) if i not in (0, 1)]
    output_dims = [int(d) for d in first.output.shape[2:]]
    interface = graph.Interface(
        inputs=(graph.Tensor(input_name, _dtype_name(example_input), (BATCH, TIME, *data_dims)),),
        outputs=(
            graph.Tensor(output_name, _dtype_name(first.output), (BATCH, TIME, *output_dims)),
        ),
        states=tuple(graph.StatePair(i, o, s) for i, o, s in zip(ins, outs, shapes, strict=True)),
    )
    wrapper = _BatchFirst(module, first.structure, axes, time_major).eval()
    x = example_input.transpose(0, 1) if time_major else example_input
    zero = tuple(torch.zeros((batch, *s)) for s in shapes)
    sequence_axes = {0: BATCH, 1: TIME}
    dynamic_axes = {
        input_name: sequence_axes,
        output_name: sequence_axes,
        **{n: {0: BATCH} for n in ins + outs},
    }
    bound = int(example_input.max()) + 1 if not example_input.is_floating_point() else 0
    base_card = {
        "name": name,
        "version": version,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "streamable": True,
        "states": [
            {"input": i, "output": o, "shape": list(s), "module_batch_axis": a}
            for i, o, s, a in zip(ins, outs, shapes, axes, strict=True)
        ],
        "time_major_module": time_major,
        "parameters": {"total": sum(p.numel() for p in module.parameters())},
        "weights_sha256": _weights_digest(module),
        "git_revision": git_revision(),
    }
    reference = torch_reference(wrapper, interface)
    refused: list[str] = []
    for chosen in EXPORTER_ORDER[exporter]:
        try:
            with graph.staged(repository, name, version) as staging:
                opset, repairs = _export(
                    chosen, wrapper, (x, *zero), staging, interface, dynamic_axes
                )
                parity = functools.partial(
                    _parity, interface=interface, reference=reference, bound=bound,
                    tolerance=tolerance, shown=f"the {chosen} exporter's graph",
                )  # fmt: skip
                published = graph.publish_staged(
                    staging,
                    interface,
                    parity,
                    name,
                    {"streamable": "true", "description": description or type(module).__name__},
                    {
                        **base_card,
                        "export": {
                            "opset": opset,
                            "exporter": EXPORTERS[chosen],
                            "repairs": repairs,
                            "refused": refused,
                        },
                        **(card or {}),
                    },
                    max_batch_size,
                    idle_seconds,
                )
        except ExportError as error:
            refused.append(f"{EXPORTERS[chosen]}: {error}")
            continue
        logger.info("exported %s with %s", name, EXPORTERS[chosen])
        for reason in refused:
            logger.info("not taken: %s", reason)
        return dataclasses.replace(published, exporter=EXPORTERS[chosen], repairs=tuple(repairs))
    others = [e for e in EXPORTER_ORDER["auto"] if e not in EXPORTER_ORDER[exporter]]
    raise ExportError(
        "no exporter gave a graph that passes the checks: "
        + "; ".join(refused)
        + (
            f". Try the {others[0]} exporter: exporter={others[0]!r}, --exporter {others[0]} "
            "(the default, auto, tries both)"
            if others
            else ""
        )
        + ". The module must run any batch size and length from the state it is given: a "
        "length read as a Python int in forward (x.shape[1] in a loop) fixes the graph's "
        "length to the example's"
    )


EXPORTER_ORDER: dict[str, tuple[Exporter, ...]] = {
    "auto": ("legacy", "dynamo"),
    "legacy": ("legacy",),
    "dynamo": ("dynamo",),
}
"""Which exporters `export_module` tries, in order: `auto` takes the legacy exporter's graph
where it passes the checks (it writes the native LSTM/GRU/RNN operators with their batch and
time axes dynamic), else the dynamo exporter's, repaired."""


def _export(
    exporter: Exporter,
    wrapper: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    interface: graph.Interface,
    dynamic_axes: dict[str, dict[int, str]],
) -> tuple[int, list[str]]:
    """Export `wrapper` into `path` with `exporter`; for the dynamo exporter, repair what pins
    the example's length (`rnnserve.models.repair`) and declare the interface's axes, which the
    parity check then proves at other batch sizes and lengths. The graph's opset and what was
    repaired; ExportError when the exporter fails."""
    import onnx

    names = [t.name for t in interface.inputs] + [s.input_name for s in interface.states]
    try:
        export_graph(wrapper, example, path, names, interface.output_names, dynamic_axes, exporter)
    except ExportError:
        raise
    except Exception as error:
        why = _root_cause(error)
        raise ExportError(f"torch.onnx.export failed on the module: {why}") from error
    model = onnx.load(str(path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if exporter == "legacy":
        return opset, []
    repairs = repair(model)
    expected = interface.expected_shapes()
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in expected:
            graph.declare(value, expected[value.name])
    onnx.save(model, str(path))
    return opset, [fix.describe() for fix in repairs.fixes]


def _root_cause(error: BaseException, limit: int = 400) -> str:
    """The innermost cause of an exporter's error, on one line: the dynamo exporter wraps what
    torch.export said in pages of advice and colour codes."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _parity(
    path: Path,
    *,
    interface: graph.Interface,
    reference: graph.Reference,
    bound: int,
    tolerance: float,
    shown: str,
) -> graph.ParityReport:
    return graph.check_parity(
        path, interface, _random_input(path, bound), reference, "torch",
        tolerance=tolerance, shown=shown,
    )  # fmt: skip


def _random_input(path: Path, example_bound: int) -> graph.MakeInput:
    """Features from a standard normal; token ids below the embedding's size (read from the
    graph, as the server reads it), else below the example's largest id + 1."""
    from rnnserve.runtime.onnx import index_bounds

    bounds = index_bounds(path)

    def make(tensor: graph.Tensor, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
        shape = (batch, steps, *(int(d) for d in tensor.shape[2:]))
        if tensor.dtype.startswith("int"):
            high = bounds.get(tensor.name, max(example_bound, 1))
            return rng.integers(0, high, size=shape).astype(tensor.dtype)
        return rng.standard_normal(shape).astype(tensor.dtype)

    return make


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
