"""The codec fuzzed in-process: any bytes decode or are refused with the project's own error,
decode as protobuf and `decode_request` decode them, and any result encodes to the bytes
protobuf would write."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api.codec import (
    MAX_REQUEST_ID_CHARS,
    MAX_TEMPLATE_BYTES,
    RequestDecoder,
    decode_request,
    encode_response,
    encode_stream_error,
    encode_stream_response,
)
from rnnserve.errors import ServiceError
from rnnserve.repository.signature import WIRE_DTYPES, wire_name_of
from rnnserve.serving.request import InferenceRequest, InferenceResult
from tests.api.fuzzing import (
    bent_bytes,
    bent_requests,
    examples,
    garbage_text,
    seeded,
    valid_request,
)
from tests.api.test_codec import assert_same

# One decoder for the whole run, as the server has: the shapes it learns from earlier inputs
# are what later inputs (the same request with other bytes) meet.
DECODER = RequestDecoder()


def protobufs_decode(data: bytes) -> InferenceRequest | ServiceError | None:
    """What protobuf's parse and `decode_request` make of `data`: a request, the ServiceError
    refusing it, or None when protobuf cannot parse it. Any other exception is a bug."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None
    try:
        return decode_request(message)
    except ServiceError as error:
        return error


def check_decoder(data: bytes) -> None:
    expected = protobufs_decode(data)
    for decoder in (DECODER, RequestDecoder()):
        try:
            got = decoder.decode(data)
        except ServiceError as error:
            assert not isinstance(expected, InferenceRequest), f"{error!r} for a valid request"
            assert str(error), "an error without a message"
            continue
        assert isinstance(expected, InferenceRequest), f"decoded what protobuf refuses: {got}"
        assert_same(got, expected)
    assert all(len(key) <= MAX_TEMPLATE_BYTES for key in DECODER._templates)


@seeded
@settings(max_examples=examples(1000))
@given(bent_requests(longest=5_000))
def test_bent_requests_decode_as_protobuf_decodes_them(message: pb.ModelInferRequest) -> None:
    data = message.SerializeToString()
    check_decoder(data)
    if message.raw_input_contents:
        # The same request again with other tensor bytes of the same sizes: from a learned shape.
        again = pb.ModelInferRequest()
        again.CopyFrom(message)
        for index, raw in enumerate(message.raw_input_contents):
            again.raw_input_contents[index] = bytes(b ^ 0x5A for b in raw)
        check_decoder(again.SerializeToString())


@seeded
@settings(max_examples=examples(1000))
@given(bent_bytes())
def test_any_bytes_decode_or_are_refused(data: bytes) -> None:
    check_decoder(data)


@seeded
@settings(max_examples=examples(300))
@given(st.binary(min_size=0, max_size=64), st.integers(1, 4), st.text(max_size=8))
def test_a_learned_shape_decodes_other_bytes_as_protobuf(
    payload: bytes, steps: int, rid: str
) -> None:
    """Requests of one learned shape whose tensor bytes change size and content."""
    x = np.arange(steps, dtype=np.int64).reshape(1, steps)
    check_decoder(valid_request("charlm_lstm", x, 7, False, False, rid).SerializeToString())
    message = valid_request("charlm_lstm", x, 7, False, False, rid)
    message.raw_input_contents[0] = payload
    check_decoder(message.SerializeToString())


arrays = st.builds(
    lambda dtype, shape, seed: (
        np.random.default_rng(seed)
        .integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        .view(dtype)
        .reshape(shape)
    ),
    st.sampled_from(list(WIRE_DTYPES.values())),
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    st.integers(0, 2**32),
)


@seeded
@settings(max_examples=examples(500))
@given(
    st.text(min_size=1, max_size=64),
    st.integers(0, 2**63 - 1),
    st.dictionaries(st.text(min_size=1, max_size=40), arrays, max_size=4),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    garbage_text(5_000),
)
def test_encoded_responses_parse_as_the_message(
    model: str, version: int, outputs: dict, sequence_version: int | None, request_id: str
) -> None:
    result = InferenceResult(model, version, outputs, sequence_version=sequence_version)
    expected = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request_id)
    if sequence_version is not None:
        expected.parameters["sequence_version"].int64_param = sequence_version
    for name, array in outputs.items():
        expected.outputs.add(name=name, datatype=wire_name_of(array.dtype), shape=array.shape)
        expected.raw_output_contents.append(array.tobytes())
    assert pb.ModelInferResponse.FromString(encode_response(result, request_id)) == expected
    stream = pb.ModelStreamInferResponse.FromString(encode_stream_response(result, request_id))
    expected.parameters["triton_final_response"].bool_param = True
    assert stream.error_message == "" and stream.infer_response == expected
    error = pb.ModelStreamInferResponse.FromString(
        encode_stream_error(model, str(version), request_id, "[INVALID_ARGUMENT] x")
    )
    assert error.error_message == "[INVALID_ARGUMENT] x"
    # An id too long to take was refused; echoed, it could make the answer too large to send.
    echoed = request_id if len(request_id) <= MAX_REQUEST_ID_CHARS else ""
    assert error.infer_response.id == echoed
