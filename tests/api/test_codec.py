"""Responses written straight to wire bytes read back, through protobuf, as the messages they
stand for."""

from __future__ import annotations

import numpy as np
import pytest

from service._pb import grpc_service_pb2 as pb
from service.api.codec import encode_response, encode_stream_response
from service.serving.request import InferenceResult


def built_with_protobuf(result: InferenceResult, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request_id
    )
    for key, value in result.extra.items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        else:
            response.parameters[key].string_param = str(value)
    for name, array in result.outputs.items():
        datatype = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}[array.dtype.name]
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


RESULTS = [
    ({"logits": np.arange(97, dtype=np.float32).reshape(1, 1, 97)}, {"sequence_version": 1}, "7"),
    (
        {
            # A 5,000-value output: its length takes a varint of more than two bytes.
            "logits": np.linspace(-1, 1, 5000, dtype=np.float32).reshape(1, 50, 100),
            "h_out": np.ones((1, 2, 256), np.float32),
            "ids": np.array([[-3, 2**40]], np.int64),
            "mask": np.array([[True, False]]),
        },
        {"sequence_version": 2**35, "flag": True, "note": "é", "negative": -5},
        "request-ü-" + "x" * 200,
    ),
    ({"empty": np.zeros((0, 3), np.float32)}, {}, ""),
]


@pytest.mark.parametrize(("outputs", "extra", "request_id"), RESULTS)
def test_wire_bytes_parse_as_the_message(outputs, extra, request_id) -> None:
    result = InferenceResult("charlm_lstm", 12, outputs, extra=dict(extra))
    expected = built_with_protobuf(result, request_id)
    assert pb.ModelInferResponse.FromString(encode_response(result, request_id)) == expected
    stream = pb.ModelStreamInferResponse.FromString(encode_stream_response(result, request_id))
    assert stream.error_message == ""
    assert stream.infer_response == expected
    for raw, array in zip(stream.infer_response.raw_output_contents, outputs.values(), strict=True):
        np.testing.assert_array_equal(np.frombuffer(raw, array.dtype).reshape(array.shape), array)
