"""Protocol messages <-> domain objects: tensors as numpy arrays, sequence flags as a control.

Raw little-endian tensor bytes are wrapped without copying (`np.frombuffer`); typed `contents`
fields are accepted on input too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from service._pb import grpc_service_pb2 as pb
from service.errors import InvalidArgument
from service.repository.signature import WIRE_DTYPES, wire_name_of
from service.serving.request import (
    NO_SEQUENCE,
    InferenceRequest,
    InferenceResult,
    SequenceControl,
)

# Which typed `contents` field carries each wire type.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def sequence_control(parameters: Mapping[str, pb.InferParameter]) -> SequenceControl:
    if not parameters or (
        "sequence_id" not in parameters
        and "sequence_start" not in parameters
        and "sequence_end" not in parameters
        and "sequence_version" not in parameters
    ):
        return NO_SEQUENCE
    sequence_id: int | str | None = None
    if "sequence_id" in parameters:
        param = parameters["sequence_id"]
        which = param.WhichOneof("parameter_choice")
        if which == "int64_param":
            sequence_id = param.int64_param
        elif which == "uint64_param":
            sequence_id = param.uint64_param
        elif which == "string_param":
            sequence_id = param.string_param
        else:
            raise InvalidArgument(
                f"parameter sequence_id must be an integer or a string, got {which or 'nothing'}"
            )
    return SequenceControl(
        sequence_id,
        _flag(parameters, "sequence_start"),
        _flag(parameters, "sequence_end"),
        _version(parameters),
    )


def _version(parameters: Mapping[str, pb.InferParameter]) -> int | None:
    """sequence_version: the version the client expects the sequence to be at, if it says."""
    if "sequence_version" not in parameters:
        return None
    param = parameters["sequence_version"]
    which = param.WhichOneof("parameter_choice")
    if which not in {"int64_param", "uint64_param"} or getattr(param, which) < 0:
        raise InvalidArgument("parameter sequence_version must be a non-negative integer")
    return int(getattr(param, which))


def _flag(parameters: Mapping[str, pb.InferParameter], name: str) -> bool:
    if name not in parameters:
        return False
    param = parameters[name]
    which = param.WhichOneof("parameter_choice")
    if which == "bool_param":
        return param.bool_param
    if which in {"int64_param", "uint64_param"}:
        return bool(getattr(param, which))
    raise InvalidArgument(f"parameter {name} must be a bool, got {which or 'nothing'}")


def decode_request(message: pb.ModelInferRequest) -> InferenceRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send raw bytes for "
            f"every input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        if tensor.name in inputs:
            raise InvalidArgument(f"input {tensor.name} is given twice")
        inputs[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version,
        inputs=inputs,
        outputs=tuple(o.name for o in message.outputs),
        sequence=sequence_control(message.parameters),
        id=message.id,
    )


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    dtype = WIRE_DTYPES.get(tensor.datatype)
    if dtype is None:
        supported = ", ".join(WIRE_DTYPES)
        raise InvalidArgument(
            f"input {tensor.name}: datatype {tensor.datatype!r} is not supported ({supported})"
        )
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {tensor.name}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {tensor.name}: shape {list(shape)} of {tensor.datatype} needs "
                f"{count * dtype.itemsize} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype])
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name}: shape {list(shape)} needs {count} values, got {len(values)} "
            f"in contents.{_CONTENTS_FIELD[tensor.datatype]}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_result(result: InferenceResult, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request_id
    )
    raw: list[bytes] = []
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=wire_name_of(array.dtype), shape=array.shape)
        raw.append(np.ascontiguousarray(array).tobytes())
    response.raw_output_contents.extend(raw)
    for key, value in result.extra.items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        else:
            response.parameters[key].string_param = str(value)
    return response
