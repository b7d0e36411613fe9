"""The codec's shortcuts past protobuf's objects: responses written straight to wire bytes read
back as the messages they stand for, and requests decoded from cached shapes decode as protobuf
decodes them."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api.codec import (
    RequestDecoder,
    decode_request,
    encode_response,
    encode_stream_response,
)
from rnnserve.errors import InvalidArgument
from rnnserve.serving.request import InferenceResult
from tests.api.fuzzing import set_sequence


def built_with_protobuf(result: InferenceResult, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request_id
    )
    if result.sequence_version is not None:
        response.parameters["sequence_version"].int64_param = result.sequence_version
    for name, array in result.outputs.items():
        datatype = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}[array.dtype.name]
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


RESULTS = [
    ({"logits": np.arange(97, dtype=np.float32).reshape(1, 1, 97)}, 1, "7"),
    (
        {
            # A 5,000-value output: its length takes a varint of more than two bytes.
            "logits": np.linspace(-1, 1, 5000, dtype=np.float32).reshape(1, 50, 100),
            "h_out": np.ones((1, 2, 256), np.float32),
            "ids": np.array([[-3, 2**40]], np.int64),
            "mask": np.array([[True, False]]),
        },
        2**35,
        "request-ü-" + "x" * 200,
    ),
    ({"empty": np.zeros((0, 3), np.float32)}, None, ""),
]


@pytest.mark.parametrize(("outputs", "sequence_version", "request_id"), RESULTS)
def test_wire_bytes_parse_as_the_message(outputs, sequence_version, request_id) -> None:
    result = InferenceResult("charlm_lstm", 12, outputs, sequence_version=sequence_version)
    expected = built_with_protobuf(result, request_id)
    assert pb.ModelInferResponse.FromString(encode_response(result, request_id)) == expected
    stream = pb.ModelStreamInferResponse.FromString(encode_stream_response(result, request_id))
    assert stream.error_message == ""
    expected.parameters["triton_final_response"].bool_param = True  # as Triton's streams say
    assert stream.infer_response == expected
    for raw, array in zip(stream.infer_response.raw_output_contents, outputs.values(), strict=True):
        np.testing.assert_array_equal(np.frombuffer(raw, array.dtype).reshape(array.shape), array)


def request_bytes(
    sequence_id: int | str | None = 7,
    start: bool = False,
    end: bool = False,
    request_id: str = "",
    data: bytes = b"\x01" * 8 * 3,
    shape: tuple[int, ...] = (1, 3),
    outputs: tuple[str, ...] = (),
) -> bytes:
    message = pb.ModelInferRequest(model_name="charlm_lstm", id=request_id)
    if sequence_id is not None:
        set_sequence(message, sequence_id, start, end)
    message.inputs.add(name="tokens", datatype="INT64", shape=shape)
    for name in outputs:
        message.outputs.add(name=name)
    message.raw_input_contents.append(data)
    return message.SerializeToString()


def assert_same(got, expected) -> None:
    assert (got.model, got.version, got.outputs, got.sequence, got.id) == (
        expected.model,
        expected.version,
        expected.outputs,
        expected.sequence,
        expected.id,
    )
    assert got.inputs.keys() == expected.inputs.keys()
    for name, array in expected.inputs.items():
        assert got.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(got.inputs[name], array)


def test_decoder_reuses_a_shape_but_reads_each_requests_own_data_and_id() -> None:
    decoder = RequestDecoder()
    rng = np.random.default_rng(0)
    variants = [
        {},
        {"start": True},
        {"end": True},
        {"request_id": "ü-1"},
        {"sequence_id": "user-42"},
        {"sequence_id": None},
        {"outputs": ("logits", "h_out")},
        {"shape": (1, 5)},
    ]
    for round_ in range(3):
        for variant in variants:
            steps = variant.get("shape", (1, 3))[1]
            data = rng.integers(0, 97, size=steps, dtype=np.int64).tobytes()
            kwargs = {**variant, "request_id": f"{variant.get('request_id', 'r')}-{round_}"}
            raw = request_bytes(data=data, **kwargs)
            assert_same(decoder.decode(raw), decode_request(pb.ModelInferRequest.FromString(raw)))
    # Each distinct shape was decoded in full once and then reused; an id and the sequence
    # parameters are no part of one: the base, other outputs, another shape.
    assert len(decoder._templates) == 3


def test_a_parameter_whose_key_protobuf_reads_as_a_sequence_parameter_decodes_as_protobuf() -> None:
    """A map entry may hold its key twice (protobuf keeps the last): one that begins as another
    parameter and ends as sequence_id is a sequence parameter, wherever it stands among the
    others, and every request carrying one decodes as protobuf decodes it."""
    value = pb.InferParameter(int64_param=5).SerializeToString()
    hidden = (
        b"\x22"  # parameters (field 4), a map entry of:
        + bytes((len(value) + 18,))
        + b"\x0a\x01a"  # key "a", then
        + b"\x0a\x0bsequence_id"  # key "sequence_id"
        + b"\x12"
        + bytes((len(value),))
        + value  # value: int64 5
    )
    decoder = RequestDecoder()
    for sequence_id in (7, 8, 9):
        plain = request_bytes(sequence_id=sequence_id)
        for raw in (hidden + plain, plain + hidden):
            expected = decode_request(pb.ModelInferRequest.FromString(raw))
            assert_same(decoder.decode(raw), expected)
    assert expected.sequence.id == 5  # the hidden one came last, and was read


def test_decoder_takes_fields_in_any_order() -> None:
    # Concatenated messages merge: tensor data first, then the rest.
    data = np.arange(3, dtype=np.int64).tobytes()
    tail = pb.ModelInferRequest.FromString(request_bytes(data=data))
    head = pb.ModelInferRequest()
    head.raw_input_contents.extend(tail.raw_input_contents)
    del tail.raw_input_contents[:]
    raw = head.SerializeToString() + tail.SerializeToString()
    decoder = RequestDecoder()
    for _ in range(2):
        assert_same(decoder.decode(raw), decode_request(pb.ModelInferRequest.FromString(raw)))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\x0a\x05abc", "not a valid ModelInferRequest"),
        (request_bytes(data=b"\x00" * 5), "needs 24 bytes, got 5"),
        (request_bytes(request_id="r" * 1025), "the request id is 1025 characters long"),
    ],
)
def test_decoder_errors_say_what_is_wrong(raw: bytes, needle: str) -> None:
    decoder = RequestDecoder()
    decoder.decode(request_bytes())  # a learned shape must not hide a wrong byte count
    with pytest.raises(InvalidArgument, match=needle):
        decoder.decode(raw)


def typed(datatype: str, shape: list[int], field: str, values: list) -> bytes:
    message = pb.ModelInferRequest(model_name="charlm_lstm")
    tensor = message.inputs.add(name="tokens", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return message.SerializeToString()


def with_raw(shape: list[int], data: bytes) -> bytes:
    message = pb.ModelInferRequest(model_name="charlm_lstm")
    message.inputs.add(name="tokens", datatype="INT64", shape=shape)
    message.raw_input_contents.append(data)
    return message.SerializeToString()


# Found by fuzzing (tests/api/test_codec_fuzz.py, tests/api/test_fuzz.py): each was INTERNAL,
# or for typed values out of range, silently wrapped (1000 as INT8 became -24).
@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (with_raw([1] * 100, b"\x00" * 8), "shape has 100 axes, more than the 32 supported"),
        (with_raw([0, 2**62, 2**62], b""), "is too large for any tensor"),
        (typed("INT64", [0, 2**62, 2**62], "int64_contents", []), "is too large for any tensor"),
        (typed("INT8", [1, 2], "int_contents", [5, 1000]), "INT8 takes values -128..127, got 1000"),
        (typed("UINT8", [1], "uint_contents", [256]), "UINT8 takes values 0..255, got 256"),
        (typed("INT16", [1], "int_contents", [-40000]), "-32768..32767, got -40000"),
        (request_bytes(sequence_id="x" * 1025), "sequence_id is 1025 characters long"),
    ],
    ids=["100 axes", "huge empty raw", "huge empty typed", "INT8", "UINT8", "INT16", "long id"],
)
def test_bent_requests_are_refused_saying_why(raw: bytes, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        RequestDecoder().decode(raw)


def test_typed_values_in_range_are_taken_exactly() -> None:
    got = RequestDecoder().decode(typed("INT8", [1, 3], "int_contents", [-128, 0, 127]))
    assert got.inputs["tokens"].dtype == np.int8
    assert got.inputs["tokens"].tolist() == [[-128, 0, 127]]


def test_a_long_request_shape_is_not_remembered() -> None:
    # Remembered whole, 4096 distinct long requests would hold 4096 messages.
    decoder = RequestDecoder()
    for n in range(3):
        decoder.decode(request_bytes(sequence_id=f"{n}" + "s" * 1000, outputs=("o" * 5000,)))
    decoder.decode(request_bytes())
    assert len(decoder._templates) == 1


def test_typed_contents_beside_raw_bytes_are_refused() -> None:
    # Triton refuses them too ("binary data was already supplied"); they were silently ignored.
    message = pb.ModelInferRequest.FromString(request_bytes())
    message.inputs[0].contents.int64_contents.extend([1, 2, 3])
    with pytest.raises(InvalidArgument, match="raw_input_contents or in typed contents, not both"):
        RequestDecoder().decode(message.SerializeToString())
