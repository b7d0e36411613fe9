"""What the benchmark sends and what a server answers, encoded once, before any clock starts.

The load generator writes these bytes as they are, so a request costs the client no protobuf
work; the transport-only server answers with a response of the same size as rnnserve's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.repository.layout import ModelEntry, scan
from rnnserve.repository.signature import WIRE_DTYPES, wire_name

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UNARY_METHOD = "/inference.GRPCInferenceService/ModelInfer"

STREAM_OK_TAG = 0x12
"""First byte of a ModelStreamInferResponse without error_message (field 2, length-delimited);
one with an error starts with field 1 (0x0A)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    """The protocol's element type, e.g. INT64."""
    dims: tuple[int, ...]
    """Shape without the batch axis; -1 is the time axis."""

    def shape(self, batch: int, steps: int) -> tuple[int, ...]:
        return (batch, *(steps if d < 0 else d for d in self.dims))

    def zeros(self, batch: int, steps: int) -> np.ndarray:
        return np.zeros(self.shape(batch, steps), WIRE_DTYPES[self.datatype])


@dataclass(frozen=True)
class State:
    input_name: str
    output_name: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """One streaming model's interface, read from its config.pbtxt."""

    model: str
    version: int
    model_file: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    states: tuple[State, ...]
    max_batch_size: int = 1

    def request(self, sequence_id: int, steps: int, start: bool, end: bool) -> bytes:
        """One sequence's ModelInferRequest of `steps` zero-valued time steps, serialized."""
        message = pb.ModelInferRequest(model_name=self.model)
        for tensor in self.inputs:
            data = tensor.zeros(1, steps)
            message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=data.shape)
            message.raw_input_contents.append(data.tobytes())
        message.parameters["sequence_id"].int64_param = sequence_id
        message.parameters["sequence_start"].bool_param = start
        message.parameters["sequence_end"].bool_param = end
        return message.SerializeToString()

    def messages(self, sequence_id: int, steps: int) -> SequenceMessages:
        return SequenceMessages(
            start=self.request(sequence_id, steps, start=True, end=False),
            step=self.request(sequence_id, steps, start=False, end=False),
            end=self.request(sequence_id, steps, start=False, end=True),
        )

    def response(self, steps: int) -> pb.ModelInferResponse:
        """The response rnnserve gives one sequence's first request of `steps` steps (zeros
        here), with the `sequence_version` parameter every sequence response carries."""
        message = pb.ModelInferResponse(model_name=self.model, model_version=str(self.version))
        for tensor in self.outputs:
            data = tensor.zeros(1, steps)
            message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=data.shape)
            message.raw_output_contents.append(data.tobytes())
        message.parameters["sequence_version"].int64_param = 1
        return message

    def unary_response(self, steps: int) -> bytes:
        return self.response(steps).SerializeToString()

    def stream_response(self, steps: int) -> bytes:
        """The stream's answer: the response, with `triton_final_response` as rnnserve's (and
        Triton's) stream answers carry it."""
        response = self.response(steps)
        response.parameters["triton_final_response"].bool_param = True
        return pb.ModelStreamInferResponse(infer_response=response).SerializeToString()


@dataclass(frozen=True)
class SequenceMessages:
    """A sequence's three requests: the first (START), every later one, and the last (END)."""

    start: bytes
    step: bytes
    end: bytes


def load_workload(repository: Path, model: str) -> Workload:
    entries = {entry.name: entry for entry in scan(repository)}
    entry = entries.get(model)
    if entry is None:
        known = ", ".join(entries) or "none"
        raise ValueError(f"model {model!r} is not in {repository} (models: {known})")
    return workload_of(entry)


def workload_of(entry: ModelEntry) -> Workload:
    config = entry.config
    if not entry.streamable or not entry.versions:
        raise ValueError(
            f"model {entry.name} has no sequence batching or no version: the benchmark streams "
            f"sequences through the server-held state"
        )
    version = entry.versions[-1]
    return Workload(
        model=entry.name,
        version=version,
        model_file=entry.model_file(version),
        inputs=tuple(Tensor(t.name, wire_name(t.data_type), tuple(t.dims)) for t in config.input),
        outputs=tuple(Tensor(t.name, wire_name(t.data_type), tuple(t.dims)) for t in config.output),
        states=tuple(
            State(s.input_name, s.output_name, tuple(s.dims))
            for s in config.sequence_batching.state
        ),
        max_batch_size=max(config.max_batch_size, 1),
    )
