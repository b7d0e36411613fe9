"""What every published graph goes through, whoever made it.

A graph's interface (its inputs, outputs and state pairs, batch-first), the check of its declared
shapes, the parity check (against a reference, and steps fed one at a time against all at once),
its config.pbtxt, and the write into a model repository. The bundled models (`export.py`), any
PyTorch module (`module_export.py`) and third-party ONNX files (`onnx_import.py`) all come through
here. No torch: `rnnserve import` runs on an ONNX file alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from rnnserve._pb import model_config_pb2 as mc

BATCH, TIME = "batch", "time"
OPSET = 17
PARITY_TOLERANCE = 1e-5
PARITY_CASES = ((1, 1), (1, 50), (7, 1), (7, 50))
"""(batch, steps) pairs checked at every export and import."""

CONFIG_FILE = "config.pbtxt"
CARD_FILE = "model_card.json"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_IDLE_SECONDS = 300.0
DEFAULT_MAX_SEQUENCES = 4096
DEFAULT_QUEUE_DELAY_US = 0

CONFIG_TYPES = {
    "float32": mc.TYPE_FP32,
    "float64": mc.TYPE_FP64,
    "float16": mc.TYPE_FP16,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "bool": mc.TYPE_BOOL,
}
"""numpy's name of each element type a graph may take or return, and its config type."""


class ExportError(Exception):
    """An export or import that must not be accepted; the message says why and what to do."""


@dataclass(frozen=True)
class Tensor:
    """A data input or output: its full graph shape, batch first (BATCH, TIME: dynamic axes)."""

    name: str
    dtype: str
    """numpy's name of the element type ("float32", "int64")."""
    shape: tuple[int | str, ...]

    @property
    def has_time(self) -> bool:
        return len(self.shape) > 1 and self.shape[1] == TIME

    @property
    def config_dims(self) -> list[int]:
        return [-1 if isinstance(d, str) else d for d in self.shape[1:]]


@dataclass(frozen=True)
class StatePair:
    """A recurrent state: fed through `input_name`, its next value read from `output_name`;
    float32, `shape` without the batch axis."""

    input_name: str
    output_name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Interface:
    """What a streamable graph takes and returns; whole-sequence graphs have no states."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    states: tuple[StatePair, ...] = ()

    @property
    def output_names(self) -> list[str]:
        """Every graph output in the order parity compares them: data, then states."""
        return [o.name for o in self.outputs] + [s.output_name for s in self.states]

    def expected_shapes(self) -> dict[str, list[int | str]]:
        shapes = {t.name: list(t.shape) for t in [*self.inputs, *self.outputs]}
        for state in self.states:
            for name in (state.input_name, state.output_name):
                shapes[name] = [BATCH, *state.shape]
        return shapes


@dataclass(frozen=True)
class ParityReport:
    """Largest differences found; the check is on the scaled ones.

    A difference is scaled by max(1, the tensor's largest magnitude): tensors of unit scale
    (outputs after a softmax, h) are held to an absolute 1e-5, while tensors that grow (an LSTM's
    cell state c, logits) are held to 1e-5 of their size, since float32 cannot do better there.
    `reference` names what the graph was compared with: "torch" (the module it was exported
    from) or "original" (the graph as it was before an import rewrote it).
    """

    reference: str
    max_abs_diff_vs_reference: float
    max_abs_diff_steps_vs_whole: float
    max_scaled_diff_vs_reference: float
    max_scaled_diff_steps_vs_whole: float
    cases: tuple[tuple[int, int], ...]
    tolerance: float

    def as_card(self) -> dict[str, Any]:
        vs = f"vs_{self.reference}"
        return {
            f"max_abs_diff_{vs}": self.max_abs_diff_vs_reference,
            "max_abs_diff_steps_vs_whole": self.max_abs_diff_steps_vs_whole,
            f"max_scaled_diff_{vs}": self.max_scaled_diff_vs_reference,
            "max_scaled_diff_steps_vs_whole": self.max_scaled_diff_steps_vs_whole,
            "cases": [list(c) for c in self.cases],
            "tolerance": self.tolerance,
        }


Feeds = dict[str, np.ndarray]
Reference = Callable[[Feeds], Sequence[np.ndarray]]
"""The outputs the graph must give for the feeds, in `Interface.output_names` order."""
MakeInput = Callable[[Tensor, int, int, np.random.Generator], np.ndarray]
"""A random value for an input of (batch, steps)."""


def declared_shapes(onnx_path: Path) -> dict[str, list[int | str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
        if value.name not in initializers
    }


def declare(value: Any, dims: Sequence[int | str]) -> None:
    """Set the declared shape of a graph input or output (an onnx.ValueInfoProto): ints are
    fixed sizes, strings named dynamic axes."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def check_shapes(onnx_path: Path, interface: Interface) -> None:
    expected = interface.expected_shapes()
    declared = declared_shapes(onnx_path)
    if declared != expected:
        raise ExportError(
            f"{onnx_path}: declared graph shapes {declared} differ from the expected {expected}"
        )


def checking_session(graph_file: Path | bytes) -> Any:
    """An ONNX Runtime CPU session over a graph file (or a serialized model) for the checks:
    silent, as whatever fails is reported in the check's own error, once."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: not the warnings and errors the check reports
    return ort.InferenceSession(
        graph_file if isinstance(graph_file, bytes) else str(graph_file),
        options,
        providers=["CPUExecutionProvider"],
    )


def check_parity(
    onnx_path: Path,
    interface: Interface,
    make_input: MakeInput,
    reference: Reference,
    reference_name: str,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
    cases: Sequence[tuple[int, int]] = PARITY_CASES,
    shown: str | None = None,
) -> ParityReport:
    """The graph in ONNX Runtime against `reference` on random inputs and states, and the steps
    fed one at a time (carrying the state) against one call over all of them, for each (batch,
    steps) of `cases`. ExportError, naming the graph as `shown` (default: its path), when it
    does not load, fails on a case, or differs by more than `tolerance` (scaled)."""
    shown = shown or str(onnx_path)
    try:
        session = checking_session(onnx_path)
    except Exception as error:  # ONNX Runtime's errors derive from Exception only
        raise ExportError(f"{shown}: ONNX Runtime cannot load the graph: {error}") from error
    rng = np.random.default_rng(seed)
    vs_reference = (0.0, 0.0)
    steps_vs_whole = (0.0, 0.0)
    names = interface.output_names
    for batch, steps in cases:
        feeds = {t.name: make_input(t, batch, steps, rng) for t in interface.inputs}
        for state in interface.states:
            feeds[state.input_name] = rng.uniform(-1, 1, (batch, *state.shape)).astype(np.float32)
        try:
            ours = session.run(names, feeds)
            theirs = reference(feeds)
            stepped = (
                _stepped(session, interface, feeds, steps) if interface.states and steps > 1 else []
            )
        except Exception as error:
            said = " ".join(str(error).split())  # ONNX Runtime's end in a newline
            raise ExportError(
                f"{shown}: the graph or its {reference_name} reference failed on random "
                f"inputs of batch {batch} and {steps} steps (a graph served per sequence must "
                f"run any batch and length): {type(error).__name__}: {said}"
            ) from error
        vs_reference = _worst(
            vs_reference, *(_diff(a, b) for a, b in zip(ours, theirs, strict=True))
        )
        if interface.states and steps > 1:
            steps_vs_whole = _worst(
                steps_vs_whole, *(_diff(a, b) for a, b in zip(stepped, ours, strict=True))
            )
    if vs_reference[1] > tolerance or steps_vs_whole[1] > tolerance:
        raise ExportError(
            f"{shown}: parity check failed (scaled max |onnx - {reference_name}| = "
            f"{vs_reference[1]:.3g}, scaled max |step-by-step - whole| = "
            f"{steps_vs_whole[1]:.3g}, tolerance {tolerance:g})"
        )
    return ParityReport(
        reference_name,
        vs_reference[0],
        steps_vs_whole[0],
        vs_reference[1],
        steps_vs_whole[1],
        tuple(cases),
        tolerance,
    )


def _stepped(session: Any, interface: Interface, feeds: Feeds, steps: int) -> list[np.ndarray]:
    """Every output with the steps fed one at a time: time-axis outputs joined along time, the
    others (and the states) as the last step left them."""
    state = {s.input_name: feeds[s.input_name] for s in interface.states}
    per_step: list[list[np.ndarray]] = []
    for t in range(steps):
        step_feeds = {
            i.name: feeds[i.name][:, t : t + 1] if i.has_time else feeds[i.name]
            for i in interface.inputs
        }
        results = session.run(interface.output_names, {**step_feeds, **state})
        data, new_state = results[: len(interface.outputs)], results[len(interface.outputs) :]
        state = {s.input_name: v for s, v in zip(interface.states, new_state, strict=True)}
        per_step.append(data)
    joined = [
        np.concatenate([step[k] for step in per_step], axis=1)
        if output.has_time
        else per_step[-1][k]
        for k, output in enumerate(interface.outputs)
    ]
    return [*joined, *(state[s.input_name] for s in interface.states)]


def _diff(a: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, the same scaled by max(1, max |reference|))."""
    if a.shape != reference.shape:
        raise ExportError(f"output shapes differ: {a.shape} vs {reference.shape}")
    diff = float(np.max(np.abs(a.astype(np.float64) - reference), initial=0.0))
    return diff, diff / max(1.0, float(np.max(np.abs(reference), initial=0.0)))


def _worst(*diffs: tuple[float, float]) -> tuple[float, float]:
    return max(d[0] for d in diffs), max(d[1] for d in diffs)


def model_config(
    name: str,
    interface: Interface,
    parameters: dict[str, str],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> mc.ModelConfig:
    """The model's configuration; the batch axis is implicit (max_batch_size > 0), and a graph
    with states gets sequence batching with one `state` entry per state pair."""
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    for tensor in interface.inputs:
        config.input.add(
            name=tensor.name, data_type=CONFIG_TYPES[tensor.dtype], dims=tensor.config_dims
        )
    for tensor in interface.outputs:
        config.output.add(
            name=tensor.name, data_type=CONFIG_TYPES[tensor.dtype], dims=tensor.config_dims
        )
    if interface.states:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = int(idle_seconds * 1_000_000)
        batching.oldest.max_candidate_sequences = DEFAULT_MAX_SEQUENCES
        batching.oldest.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
        # Triton's implicit state: the server owns h (and c), clients never send them.
        for pair in interface.states:
            state = batching.state.add(
                input_name=pair.input_name,
                output_name=pair.output_name,
                data_type=mc.TYPE_FP32,
                dims=list(pair.shape),
            )
            state.initial_state.add(
                data_type=mc.TYPE_FP32, dims=list(pair.shape), zero_data=True, name="zero"
            )
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def render_config(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


@dataclass(frozen=True)
class Published:
    config_path: Path
    onnx_path: Path
    card_path: Path
    parity: ParityReport
    exporter: str | None = None
    """The torch.onnx exporter whose graph was published (None: an imported graph)."""
    repairs: tuple[str, ...] = ()
    """What was rewritten in the exporter's graph so that it runs any length and batch."""


def staging_path(repository: Path, name: str, version: int) -> Path:
    """Where a new graph is written first, beside its final place."""
    return repository / name / str(version) / (MODEL_FILE + ".partial")


@contextmanager
def staged(repository: Path, name: str, version: int) -> Iterator[Path]:
    """The staging path of a new graph (`staging_path`), its folder made; when the block
    raises, the staging file goes, and so does every folder made here that is still empty
    (the repository's, the model's, the version's): a refused export or import leaves
    nothing behind."""
    staging = staging_path(repository, name, version)
    made = [p for p in (repository, repository / name, staging.parent) if not p.exists()]
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # something else is there now: it is not ours to remove
                break
        raise


def publish_staged(
    staging: Path,
    interface: Interface,
    parity: Callable[[Path], ParityReport],
    name: str,
    parameters: dict[str, str],
    card: dict[str, Any],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> Published:
    """Check the graph at `staging` (declared shapes, then `parity`) and only then move it into
    place and write its config and card (`card["export"]["parity"]` filled in here).

    Nothing is written over a good model unless the new graph passed its checks.
    """
    try:
        check_shapes(staging, interface)
        report = parity(staging)
    except Exception:
        staging.unlink(missing_ok=True)
        raise
    onnx_path = staging.with_name(MODEL_FILE)
    staging.replace(onnx_path)
    model_dir = onnx_path.parent.parent
    config_path = model_dir / CONFIG_FILE
    config = model_config(name, interface, parameters, max_batch_size, idle_seconds)
    config_path.write_text(render_config(config))
    card_path = model_dir / CARD_FILE
    full_card = {**card, "export": {**card.get("export", {}), "parity": report.as_card()}}
    card_path.write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
    return Published(config_path, onnx_path, card_path, report)
