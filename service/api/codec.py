"""Protocol messages <-> domain objects: tensors as numpy arrays, sequence flags as a control.

Raw little-endian tensor bytes are wrapped without copying (`np.frombuffer`); typed `contents`
fields are accepted on input too.

Both directions skip protobuf's objects where they can, as reading or building them field by
field costs microseconds per field. Requests: requests of one shape differ only in their tensor
bytes, their id and their sequence parameters, so `RequestDecoder` splits a request's bytes
into those and the rest, decodes the rest once, and reuses it for every request that has the
same rest; the sequence parameters, a few bytes, are read on their own (and remembered too, as
a sequence repeats them). Responses are written straight to protobuf's wire format from parts
cached per model and output shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.errors import InvalidArgument
from rnnserve.repository.signature import WIRE_DTYPES, wire_name_of
from rnnserve.serving.request import (
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
# The numpy type each typed `contents` field holds (protobuf keeps its values in range).
_FIELD_DTYPES: dict[str, np.dtype[np.generic]] = {
    "bool_contents": np.dtype("?"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
MAX_REQUEST_ID_CHARS = 1024
"""The longest request id. Every answer echoes it, an error too: with ids as long as a message,
the answer to a refused one could not be sent, and that would end the whole stream."""
MAX_SEQUENCE_ID_CHARS = 1024
"""The longest string sequence id: the server keeps each live one, so ids as long as a whole
message would let a few thousand sequences hold gigabytes."""
MAX_DIMS = 32
"""The most axes an input may have: numpy's limit before 2.0 (the models take 2 or 3)."""
_MAX_ARRAY_BYTES = 2**63 - 1
_SEQUENCE_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "sequence_version"}
)


def sequence_control(parameters: Mapping[str, pb.InferParameter]) -> SequenceControl:
    """The sequence control a request's `parameters` carry; NO_SEQUENCE when they name none.

    sequence_id (int64, uint64 or string), sequence_start and sequence_end (bool or integer) are
    Triton's sequence extension; sequence_version (a non-negative integer) is rnnserve's own.
    Raises InvalidArgument for a parameter of another type.
    """
    if not parameters or _SEQUENCE_PARAMETERS.isdisjoint(parameters):
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
            if len(sequence_id) > MAX_SEQUENCE_ID_CHARS:
                raise InvalidArgument(
                    f"parameter sequence_id is {len(sequence_id)} characters long; a string id "
                    f"takes at most {MAX_SEQUENCE_ID_CHARS} (a 64-bit integer id also works)"
                )
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
    """The InferenceRequest a parsed ModelInferRequest carries, each input an array of its shape.

    Raises InvalidArgument: raw_input_contents not one per input, an input given twice, or a
    tensor its data does not fit (`decode_tensor`).
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send raw bytes for "
            f"every input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidArgument(f"input {name} is given twice")
        inputs[name] = decode_tensor(tensor, raw[index] if raw else None)
    if len(message.id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"the request id is {len(message.id)} characters long; at most "
            f"{MAX_REQUEST_ID_CHARS} are accepted"
        )
    requested = message.outputs
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version,
        inputs=inputs,
        outputs=tuple(o.name for o in requested) if requested else (),
        sequence=sequence_control(message.parameters),
        id=message.id,
    )


@dataclass(frozen=True, slots=True)
class _Template:
    """What requests with the same bytes, tensor data, id and sequence parameters aside,
    decode to."""

    model: str
    version: str
    inputs: tuple[tuple[str, np.dtype[np.generic], tuple[int, ...], int, int], ...]
    """(name, dtype, shape, element count, byte count) of each raw input, in order."""
    outputs: tuple[str, ...]


_RAW_INPUT_CONTENTS = 7
_ID = 3
_PARAMETERS = 4
_SEQUENCE_ENTRY_KEYS = tuple(
    b"\n" + bytes((len(name),)) + name.encode() for name in sorted(_SEQUENCE_PARAMETERS)
)
"""How a `parameters` map entry whose key is a sequence parameter begins: its key field."""
_SEQUENCE_PREFIX = b"sequence_"
MAX_TEMPLATES = 4096
"""Distinct request shapes remembered (a model's requests take a handful of shapes)."""
MAX_TEMPLATE_BYTES = 4096
"""The longest request (tensor data and id aside) whose shape is remembered: a real one takes
a few hundred bytes; a longer one decodes in full each time, so that MAX_TEMPLATES of them
hold at most 16 MiB, not MAX_TEMPLATES messages of up to --max-message-bytes."""


class RequestDecoder:
    """ModelInferRequest bytes -> InferenceRequest, decoding each distinct request shape once."""

    def __init__(self) -> None:
        self._templates: dict[bytes, _Template] = {}

    def decode(self, data: bytes, principal: str = "", received: float = 0.0) -> InferenceRequest:
        """The InferenceRequest that ModelInferRequest wire bytes carry, from `principal`,
        received at `received` (see `InferenceRequest`); raw tensors are views of `data`, not
        copies.

        A request that differs from one decoded before only in its tensor bytes and id reuses
        that decode; any other goes through protobuf. Raises InvalidArgument.
        """
        split = _split(data)
        if split is None:
            return self._decode(data, None, principal, received)
        key, request_id, raws, sequence_entries = split
        template = self._templates.get(key)
        if template is None or len(raws) != len(template.inputs):
            return self._decode(data, key, principal, received)
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            return self._decode(data, None, principal, received)  # the full decode refuses it
        try:
            sequence = _sequence_of(b"".join(sequence_entries)) if sequence_entries else None
        except DecodeError:  # the full decode says what is wrong
            return self._decode(data, None, principal, received)
        inputs: dict[str, np.ndarray] = {}
        for (name, dtype, shape, count, size), (offset, length) in zip(
            template.inputs, raws, strict=True
        ):
            if length != size:  # the full decode says what is wrong
                return self._decode(data, None, principal, received)
            inputs[name] = np.frombuffer(data, dtype, count, offset).reshape(shape)
        return InferenceRequest(
            template.model,
            inputs,
            template.version,
            template.outputs,
            sequence or NO_SEQUENCE,
            request_id,
            principal,
            received,
        )

    def _decode(
        self, data: bytes, key: bytes | None, principal: str, received: float
    ) -> InferenceRequest:
        """The whole decode, through protobuf; remembered under `key` when one is given."""
        message = parse_request(data)
        request = decode_request(message)
        if principal or received:
            request = request._replace(principal=principal, received=received)
        raw = message.raw_input_contents
        if key is not None and len(key) <= MAX_TEMPLATE_BYTES and raw and all(map(len, raw)):
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = _Template(
                request.model,
                request.version,
                tuple(
                    (t.name, a.dtype, a.shape, a.size, a.nbytes)
                    for t, a in zip(message.inputs, request.inputs.values(), strict=True)
                ),
                request.outputs,
            )
        return request


def parse_request(data: bytes) -> pb.ModelInferRequest:
    """`data` parsed as a ModelInferRequest; InvalidArgument when it is not one."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as error:
        raise InvalidArgument(f"the request is not a valid ModelInferRequest: {error}") from None


@functools.lru_cache(maxsize=4096)
def _sequence_of(entries: bytes) -> SequenceControl:
    """The sequence control that `parameters` map entries (field 4 of a ModelInferRequest, each
    whole) carry: the requests of a sequence repeat them, so each is read once. Raises
    DecodeError for bytes protobuf refuses, InvalidArgument as `sequence_control` does."""
    return sequence_control(pb.ModelInferRequest.FromString(entries).parameters)


def _split(data: bytes) -> tuple[bytes, str, list[tuple[int, int]], list[bytes]] | None:
    """A request's bytes without its tensor data, id and sequence parameters; the id; (offset,
    length) of each raw input; the sequence parameters' map entries, whole. None when the
    request is not plain enough to split (it then decodes in full)."""
    kept: list[bytes] = []
    raws: list[tuple[int, int]] = []
    sequence_entries: list[bytes] = []
    request_id = ""
    position, size = 0, len(data)
    try:
        while position < size:
            start, tag = position, data[position]
            if tag & 7 != _LENGTH_DELIMITED or tag >= 0x80:
                return None  # every field of ModelInferRequest is length-delimited, below 16
            length, position = _read_varint(data, position + 1)
            end = position + length
            if end > size:
                return None
            field = tag >> 3
            if field == _RAW_INPUT_CONTENTS:
                raws.append((position, length))
            elif field == _ID:
                request_id = data[position:end].decode()
            elif field == _PARAMETERS and data.startswith(_SEQUENCE_ENTRY_KEYS, position):
                sequence_entries.append(data[start:end])
            elif field == _PARAMETERS and _SEQUENCE_PREFIX in data[position:end]:
                return None  # an entry whose key protobuf may read as a sequence parameter
            else:
                kept.append(data[start:end])
            position = end
    except (IndexError, UnicodeDecodeError):
        return None
    if not raws:
        return None  # typed contents: the tensor data is in what would be the key
    return b"".join(kept), request_id, raws, sequence_entries


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at `position`, and the position after it."""
    value = data[position]
    if value < 0x80:
        return value, position + 1
    result, shift = 0, 0
    while True:
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One input as an array of its shape: a view of `raw` (little-endian bytes) when given,
    else read from its typed `contents`.

    Raises InvalidArgument for a datatype with no numpy type (BYTES), a shape with a negative
    dimension or too many axes, data whose size does not fit the shape, typed contents beside
    raw bytes (as Triton does), or typed values outside the datatype's range.
    """
    dtype = WIRE_DTYPES.get(tensor.datatype)
    if dtype is None:
        supported = ", ".join(WIRE_DTYPES)
        raise InvalidArgument(
            f"input {tensor.name}: datatype {tensor.datatype!r} is not supported ({supported})"
        )
    shape = _shape_of(tensor, dtype)
    count = math.prod(shape)
    if raw is None:
        return _typed_contents(tensor, dtype, shape, count)
    if tensor.contents.ByteSize():
        raise InvalidArgument(
            f"input {tensor.name}: send its data in raw_input_contents or in typed contents, "
            f"not both"
        )
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"input {tensor.name}: shape {list(shape)} of {tensor.datatype} needs "
            f"{count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _shape_of(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype[np.generic]
) -> tuple[int, ...]:
    """The tensor's shape, if numpy can make an array of it; InvalidArgument otherwise."""
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {tensor.name}: shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"input {tensor.name}: shape has {len(shape)} axes, more than the {MAX_DIMS} supported"
        )
    # numpy refuses a shape whose non-zero axes multiply past its index type, even when another
    # axis is 0 and the tensor is empty.
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise InvalidArgument(
            f"input {tensor.name}: shape {list(shape)} of {tensor.datatype} is too large for any "
            f"tensor"
        )
    return shape


def _typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    count: int,
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:  # FP16 has no typed contents field in the protocol
        raise InvalidArgument(
            f"input {tensor.name}: {tensor.datatype} travels as raw bytes only "
            f"(raw_input_contents), not in typed contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name}: shape {list(shape)} needs {count} values, got {len(values)} "
            f"in contents.{field}"
        )
    array = np.asarray(values, dtype=_FIELD_DTYPES[field])
    if array.dtype != dtype and array.size:  # INT8, INT16, UINT8, UINT16 travel wider
        limits = np.iinfo(dtype.str)
        low, high = array.min(), array.max()
        if low < limits.min or high > limits.max:
            raise InvalidArgument(
                f"input {tensor.name}: {tensor.datatype} takes values {limits.min}..{limits.max}, "
                f"got {low if low < limits.min else high} in contents.{field}"
            )
    return array.astype(dtype, copy=False).reshape(shape)


def encode_response(result: InferenceResult, request_id: str) -> bytes:
    """A ModelInferResponse, as wire bytes."""
    return b"".join(_response_parts(result, request_id))


def encode_stream_response(result: InferenceResult, request_id: str) -> bytes:
    """A ModelStreamInferResponse carrying `result`, as wire bytes.

    Like Triton's, it carries the parameter `triton_final_response: true`: each request has
    exactly one answer, and clients written for Triton's decoupled streams read it as such.
    """
    parts = _response_parts(result, request_id)
    parts.append(_FINAL_RESPONSE)
    size = sum(map(len, parts))
    # Field 2 (infer_response) around the parts, joined once: the tensor bytes are copied once.
    return b"".join((_KEYS[2], _varint(size), *parts))


def _response_parts(result: InferenceResult, request_id: str) -> list[bytes]:
    parts = [_response_head(result.model, result.version)]
    if request_id:
        parts.append(_field(3, request_id.encode()))
    if result.sequence_version is not None:
        parts.append(_parameter_entry("sequence_version", result.sequence_version))
    outputs = result.outputs
    for name, array in outputs.items():
        parts.append(_output_head(name, array.dtype.str, array.shape))
    for array in outputs.values():
        parts.append(_field(6, array.tobytes()))
    return parts


def encode_stream_error(model: str, version: str, request_id: str, text: str) -> bytes:
    """A ModelStreamInferResponse answering a request with an error, as wire bytes.

    Model, version and id are echoed when they are at most MAX_REQUEST_ID_CHARS long (no
    served model has a longer name, and a longer id was refused): the answer to a request as
    large as a message then still fits in one.
    """
    echo = pb.ModelInferResponse(
        model_name=_echoed(model), model_version=_echoed(version), id=_echoed(request_id)
    )
    return pb.ModelStreamInferResponse(error_message=text, infer_response=echo).SerializeToString()


def _echoed(text: str) -> str:
    return text if len(text) <= MAX_REQUEST_ID_CHARS else ""


# ---------------------------------------------------------------------------- wire format
# Protobuf's encoding, for the few shapes of field a response has: a key byte (field number
# and wire type; every field here is below 16), then a varint or a length and the bytes.
_LENGTH_DELIMITED = 2
_VARINT = 0


def _varint(value: int) -> bytes:
    """An integer as a protobuf varint (a table lookup for the lengths a response holds)."""
    if 0 <= value < _SMALL:
        return _SMALL_VARINTS[value]
    return _encode_varint(value)


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 travels as its two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = 16384
_SMALL_VARINTS = [_encode_varint(n) for n in range(_SMALL)]
_KEYS = [bytes((number << 3 | _LENGTH_DELIMITED,)) for number in range(16)]
"""The key byte of each length-delimited field number."""


def _field(number: int, payload: bytes) -> bytes:
    return b"".join((_KEYS[number], _varint(len(payload)), payload))


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` (below 16) of any message, holding bytes, a string or a message."""
    return _field(number, payload)


def _parameter_entry(key: str, value: int) -> bytes:
    """Field 4: one entry of the map<string, InferParameter> `parameters`, an int64_param."""
    parameter = bytes((2 << 3 | _VARINT,)) + _varint(value)
    return _field(4, b"".join((_map_key(key), _field(2, parameter))))


def _bool_parameter_entry(key: str, value: bool) -> bytes:
    """Field 4: one entry of the map<string, InferParameter> `parameters`, a bool_param."""
    parameter = bytes((1 << 3 | _VARINT,)) + _varint(int(value))
    return _field(4, b"".join((_field(1, key.encode()), _field(2, parameter))))


_FINAL_RESPONSE = _bool_parameter_entry("triton_final_response", True)


@functools.lru_cache(maxsize=64)
def _map_key(key: str) -> bytes:
    return _field(1, key.encode())


@functools.lru_cache(maxsize=256)
def _response_head(model: str, version: int) -> bytes:
    return _field(1, model.encode()) + _field(2, str(version).encode())


@functools.lru_cache(maxsize=4096)
def _output_head(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    """An InferOutputTensor's description (its data travels in raw_output_contents)."""
    packed = b"".join(_varint(d) for d in shape)
    tensor = _field(1, name.encode()) + _field(2, wire_name_of(np.dtype(dtype)).encode())
    return _field(5, tensor + _field(3, packed))
