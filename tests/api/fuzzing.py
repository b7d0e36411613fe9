"""Hypothesis strategies for inference requests: valid ones for the bundled models, then bent.

A request starts valid (so it reaches past the decoder into the engine) and takes a few
mutations: any client-controlled field replaced with garbage (empty, NUL bytes, non-ASCII,
far longer than any real one), wrong datatypes, shapes and byte counts, huge and negative
dims, typed contents beside raw bytes, unknown and mistyped parameters. Byte-level strategies
cut, flip and splice a request's wire bytes, or give bytes that were never a protobuf.

The seed is fixed (RNNSERVE_FUZZ_SEED, 0 unless set) and printed in pytest's header: a
failure reproduces with the same seed; set another, or RNNSERVE_FUZZ_SCALE=10 for ten times
the examples, to search further.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import hypothesis
import numpy as np
from hypothesis import strategies as st

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.repository.signature import WIRE_DTYPES
from tests.api.conftest import INPUTS, MODELS, OUTPUTS
from tests.conftest import FUZZ_SEED

seeded = hypothesis.seed(FUZZ_SEED)
"""Decorator giving a fuzz test the suite's seed."""
SCALE = int(os.environ.get("RNNSERVE_FUZZ_SCALE", "1"))
"""Examples per test, as a multiple of `make test`'s (set it higher to search longer)."""


def examples(count: int) -> int:
    """`count` examples, times RNNSERVE_FUZZ_SCALE."""
    return count * SCALE


DATATYPES = (*WIRE_DTYPES, "BYTES")
STATES = {"charlm_lstm": (2, 256), "sensor_gru": (2, 64), "digits_lstm": (1, 64)}
FEATURES = {"charlm_lstm": (), "sensor_gru": (1,), "digits_lstm": (8,)}
PARAMETER_KEYS = (
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "sequence_version",
    "priority",
    "timeout",
    "binary_data_output",
    "triton_final_response",
)
CONTENTS_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=16),
}


def garbage_text(longest: int) -> st.SearchStrategy[str]:
    """Strings from empty to `longest` characters: NULs, non-ASCII, format strings, digits
    that int() refuses, and runs far longer than any real name or id."""
    runs = sorted({n for n in (300, 5_000, 70_000, 400_000, 3_000_000) if n < longest} | {longest})
    return st.one_of(
        st.sampled_from(["", "\x00", "é", "\U0001f600", " 1", "²", "-1", "%s%n{}", "1" * 5000]),
        st.text(max_size=24),
        st.builds(  # each run distinct, as a cache keyed by it would meet them
            lambda char, n, tag: char * n + str(tag),
            st.sampled_from(["x", "\x00", "é", "€", "\U0001f600", "9"]),
            st.sampled_from(runs),
            st.integers(0, 2**32),
        ),
    )


dims = st.one_of(
    st.integers(0, 5),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([-1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]),
)
shapes = st.one_of(
    st.lists(dims, max_size=8),
    st.integers(60, 100).map(lambda n: [1] * n),  # more axes than numpy allows (64)
)


@st.composite
def parameters(draw: st.DrawFn, longest: int) -> pb.InferParameter:
    """One InferParameter of any kind, or none set at all."""
    parameter = pb.InferParameter()
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double", "none"]))
    if kind == "bool":
        parameter.bool_param = draw(st.booleans())
    elif kind == "int64":
        parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "uint64":
        parameter.uint64_param = draw(st.integers(0, 2**64 - 1))
    elif kind == "string":
        parameter.string_param = draw(garbage_text(longest))
    elif kind == "double":
        parameter.double_param = draw(st.floats())
    return parameter


def valid_request(
    model: str, x: np.ndarray, sequence_id: int | str | None, start: bool, end: bool, rid: str
) -> pb.ModelInferRequest:
    """A request the server answers (for a live or starting sequence), raw bytes."""
    message = pb.ModelInferRequest(model_name=model, id=rid)
    datatype = "INT64" if x.dtype == np.int64 else "FP32"
    message.inputs.add(name=INPUTS[model], datatype=datatype, shape=x.shape)
    message.raw_input_contents.append(x.tobytes())
    if sequence_id is not None:
        set_sequence(message, sequence_id, start, end)
    return message


def set_sequence(
    message: pb.ModelInferRequest, sequence_id: int | str, start: bool, end: bool
) -> None:
    """Triton's sequence parameters on `message` (a string id as string_param)."""
    if isinstance(sequence_id, str):
        message.parameters["sequence_id"].string_param = sequence_id
    else:
        message.parameters["sequence_id"].int64_param = sequence_id
    message.parameters["sequence_start"].bool_param = start
    message.parameters["sequence_end"].bool_param = end


@st.composite
def inputs_for(draw: st.DrawFn, model: str, steps: int) -> np.ndarray:
    """Valid data for `model`: `steps` time steps, batch 1."""
    if model == "charlm_lstm":
        values = draw(st.lists(st.integers(0, 96), min_size=steps, max_size=steps))
        return np.asarray(values, np.int64).reshape(1, steps)
    width = FEATURES[model][0]
    values = draw(st.lists(st.integers(0, 16), min_size=steps * width, max_size=steps * width))
    return np.asarray(values, np.float32).reshape(1, steps, width)


Mutation = Callable[[st.DrawFn, pb.ModelInferRequest, int], None]


def _model_name(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    m.model_name = draw(st.one_of(garbage_text(longest), st.sampled_from(MODELS)))


def _model_version(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    m.model_version = draw(
        st.one_of(garbage_text(longest), st.integers(-1, 2**70).map(str), st.just("1"))
    )


def _request_id(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    m.id = draw(garbage_text(longest))


def _tensor_name(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    if m.inputs:
        names = st.sampled_from([*INPUTS.values(), "h_in", "c_in", *OUTPUTS.values()])
        m.inputs[0].name = draw(st.one_of(garbage_text(longest), names))


def _datatype(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    if m.inputs:
        m.inputs[0].datatype = draw(st.one_of(st.sampled_from(DATATYPES), garbage_text(longest)))


def _shape(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    if m.inputs:
        del m.inputs[0].shape[:]
        m.inputs[0].shape.extend(draw(shapes))


def _raw_bytes(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    """Other raw bytes: a wrong count, none, or more raw contents than inputs."""
    choice = draw(st.sampled_from(["other", "drop", "extra"]))
    if choice == "drop":
        del m.raw_input_contents[:]
    elif choice == "extra":
        m.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif m.raw_input_contents:
        m.raw_input_contents[0] = draw(st.binary(max_size=64))


def _typed_contents(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    """Typed contents in any field, beside the raw bytes or in their place."""
    if not m.inputs:
        return
    field = draw(st.sampled_from(sorted(CONTENTS_FIELDS)))
    values = draw(st.lists(CONTENTS_FIELDS[field], max_size=24))
    getattr(m.inputs[0].contents, field).extend(values)
    if draw(st.booleans()):
        del m.raw_input_contents[:]


def _extra_input(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    """Another input: the same name again, a state tensor of any shape, or garbage."""
    name = draw(st.one_of(st.sampled_from(["h_in", "c_in", *INPUTS.values()]), garbage_text(64)))
    tensor = m.inputs.add(name=name, datatype=draw(st.sampled_from(DATATYPES)))
    tensor.shape.extend(draw(st.one_of(shapes, st.sampled_from([[1, 2, 256], [1, 2, 64]]))))
    if m.raw_input_contents:
        count = math.prod(max(d, 0) for d in tensor.shape)
        m.raw_input_contents.append(b"\x00" * min(count * 4, 1 << 16))


def _parameter(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    """A parameter, known or not, of any type: sequence_id as a bool, a double, a huge string."""
    key = draw(st.one_of(st.sampled_from(PARAMETER_KEYS), garbage_text(longest)))
    m.parameters[key].CopyFrom(draw(parameters(longest)))


def _requested_output(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    names = st.sampled_from([*OUTPUTS.values(), "h_out", "c_out", *INPUTS.values()])
    output = m.outputs.add(name=draw(st.one_of(names, garbage_text(longest))))
    if draw(st.booleans()):
        key = draw(st.one_of(st.just("binary_data"), garbage_text(64)))
        output.parameters[key].CopyFrom(draw(parameters(64)))


def _tensor_parameter(draw: st.DrawFn, m: pb.ModelInferRequest, longest: int) -> None:
    if m.inputs:
        key = draw(st.one_of(st.just("shared_memory_region"), garbage_text(64)))
        m.inputs[0].parameters[key].CopyFrom(draw(parameters(longest)))


MUTATIONS: tuple[Mutation, ...] = (
    _model_name,
    _model_version,
    _request_id,
    _tensor_name,
    _datatype,
    _shape,
    _raw_bytes,
    _typed_contents,
    _extra_input,
    _parameter,
    _requested_output,
    _tensor_parameter,
)


@st.composite
def bent_requests(draw: st.DrawFn, longest: int = 400_000) -> pb.ModelInferRequest:
    """A valid request for a bundled model with 0 to 3 mutations; sequence ids 1..3 or
    strings, so sequences start, continue and end among the fuzzed requests."""
    model = draw(st.sampled_from(MODELS))
    x = draw(inputs_for(model, draw(st.integers(1, 4))))
    sequence_id = draw(st.sampled_from([None, 0, 1, 2, 3, "", "fuzz-é"]))
    message = valid_request(
        model, x, sequence_id, draw(st.booleans()), draw(st.booleans()), draw(st.text(max_size=8))
    )
    if draw(st.booleans()):  # the same data in typed contents
        tensor = message.inputs[0]
        field = "int64_contents" if x.dtype == np.int64 else "fp32_contents"
        getattr(tensor.contents, field).extend(x.ravel().tolist())
        del message.raw_input_contents[:]
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        mutate(draw, message, longest)
    return message


@st.composite
def bent_bytes(draw: st.DrawFn) -> bytes:
    """Wire bytes that may not be a ModelInferRequest: a request cut, flipped, spliced or
    followed by garbage, or bytes that never were one."""
    data = draw(bent_requests(longest=5_000)).SerializeToString()
    how = draw(st.sampled_from(["random", "cut", "flip", "insert", "append", "splice"]))
    if how == "random":
        return draw(st.binary(max_size=256))
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    if not data:
        return draw(st.binary(max_size=256))
    at = draw(st.integers(0, len(data) - 1))
    if how == "cut":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    other = draw(bent_requests(longest=5_000)).SerializeToString()
    return data[:at] + other[draw(st.integers(0, len(other))) :]


PADDED_FIELDS = ("id", "model_name", "model_version", "parameter", "output", "input")


@st.composite
def at_the_limit(draw: st.DrawFn, limit: int) -> pb.ModelInferRequest:
    """A bent request padded in one field to just under `limit` bytes: an answer that echoes
    the request, plus an error message, would be over it."""
    message = draw(bent_requests(longest=64))
    field = draw(st.sampled_from(PADDED_FIELDS))
    target = limit - draw(st.integers(0, 64))

    def pad(n: int) -> None:
        text = "x" * max(n, 0)
        if field in ("id", "model_name", "model_version"):
            setattr(message, field, text)
        elif field == "parameter":
            message.parameters["padding"].string_param = text
        elif field == "output":
            del message.outputs[:]
            message.outputs.add(name=text)
        elif message.inputs:
            message.inputs[0].name = text

    pad(0)
    base = message.ByteSize()
    pad(target - base - 4)  # the field's length prefix grows by up to 3 bytes
    pad(target - base - 4 + target - message.ByteSize())
    return message
