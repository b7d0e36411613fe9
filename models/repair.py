"""Repair a graph whose exporter pinned the example's time steps (or batch) after a recurrent node.

PyTorch's torch.export-based ONNX exporter (`torch.onnx.export`'s default since 2.9) writes an
`nn.LSTM`, `nn.GRU` or `nn.RNN` as the ONNX operator followed by a Reshape of its output `Y`
([T, directions, B, H]) to PyTorch's [T, B, directions * H], and may write that Reshape's target
as a constant holding the example's T, even when the time axis was marked dynamic. The graph
then runs at the example's length only: ONNX Runtime fails any other with "requested shape
{3,1,12}" for a one-step input.

`repair` recognises that pattern: a Reshape with a constant target, fed from a recurrent node's
output through layout-only nodes (Transpose, Squeeze, Unsqueeze, Identity), whose target keeps
each time and batch axis at its own position. It writes those entries as 0 (ONNX Reshape: copy
that axis from the input), so the Reshape follows whatever length and batch arrive. Anything else
is left as it is, and reported: the parity checks then decide. No torch: `rnnserve import` runs
on an ONNX file alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
LAYOUT_ONLY = frozenset({"Transpose", "Squeeze", "Unsqueeze", "Identity"})
TIME, BATCH = "T", "B"
Role = str | int
"""What an axis of a recurrent node's output is: TIME, BATCH, or a fixed size."""


@dataclass(frozen=True)
class Fix:
    """One Reshape whose constant target pinned the time (or batch) axis, rewritten."""

    node: str
    after: str
    """The recurrent node it follows (its name, else its type)."""
    before: tuple[int, ...]
    target: tuple[int, ...]
    pinned: tuple[tuple[str, int], ...]
    """The axes it had pinned: ("time", the example's T), ("batch", B)."""

    def describe(self) -> str:
        pins = ", ".join(f"{axis} {size}" for axis, size in self.pinned)
        return (
            f"Reshape {self.node} after {self.after} had the exporter's example ({pins}) in its "
            f"target {list(self.before)}: now {list(self.target)} (0 copies the axis)"
        )


@dataclass(frozen=True)
class Pinned:
    """A Reshape after a recurrent node whose constant target holds sizes of the example, and
    that `repair` could not rewrite."""

    node: str
    after: str
    target: tuple[int, ...]

    def describe(self) -> str:
        return f"Reshape {self.node} after {self.after} to the fixed shape {list(self.target)}"


@dataclass(frozen=True)
class Repairs:
    """What `repair` did (`fixes`) and what it found and left (`pinned`)."""

    fixes: tuple[Fix, ...] = ()
    pinned: tuple[Pinned, ...] = ()

    def example(self) -> tuple[int | None, int | None]:
        """The example's (batch, time steps) the fixed targets held, where they said."""
        found = dict(pin for fix in self.fixes for pin in fix.pinned)
        return found.get("batch"), found.get("time")


def repair(model: Any) -> Repairs:
    """Rewrite, in `model` (an onnx.ModelProto), every Reshape that pinned a recurrent node's
    time or batch axis (see the module docstring); what was done and what was left. When
    anything was rewritten, the graph's intermediate shape annotations (value_info), which
    hold the example's sizes too, are dropped for ONNX Runtime to infer again."""
    g = model.graph
    constants = _constants(g)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[tuple[str, ...], Fix | Pinned | None] = {}
    for node in g.node:
        if node.op_type in RECURRENT and node.domain in ("", "ai.onnx"):
            for reshape, roles in _reshapes_after(node, consumers, constants):
                if tuple(reshape.output) not in found:
                    after = node.name or node.op_type
                    found[tuple(reshape.output)] = _rewrite(
                        g, reshape, roles, after, constants, consumers
                    )
    fixes = tuple(f for f in found.values() if isinstance(f, Fix))
    if fixes:
        del g.value_info[:]
    return Repairs(fixes, tuple(p for p in found.values() if isinstance(p, Pinned)))


def _rewrite(
    g: Any,
    reshape: Any,
    roles: list[Role],
    after: str,
    constants: dict[str, np.ndarray],
    consumers: dict[str, list[Any]],
) -> Fix | Pinned | None:
    """Rewrite one Reshape's target to follow its input's time and batch axes: the Fix; or
    Pinned where it holds the example's sizes in another form; None where nothing is pinned."""
    target = tuple(int(v) for v in constants[reshape.input[1]].reshape(-1))
    shown = reshape.name or "(unnamed)"
    fixed = _fixed_target(roles, target, _allowzero(reshape))
    if fixed is None:
        return Pinned(shown, after, target) if _holds_example(roles, target) else None
    new_target, pins = fixed
    if not pins:
        return None  # it follows its input already
    old = reshape.input[1]
    name = _fresh(g, f"{old}__follows_input")
    g.initializer.append(_int64_tensor(name, new_target))
    reshape.input[1] = name
    consumers[old].remove(reshape)
    if not consumers[old]:
        _drop_constant(g, old)
    _clear_allowzero(reshape)
    return Fix(shown, after, target, new_target, pins)


def _constants(g: Any) -> dict[str, np.ndarray]:
    """The graph's integer constants by name: initializers and Constant nodes."""
    from onnx import helper, numpy_helper

    found = {}
    for tensor in g.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "i":
            found[tensor.name] = array
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    array = numpy_helper.to_array(helper.get_attribute_value(attribute))
                elif attribute.name in ("value_ints", "value_int"):
                    array = np.array(helper.get_attribute_value(attribute), dtype=np.int64)
                else:
                    continue
                if array.dtype.kind == "i":
                    found[node.output[0]] = array
    return found


def _output_roles(node: Any) -> Iterator[tuple[str, list[Role]]]:
    """Each output of a recurrent node with its axes: Y [T, D, B, H] and Y_h (Y_c) [D, B, H],
    or with layout=1 [B, T, D, H] and [B, D, H]."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    hidden = int(attributes.get("hidden_size", 0)) or None
    direction = attributes.get("direction", b"forward")
    directions = 2 if direction in (b"bidirectional", "bidirectional") else 1
    if hidden is None:
        return
    batch_major = int(attributes.get("layout", 0)) == 1
    outputs = list(node.output)
    if outputs and outputs[0]:
        yield (
            outputs[0],
            (
                [BATCH, TIME, directions, hidden]
                if batch_major
                else [TIME, directions, BATCH, hidden]
            ),
        )
    for name in outputs[1:]:
        if name:
            yield name, [BATCH, directions, hidden] if batch_major else [directions, BATCH, hidden]


def _reshapes_after(
    node: Any, consumers: dict[str, list[Any]], constants: dict[str, np.ndarray]
) -> Iterator[tuple[Any, list[Role]]]:
    """The Reshapes with a constant target that read an output of `node` through layout-only
    nodes, each with the axes of what it reshapes."""
    queue = list(_output_roles(node))
    while queue:
        name, roles = queue.pop()
        for consumer in consumers.get(name, []):
            if consumer.op_type == "Reshape" and consumer.input[0] == name:
                if len(consumer.input) > 1 and consumer.input[1] in constants:
                    yield consumer, roles
                continue
            if consumer.op_type in LAYOUT_ONLY and consumer.input[0] == name:
                moved = _through(consumer, roles, constants)
                if moved is not None:
                    queue.append((consumer.output[0], moved))


def _through(node: Any, roles: list[Role], constants: dict[str, np.ndarray]) -> list[Role] | None:
    """The axes after a layout-only node; None where they cannot be told."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(roles)
    if node.op_type == "Identity":
        return list(roles)
    if node.op_type == "Transpose":
        perm = [int(p) for p in attributes.get("perm", range(rank - 1, -1, -1))]
        return [roles[p] for p in perm] if sorted(perm) == list(range(rank)) else None
    axes: list[int] | None = None
    if "axes" in attributes:
        axes = [int(a) for a in attributes["axes"]]
    elif len(node.input) > 1 and node.input[1] in constants:
        axes = [int(a) for a in constants[node.input[1]].reshape(-1)]
    if node.op_type == "Squeeze":
        if axes is None:
            return [r for r in roles if r != 1]
        axes = [a % rank for a in axes]
        if any(roles[a] != 1 for a in axes):
            return None
        return [r for k, r in enumerate(roles) if k not in axes]
    if axes is None:
        return None
    grown: list[Role | None] = [None] * (rank + len(axes))
    for a in axes:
        grown[a % len(grown)] = 1
    rest = iter(roles)
    return [next(rest) if r is None else r for r in grown]


def _fixed_target(
    roles: list[Role], target: tuple[int, ...], allowzero: bool
) -> tuple[tuple[int, ...], tuple[tuple[str, int], ...]] | None:
    """`target` with each time and batch axis copied from the input (0), and the sizes it had
    pinned; None when the target does not keep those axes at their own positions."""
    dynamic = [k for k, r in enumerate(roles) if r in (TIME, BATCH)]
    if not dynamic or dynamic[-1] >= len(target) or (allowzero and 0 in target):
        return None
    if sum(v == -1 for v in target) > 1:  # not valid ONNX: left for ONNX Runtime to refuse
        return None
    bounds = [-1, *dynamic]
    for k, start in enumerate(bounds):
        end = bounds[k + 1] if k + 1 < len(bounds) else None
        ours = roles[start + 1 : end]
        theirs = list(target[start + 1 : end if end is not None else len(target)])
        if any(not isinstance(r, int) for r in ours):
            return None
        # A 0 in the target copies the input's axis at its position.
        theirs = [
            int(roles[start + 1 + j]) if v == 0 and start + 1 + j < len(roles) else v
            for j, v in enumerate(theirs)
        ]
        wanted = math.prod(int(r) for r in ours)
        if -1 in theirs:
            known = math.prod(v for v in theirs if v != -1)
            if known <= 0 or wanted % known:
                return None
        elif math.prod(theirs) != wanted:
            return None
    fixed = list(target)
    pins = []
    for k in dynamic:
        if target[k] > 0:
            pins.append(("time" if roles[k] == TIME else "batch", target[k]))
        fixed[k] = 0
    return tuple(fixed), tuple(pins)


def _holds_example(roles: list[Role], target: tuple[int, ...]) -> bool:
    """Whether a target `_fixed_target` refused still fixes sizes the input's time or batch
    axis would change: no -1 and no 0 that could follow them."""
    return any(r in (TIME, BATCH) for r in roles) and -1 not in target and 0 not in target


def _drop_constant(g: Any, name: str) -> None:
    """Remove the constant `name` (an initializer or a Constant node's output) no node reads
    any more, unless the graph outputs it."""
    if name in {o.name for o in g.output}:
        return
    for k, tensor in enumerate(g.initializer):
        if tensor.name == name:
            del g.initializer[k]
            return
    for k, node in enumerate(g.node):
        if node.op_type == "Constant" and list(node.output) == [name]:
            del g.node[k]
            return


def _allowzero(node: Any) -> bool:
    return any(a.name == "allowzero" and a.i == 1 for a in node.attribute)


def _clear_allowzero(node: Any) -> None:
    kept = [a for a in node.attribute if a.name != "allowzero"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _int64_tensor(name: str, values: tuple[int, ...]) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _fresh(g: Any, name: str) -> str:
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate
