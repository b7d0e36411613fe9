"""Import a third-party ONNX recurrent graph: `rnnserve import MODEL.onnx`.

A graph made elsewhere carries its state under its own names and layout: PyTorch's default is
`h0`/`c0` in and `hn`/`cn` out, [layers * directions, B, H], with time-major data [T, B, F];
Keras and tf2onnx graphs carry one [B, H] state per layer. This module finds the state pairs (or
takes them), rewrites the graph with ONNX graph surgery so every state is batch-first [B, ...]
and every data input and output [B, T, ...] (Transpose nodes at the graph's edges; the names are
kept, and per-layer states stay separate state entries: stacking states of different sizes is
not possible, and separate entries serve the same), then checks the rewritten graph against the
original and step-by-step against whole-sequence on random inputs, and publishes it. A Reshape
that pins the exporter's example length after a recurrent node (torch.onnx's dynamo exporter
writes one) is repaired first (`repair.py`). No torch.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rnnserve.models import graph
from rnnserve.models.graph import BATCH, TIME, ExportError, Published
from rnnserve.models.repair import Repairs, repair

DataLayout = Literal["auto", "batch_first", "time_major"]
Dim = int | str | None
"""A declared axis: its size, its symbol, or None when the graph leaves it unnamed."""

_IN_WORDS = "in|input|inputs|init|initial|prev|previous|old|0"
_OUT_WORDS = "out|output|outputs|final|next|new|last|n"
_BATCH_HINTS = ("batch",)
_TIME_HINTS = ("seq", "time", "len", "step")


@dataclass(frozen=True)
class Value:
    """A graph input or output as declared."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    @property
    def dynamic(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if not isinstance(d, int)]

    def describe(self) -> str:
        shown = ["?" if d is None else d for d in self.dims]
        return f"{self.name} {self.dtype}{shown}"


@dataclass(frozen=True)
class Edge:
    """How one graph input or output changes: the permutation a Transpose applies (None: none
    needed) and its new, batch-first declared shape."""

    value: Value
    shape: tuple[int | str, ...]
    perm: tuple[int, ...] | None


@dataclass(frozen=True)
class Plan:
    """What an import found and will do."""

    interface: graph.Interface
    inputs: tuple[Edge, ...]
    outputs: tuple[Edge, ...]
    notes: tuple[str, ...] = field(default=())


def _values(model: Any) -> tuple[list[Value], list[Value]]:
    import onnx

    initializers = {t.name for t in model.graph.initializer}

    def value(info: Any) -> Value:
        tensor_type = info.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims: list[Dim] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or None)
        return Value(info.name, dtype, tuple(dims))

    inputs = [value(i) for i in model.graph.input if i.name not in initializers]
    return inputs, [value(o) for o in model.graph.output]


def _keys(name: str, words: str, suffix: str) -> set[str]:
    """Forms of a name with its in/out words dropped, that an input and its output share
    (h0/hn, h_in/h_out, state_in_1/state_out_1, input_h/output_h)."""
    lowered = name.lower()
    dropped = re.sub(rf"(^|[_.\-/:])({words})(?=$|[_.\-/:])", r"\1", lowered).strip("_.-/:")
    keys = {dropped}
    if re.fullmatch(rf"[a-z]+{suffix}", lowered):
        keys.add(lowered[: -len(suffix)])
    keys.discard("")
    return keys


def find_state_pairs(inputs: Sequence[Value], outputs: Sequence[Value]) -> list[tuple[str, str]]:
    """State pairs by name (h0 -> hn, h_in -> h_out, ...); ExportError when a name matches
    several partners."""
    pairs = []
    for i in inputs:
        keys = _keys(i.name, _IN_WORDS, "0")
        partners = [o for o in outputs if keys & _keys(o.name, _OUT_WORDS, "n")]
        if len(partners) > 1:
            raise ExportError(
                f"input {i.name} could pair with any of the outputs "
                f"{', '.join(o.name for o in partners)}: name its state pairs with "
                f"--state {i.name}:OUTPUT"
            )
        if partners:
            pairs.append((i.name, partners[0].name))
    taken = [o for _, o in pairs]
    for output in set(taken):
        if taken.count(output) > 1:
            raise ExportError(
                f"several inputs pair with output {output}: name the state pairs with --state "
                "IN:OUT"
            )
    return pairs


def plan(
    model: Any, pairs: Sequence[tuple[str, str]] | None = None, layout: DataLayout = "auto"
) -> Plan:
    """Find the state pairs (or check `pairs`), each tensor's batch and time axes, and the
    transposes that make them batch-first; ExportError saying what was found otherwise."""
    inputs, outputs = _values(model)
    by_name = {v.name: v for v in [*inputs, *outputs]}
    found = "graph inputs: " + ", ".join(v.describe() for v in inputs)
    found += "; outputs: " + ", ".join(v.describe() for v in outputs)
    pairs = _pairs(inputs, outputs, pairs, found)
    if not pairs:
        raise ExportError(
            f"found no recurrent state ({found}): no input and output pair by name (h0/hn, "
            "h_in/h_out, state_in/state_out). Name the pairs with --state IN:OUT; a graph that "
            "keeps its state inside cannot be served statefully: export it with the initial "
            "state as an input and the final state as an output"
        )
    states = [(by_name[i], by_name[o]) for i, o in pairs]
    state_names = {v.name for pair in states for v in pair}
    batch_symbols: set[str] = set()
    state_edges: list[tuple[Edge, Edge]] = []
    for state_in, state_out in states:
        _check_pair(state_in, state_out)
        axis = _state_batch_axis(state_in, state_out)
        symbol = state_in.dims[axis]
        if isinstance(symbol, str):
            batch_symbols.add(symbol)
        # Every other axis is fixed (_state_batch_axis).
        rest = tuple(d for k, d in enumerate(state_in.dims) if k != axis and isinstance(d, int))
        perm_out = (axis, *(k for k in range(len(state_in.dims)) if k != axis))
        perm_in = tuple(perm_out.index(k) for k in range(len(perm_out)))
        shape = (BATCH, *rest)
        state_edges.append(
            (
                Edge(state_in, shape, perm_in if axis else None),
                Edge(state_out, shape, perm_out if axis else None),
            )
        )
    data_inputs = [v for v in inputs if v.name not in state_names]
    data_outputs = [v for v in outputs if v.name not in state_names]
    if not data_inputs or not data_outputs:
        raise ExportError(
            f"no data {'input' if not data_inputs else 'output'} besides the states ({found})"
        )
    time_major = _time_major(data_inputs, batch_symbols, layout)
    notes = [f"data layout: {'time-major [T, B, ...]' if time_major else 'batch-first'}"]
    input_edges = [_data_edge(v, time_major, "input") for v in data_inputs]
    output_edges = [_data_edge(v, time_major, "output") for v in data_outputs]
    interface = graph.Interface(
        inputs=tuple(graph.Tensor(e.value.name, e.value.dtype, e.shape) for e in input_edges),
        outputs=tuple(graph.Tensor(e.value.name, e.value.dtype, e.shape) for e in output_edges),
        states=tuple(
            graph.StatePair(i.value.name, o.value.name, tuple(int(d) for d in i.shape[1:]))
            for i, o in state_edges
        ),
    )
    for i, o in state_edges:
        if i.perm is not None:
            notes.append(f"state {i.value.name} -> {o.value.name}: batch axis moved first")
    return Plan(
        interface,
        (*input_edges, *(i for i, _ in state_edges)),
        (*output_edges, *(o for _, o in state_edges)),
        tuple(notes),
    )


def _pairs(
    inputs: Sequence[Value],
    outputs: Sequence[Value],
    given: Sequence[tuple[str, str]] | None,
    found: str,
) -> Sequence[tuple[str, str]]:
    if given is None:
        return find_state_pairs(inputs, outputs)
    for state_in, state_out in given:
        if state_in not in {v.name for v in inputs}:
            raise ExportError(
                f"--state {state_in}:{state_out}: no graph input {state_in} ({found})"
            )
        if state_out not in {v.name for v in outputs}:
            raise ExportError(
                f"--state {state_in}:{state_out}: no graph output {state_out} ({found})"
            )
    return given


def _check_pair(state_in: Value, state_out: Value) -> None:
    pair = f"state {state_in.name} -> {state_out.name}"
    for value in (state_in, state_out):
        if value.dtype != "float32":
            raise ExportError(
                f"{pair}: {value.describe()} is not float32; rnnserve (and Triton's implicit "
                "state) carry float32 state: export the graph with a float32 state, or leave "
                "this tensor out of --state if it is not a recurrent state"
            )
    same_rank = len(state_in.dims) == len(state_out.dims)
    if not same_rank or any(
        isinstance(a, int) and isinstance(b, int) and a != b
        for a, b in zip(state_in.dims, state_out.dims, strict=False)
    ):
        raise ExportError(
            f"{pair}: mismatched pair, {state_in.describe()} in but {state_out.describe()} out; "
            "a state must come out as it goes in: name the right pairs with --state IN:OUT"
        )


def _state_batch_axis(state_in: Value, state_out: Value) -> int:
    dynamic = state_in.dynamic
    if not dynamic:
        raise ExportError(
            f"state {state_in.name} has a fixed batch: {state_in.describe()}; sequences are "
            "batched on one axis, so re-export with a dynamic batch axis (torch.onnx.export: "
            f"dynamic_axes={{'{state_in.name}': {{1: 'batch'}}, '{state_out.name}': "
            "{1: 'batch'}, ...} for PyTorch's [layers, B, H])"
        )
    if len(dynamic) > 1 or dynamic[0] > 1:
        raise ExportError(
            f"state {state_in.name} is {state_in.describe()}: a state needs exactly one dynamic "
            "axis, its batch, first or second ([B, ...] or [layers, B, H]); re-export with "
            "the other axes fixed"
        )
    return dynamic[0]


def _time_major(inputs: Sequence[Value], batch_symbols: set[str], layout: DataLayout) -> bool:
    for value in inputs:
        if len(value.dims) < 2 or not {0, 1} <= set(value.dynamic):
            raise ExportError(
                f"input {value.describe()}: a data input needs a dynamic batch and time axis "
                "first ([B, T, ...] or [T, B, ...]); export the model again with both marked "
                "dynamic: torch.onnx.export(..., dynamo=False, dynamic_axes=...) (torch's "
                "dynamo exporter fixes the time axis of an nn.RNN, which it unrolls over the "
                "example's steps), or rnnserve export --module"
            )
    if layout != "auto":
        return layout == "time_major"
    first = inputs[0]
    symbols = [str(d).lower() for d in first.dims[:2]]
    if first.dims[1] in batch_symbols and first.dims[0] not in batch_symbols:
        return True
    if first.dims[0] in batch_symbols and first.dims[1] not in batch_symbols:
        return False
    if any(h in symbols[1] for h in _BATCH_HINTS) or any(h in symbols[0] for h in _TIME_HINTS):
        return True
    if any(h in symbols[0] for h in _BATCH_HINTS) or any(h in symbols[1] for h in _TIME_HINTS):
        return False
    raise ExportError(
        f"input {first.describe()}: cannot tell its batch axis from its time axis (no symbol "
        "shared with the states, none named batch or time); pass --batch-first or --time-major"
    )


def _data_edge(value: Value, time_major: bool, kind: str) -> Edge:
    if len(value.dims) < 2:
        raise ExportError(
            f"{kind} {value.describe()}: rnnserve streams data as [B, T, ...] per time step; "
            "an output without batch and time axes cannot be served per step"
        )
    rest: list[int | str] = []
    for d in value.dims[2:]:
        if not isinstance(d, int):
            raise ExportError(
                f"{kind} {value.describe()}: only the batch and time axes may be dynamic"
            )
        rest.append(d)
    perm = (1, 0, *range(2, len(value.dims))) if time_major else None
    return Edge(value, (BATCH, TIME, *rest), perm)


def rewrite(model: Any, plan: Plan) -> Any:
    """A copy of `model` with a Transpose at each edge that needs one and batch-first declared
    shapes; the graph's input and output names are kept."""
    import onnx
    from onnx import helper

    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    taken = _names(g)
    front = []
    for edge in plan.inputs:
        _declare(g.input, edge)
        if edge.perm is None:
            continue
        inner = _fresh(f"{edge.value.name}__original_layout", taken)
        _rename_uses(g, edge.value.name, inner)
        front.append(helper.make_node("Transpose", [edge.value.name], [inner], perm=edge.perm))
    for edge in plan.outputs:
        _declare(g.output, edge)
        if edge.perm is None:
            continue
        inner = _fresh(f"{edge.value.name}__original_layout", taken)
        _rename_uses(g, edge.value.name, inner)
        for node in g.node:
            node.output[:] = [inner if n == edge.value.name else n for n in node.output]
        g.node.append(helper.make_node("Transpose", [inner], [edge.value.name], perm=edge.perm))
    for k, node in enumerate(front):
        g.node.insert(k, node)
    renamed = {e.value.name for e in [*plan.inputs, *plan.outputs] if e.perm is not None}
    kept = [v for v in g.value_info if v.name not in renamed]
    del g.value_info[:]
    g.value_info.extend(kept)
    new.producer_name = new.producer_name or "unknown"
    new.metadata_props.add(key="rnnserve.imported", value="batch-first states and data")
    try:
        onnx.checker.check_model(new)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the rewritten graph is not valid ONNX: {error}") from error
    return new


def _names(g: Any) -> set[str]:
    names = {v.name for v in [*g.input, *g.output, *g.value_info, *g.initializer]}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _rename_uses(g: Any, old: str, new: str) -> None:
    """Every read of `old` in the graph and its subgraphs (which may read outer values)."""
    import onnx

    for node in g.node:
        node.input[:] = [new if n == old else n for n in node.input]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attribute.g, old, new)
            for sub in attribute.graphs:
                _rename_uses(sub, old, new)


def _declare(values: Any, edge: Edge) -> None:
    graph.declare(next(v for v in values if v.name == edge.value.name), edge.shape)


def _original_reference(graph_file: Path | bytes, plan: Plan, shown: str) -> graph.Reference:
    """The original graph (a file, or a serialized model) on the feeds, each transposed back to
    its layout; its outputs transposed to the new one."""
    try:
        session = graph.checking_session(graph_file)
    except Exception as error:  # ONNX Runtime's errors derive from Exception only
        raise ExportError(
            f"{shown}: ONNX Runtime cannot load the graph, so rnnserve cannot serve it: {error}"
        ) from error
    perm_in = {e.value.name: e.perm for e in plan.inputs}
    perm_out = {e.value.name: e.perm for e in plan.outputs}
    names = plan.interface.output_names

    def run(feeds: graph.Feeds) -> list[np.ndarray]:
        original = {
            n: v if perm_in[n] is None else np.ascontiguousarray(np.transpose(v, perm_in[n]))
            for n, v in feeds.items()
        }
        results = session.run(names, original)
        return [
            r if perm_out[n] is None else np.transpose(r, perm_out[n])
            for n, r in zip(names, results, strict=True)
        ]

    return run


def _random_input(source: Path) -> graph.MakeInput:
    """Features from a standard normal; token ids below the size of the table they index
    (read from the original graph, as the server reads it), else 0 or 1."""
    from rnnserve.runtime.onnx import index_bounds

    bounds = index_bounds(source)

    def make(tensor: graph.Tensor, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
        shape = (batch, steps, *(int(d) for d in tensor.shape[2:]))
        if tensor.dtype.startswith(("int", "uint")):
            return rng.integers(0, bounds.get(tensor.name, 2), size=shape).astype(tensor.dtype)
        if tensor.dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        return rng.standard_normal(shape).astype(tensor.dtype)

    return make


def import_onnx(
    source: Path | str,
    repository: Path | str,
    name: str,
    version: int = 1,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    layout: DataLayout = "auto",
    description: str = "",
    tolerance: float = graph.PARITY_TOLERANCE,
    max_batch_size: int = graph.DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = graph.DEFAULT_IDLE_SECONDS,
) -> tuple[Published, Plan]:
    """Rewrite `source` batch-first, check it and publish it as `repository/name/version`.

    A Reshape that pins the exporter's example length (or batch) right after a recurrent node
    (torch.onnx's dynamo exporter writes one for nn.LSTM, nn.GRU and nn.RNN) is repaired first
    (`rnnserve.models.repair`); the repaired graph must then match the original at the
    example's own shape, and itself at every other. Raises ExportError saying what was found
    and what to do; a refused import leaves nothing in `repository`.
    """
    import onnx

    source, repository = Path(source), Path(repository)
    try:
        model = onnx.load(str(source))
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as error:
        raise ExportError(f"{source}: cannot read it as an ONNX model: {error}") from error
    except Exception as error:
        raise ExportError(f"{source}: not an ONNX model: {error}") from error
    found = plan(model, pairs, layout)
    for tensor in [*found.interface.inputs, *found.interface.outputs]:
        if tensor.dtype not in graph.CONFIG_TYPES:
            raise ExportError(f"{source}: {tensor.name} is {tensor.dtype}, which cannot be served")
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    repairs = repair(repaired)
    notes = (*found.notes, *(fix.describe() for fix in repairs.fixes))
    rewritten = rewrite(repaired, found)
    with graph.staged(repository, name, version) as staging:
        onnx.save(rewritten, str(staging))
        published = graph.publish_staged(
            staging,
            found.interface,
            lambda path: _check_import(path, source, repaired, found, repairs, tolerance),
            name,
            {"streamable": "true", "description": description or f"imported from {source.name}"},
            {
                "name": name,
                "version": version,
                "imported_from": {
                    "file": source.name,
                    "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                    "producer": f"{model.producer_name} {model.producer_version}".strip(),
                    "opset": max(
                        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                        default=0,
                    ),
                },
                "streamable": True,
                "states": [
                    {"input": s.input_name, "output": s.output_name, "shape": list(s.shape)}
                    for s in found.interface.states
                ],
                "rewrites": list(notes),
            },
            max_batch_size,
            idle_seconds,
        )
    return published, replace(found, notes=notes)


EXAMPLE_BATCH, EXAMPLE_STEPS = 2, 5
"""The shape the original is compared at where a repair pinned neither its batch nor length."""


def _check_import(
    path: Path, source: Path, repaired: Any, found: Plan, repairs: Repairs, tolerance: float
) -> graph.ParityReport:
    """Parity of the rewritten graph: against the original, where a Reshape was repaired
    against the original at the example's own shape and against the repaired original at
    every other; then what to do when it fails."""
    make = _random_input(source)
    check = functools.partial(
        graph.check_parity, path, found.interface, make, tolerance=tolerance, shown=source.name
    )
    if repairs.fixes:
        batch, steps = repairs.example()
        example = ((batch or EXAMPLE_BATCH, steps or EXAMPLE_STEPS),)
        try:
            check(_original_reference(source, found, source.name), "original", cases=example)
        except ExportError as error:
            raise ExportError(
                f"{error}; this was at the exporter's own example shape, after rnnserve "
                f"rewrote what pinned it ({'; '.join(f.describe() for f in repairs.fixes)}): "
                f"{_EXPORT_AGAIN}"
            ) from error
    reference = _original_reference(repaired.SerializeToString(), found, source.name)
    try:
        return check(reference, "original")
    except ExportError as error:
        if repairs.pinned:
            pinned = "; ".join(p.describe() for p in repairs.pinned)
            raise ExportError(
                f"{source.name}: the graph runs only at its exporter's example shape: {pinned} "
                "holds the example's sizes, in a form rnnserve does not rewrite (it rewrites a "
                "target that keeps the time and batch axes in place). To serve it, "
                f"{_EXPORT_AGAIN}. The check said: {error}"
            ) from error
        raise


_EXPORT_AGAIN = (
    "export the model again with torch.onnx.export(..., dynamo=False, dynamic_axes={...}) "
    "marking the batch and time axes of the data and the batch axis of each state dynamic, or "
    "with rnnserve's own export (rnnserve.models.export_module, or `rnnserve export "
    "--module`), which picks an exporter whose graph passes these checks"
)
