"""What a model accepts and returns, read from its configuration and checked against its graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.errors import InvalidModelRepository
from rnnserve.runtime.base import Runtime

# Wire names of the protocol ("FP32") and the numpy types they travel as (little-endian).
WIRE_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Keyed by the type string ("<f4"): hashing a str is much cheaper than hashing a dtype.
_WIRE_NAMES = {dtype.str: name for name, dtype in WIRE_DTYPES.items()}


def wire_name_of(dtype: np.dtype[np.generic]) -> str:
    """The protocol's name for a numpy type (FP32 for float32)."""
    return _WIRE_NAMES.get(dtype.str) or dtype.name.upper()


def wire_name(data_type: int) -> str:
    """The protocol's name for a config's data type (TYPE_FP32: FP32, TYPE_STRING: BYTES)."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as the config declares it."""

    name: str
    datatype: str
    """The protocol's name for the element type, e.g. FP32."""
    dims: tuple[int, ...]
    """Shape without the batch axis; -1 is a dynamic axis (the time axis for sequences)."""

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """The numpy type it travels as (little-endian float32 for FP32)."""
        return WIRE_DTYPES[self.datatype]


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state (sequence_batching's `state`): the graph input it is fed through, the
    graph output its next value comes from, and its shape without the batch axis (float32
    [layers*directions, H])."""

    input_name: str
    output_name: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    """What a model takes and returns, and how its sequences are served (`signature_of`).

    `inputs` and `outputs` leave the states out; `streamable`: the config has sequence_batching;
    `idle_timeout_s`, `max_sequences` and `queue_delay_s` (seconds) come from it (60 s, 1024 and
    0 when it does not say).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    max_batch_size: int
    streamable: bool
    idle_timeout_s: float
    max_sequences: int
    queue_delay_s: float


def _tensor(entry: mc.ModelInput | mc.ModelOutput) -> TensorSpec:
    datatype = wire_name(entry.data_type)
    if datatype not in WIRE_DTYPES:
        raise InvalidModelRepository(f"tensor {entry.name}: data type {datatype} is not supported")
    return TensorSpec(entry.name, datatype, tuple(entry.dims))


def signature_of(config: mc.ModelConfig, runtime: Runtime) -> ModelSignature:
    """Read the signature from the config and refuse a config that contradicts the graph."""
    if config.max_batch_size <= 0:
        raise InvalidModelRepository(
            f"model {config.name}: max_batch_size must be > 0 (the first axis is the batch)"
        )
    batching = config.sequence_batching
    streamable = config.HasField("sequence_batching")
    states = tuple(StateSpec(s.input_name, s.output_name, tuple(s.dims)) for s in batching.state)
    if streamable and not states:
        raise InvalidModelRepository(
            f"model {config.name}: sequence_batching lists no state; rnnserve carries the "
            'recurrent state named there (state {{ input_name: "h_in" output_name: "h_out" }})'
        )
    signature = ModelSignature(
        inputs=tuple(_tensor(i) for i in config.input),
        outputs=tuple(_tensor(o) for o in config.output),
        states=states,
        max_batch_size=config.max_batch_size,
        streamable=streamable,
        idle_timeout_s=batching.max_sequence_idle_microseconds / 1e6 or 60.0,
        max_sequences=batching.oldest.max_candidate_sequences or 1024,
        queue_delay_s=batching.oldest.max_queue_delay_microseconds / 1e6,
    )
    _check_against_graph(config.name, signature, runtime)
    return signature


def _check_against_graph(name: str, signature: ModelSignature, runtime: Runtime) -> None:
    graph = {t.name: t for t in [*runtime.inputs, *runtime.outputs]}
    declared = [(t.name, t.dims, t.dtype) for t in [*signature.inputs, *signature.outputs]]
    declared += [
        (n, s.dims, np.dtype(np.float32))
        for s in signature.states
        for n in (s.input_name, s.output_name)
    ]
    for tensor_name, dims, dtype in declared:
        found = graph.get(tensor_name)
        if found is None:
            raise InvalidModelRepository(
                f"model {name}: config names tensor {tensor_name!r}, which the graph does not "
                f"have (graph tensors: {', '.join(sorted(graph))})"
            )
        graph_dims = found.shape[1:]
        fits = len(graph_dims) == len(dims) and all(
            d == -1 or not isinstance(g, int) or g == d
            for g, d in zip(graph_dims, dims, strict=True)
        )
        if not fits or found.dtype != dtype:
            raise InvalidModelRepository(
                f"model {name}: tensor {tensor_name} is {dtype}{list(dims)} in the config but "
                f"{found.dtype}{list(graph_dims)} (after the batch axis) in the graph"
            )
    graph_inputs = {t.name for t in runtime.inputs}
    fed = {t.name for t in signature.inputs} | {s.input_name for s in signature.states}
    if graph_inputs != fed:
        raise InvalidModelRepository(
            f"model {name}: the graph's inputs {sorted(graph_inputs)} are not the config's "
            f"inputs and states {sorted(fed)}"
        )
