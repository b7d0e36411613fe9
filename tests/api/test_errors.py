"""Every bad request gets the right status and a message a person can act on; the server
keeps serving everyone else afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from tests.api.conftest import Stream, infer_input

ONE_STEP = np.array([[[24.0]]], np.float32)


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def expect_error(call, code: str, *needles: str) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == f"StatusCode.{code}", caught.value
    message = caught.value.message()
    for needle in needles:
        assert needle in message, message
    return message


def still_serving(client) -> None:
    result = client.infer(
        "sensor_gru",
        [infer_input("sensor_gru", ONE_STEP)],
        sequence_id=999_999,
        sequence_start=True,
        sequence_end=True,
    )
    assert result.as_numpy("forecast").shape == (1, 1, 1)


def test_unknown_model(client) -> None:
    expect_error(
        lambda: client.infer("gpt", [infer_input("sensor_gru", ONE_STEP)]),
        "NOT_FOUND",
        "unknown model 'gpt'",
        "sensor_gru",
    )
    still_serving(client)


def test_unknown_version(client) -> None:
    expect_error(
        lambda: client.infer(
            "sensor_gru",
            [infer_input("sensor_gru", ONE_STEP)],
            model_version="7",
            sequence_id=1,
            sequence_start=True,
        ),
        "NOT_FOUND",
        "no version 7",
        "loaded versions: 1",
    )
    still_serving(client)


def test_wrong_tensor_name(client) -> None:
    tensor = triton.InferInput("temperature", [1, 1, 1], "FP32")
    tensor.set_data_from_numpy(ONE_STEP)
    expect_error(
        lambda: client.infer("sensor_gru", [tensor], sequence_id=5, sequence_start=True),
        "INVALID_ARGUMENT",
        "no input 'temperature'",
        "reading",
    )
    still_serving(client)


def test_wrong_dtype(client) -> None:
    tensor = triton.InferInput("tokens", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    expect_error(
        lambda: client.infer("charlm_lstm", [tensor], sequence_id=5, sequence_start=True),
        "INVALID_ARGUMENT",
        "tokens must be INT64, got FP32",
    )
    still_serving(client)


@pytest.mark.parametrize("token", [97, 200, -1])
def test_a_token_outside_the_vocabulary(client, token: int) -> None:
    tensor = triton.InferInput("tokens", [1, 2], "INT64")
    tensor.set_data_from_numpy(np.asarray([[5, token]], np.int64))
    expect_error(
        lambda: client.infer("charlm_lstm", [tensor], sequence_id=6, sequence_start=True),
        "INVALID_ARGUMENT",
        "tokens of model charlm_lstm takes values 0..96",
        f"got {token}",
    )
    still_serving(client)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_reading_that_is_not_a_number(client, value: float) -> None:
    x = np.asarray([[[24.0], [value]]], np.float32)
    expect_error(
        lambda: client.infer(
            "sensor_gru", [infer_input("sensor_gru", x)], sequence_id=8, sequence_start=True
        ),
        "INVALID_ARGUMENT",
        "input reading of model sensor_gru holds NaN or infinity",
    )
    still_serving(client)


def test_an_explicit_state_that_is_not_a_number(client) -> None:
    h = np.zeros((1, 2, 64), np.float32)
    h[0, 1, 5] = np.nan
    state = triton.InferInput("h_in", list(h.shape), "FP32")
    state.set_data_from_numpy(h)
    expect_error(
        lambda: client.infer("sensor_gru", [infer_input("sensor_gru", ONE_STEP), state]),
        "INVALID_ARGUMENT",
        "state h_in of model sensor_gru holds NaN or infinity",
    )


def test_fp16_in_typed_contents(stub) -> None:
    request = pb.ModelInferRequest(model_name="sensor_gru")
    request.inputs.add(name="reading", datatype="FP16", shape=[1, 1, 1])
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw bytes only" in caught.value.details()


def test_wrong_shape(client) -> None:
    x = np.zeros((1, 2, 7), np.float32)
    expect_error(
        lambda: client.infer(
            "digits_lstm", [infer_input("digits_lstm", x)], sequence_id=5, sequence_start=True
        ),
        "INVALID_ARGUMENT",
        "pixels must have shape [batch, T, 8], got [1, 2, 7]",
    )
    still_serving(client)


def test_wrong_byte_count(stub, client) -> None:
    request = pb.ModelInferRequest(model_name="sensor_gru")
    request.inputs.add(name="reading", datatype="FP32", shape=[1, 2, 1])
    request.raw_input_contents.append(b"\x00" * 12)
    request.parameters["sequence_id"].int64_param = 5
    request.parameters["sequence_start"].bool_param = True
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 8 bytes, got 12" in caught.value.details()
    still_serving(client)


def test_typed_contents_are_accepted(stub) -> None:
    request = pb.ModelInferRequest(model_name="sensor_gru", id="typed")
    request.inputs.add(name="reading", datatype="FP32", shape=[1, 2, 1])
    request.inputs[0].contents.fp32_contents.extend([24.0, 25.0])
    request.parameters["sequence_id"].string_param = "typed"
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True
    response = stub.ModelInfer(request)
    assert response.id == "typed"
    assert list(response.outputs[0].shape) == [1, 2, 1]
    assert len(response.raw_output_contents[0]) == 8


def test_continuation_of_an_unknown_sequence(client) -> None:
    expect_error(
        lambda: client.infer(
            "sensor_gru", [infer_input("sensor_gru", ONE_STEP)], sequence_id=424242
        ),
        "INVALID_ARGUMENT",
        "424242",
        "never started",
        "sequence_start=true",
    )
    still_serving(client)


def test_continuation_after_the_end(client) -> None:
    client.infer(
        "sensor_gru",
        [infer_input("sensor_gru", ONE_STEP)],
        sequence_id=31,
        sequence_start=True,
        sequence_end=True,
    )
    expect_error(
        lambda: client.infer("sensor_gru", [infer_input("sensor_gru", ONE_STEP)], sequence_id=31),
        "INVALID_ARGUMENT",
        "31",
        "ended",
    )


def test_stateful_model_without_sequence_or_state(client) -> None:
    expect_error(
        lambda: client.infer("sensor_gru", [infer_input("sensor_gru", ONE_STEP)]),
        "INVALID_ARGUMENT",
        "sequence_id",
        "h_in",
    )
    still_serving(client)


def test_sequence_flags_without_an_id(stub) -> None:
    # tritonclient never sends flags without an id; other clients can.
    request = pb.ModelInferRequest(model_name="sensor_gru")
    request.inputs.add(name="reading", datatype="FP32", shape=[1, 1, 1])
    request.raw_input_contents.append(ONE_STEP.tobytes())
    request.parameters["sequence_start"].bool_param = True
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "need a sequence_id" in caught.value.details()


def test_batch_of_several_in_one_sequence(client) -> None:
    x = np.zeros((2, 1, 1), np.float32)
    expect_error(
        lambda: client.infer(
            "sensor_gru", [infer_input("sensor_gru", x)], sequence_id=8, sequence_start=True
        ),
        "INVALID_ARGUMENT",
        "batch size must be 1, got 2",
    )


def test_unknown_output(client) -> None:
    expect_error(
        lambda: client.infer(
            "sensor_gru",
            [infer_input("sensor_gru", ONE_STEP)],
            outputs=[triton.InferRequestedOutput("nope")],
            sequence_id=9,
            sequence_start=True,
        ),
        "INVALID_ARGUMENT",
        "no output 'nope'",
    )


def test_zero_time_steps(client) -> None:
    x = np.zeros((1, 0, 1), np.float32)
    expect_error(
        lambda: client.infer(
            "sensor_gru", [infer_input("sensor_gru", x)], sequence_id=10, sequence_start=True
        ),
        "INVALID_ARGUMENT",
        "1..4096 time steps, got 0",
    )


def test_errors_on_a_stream_leave_it_open(client) -> None:
    stream = Stream(client)
    try:
        stream.client.async_stream_infer(
            "sensor_gru", [infer_input("sensor_gru", ONE_STEP)], sequence_id=555, request_id="bad"
        )
        stream.client.async_stream_infer(
            "nope", [infer_input("sensor_gru", ONE_STEP)], request_id="bad-model"
        )
        stream.client.async_stream_infer(
            "sensor_gru",
            [infer_input("sensor_gru", ONE_STEP)],
            sequence_id=556,
            sequence_start=True,
            sequence_end=True,
            request_id="good",
        )
        results = stream.collect(3)
    finally:
        stream.close()
    errors = [str(error) for result, error in results.values() if error is not None]
    assert len(errors) == 2
    assert any("INVALID_ARGUMENT" in e and "555" in e for e in errors)
    assert any("NOT_FOUND" in e and "nope" in e for e in errors)
    good = [r for r, e in results.values() if e is None]
    assert len(good) == 1 and good[0].get_response().id == "good"


def test_message_too_large(server) -> None:
    with triton.InferenceServerClient(server.target) as client:
        huge = np.zeros((1, 20_000_000), np.int64)  # 160 MB, over the 64 MiB limit
        expect_error(
            lambda: client.infer(
                "charlm_lstm",
                [infer_input("charlm_lstm", huge)],
                sequence_id=3,
                sequence_start=True,
            ),
            "RESOURCE_EXHAUSTED",
        )
        still_serving(client)


def test_undecodable_bytes_are_refused_and_a_stream_stays_open(server) -> None:
    good = pb.ModelInferRequest(model_name="sensor_gru", id="after")
    good.inputs.add(name="reading", datatype="FP32", shape=[1, 1, 1])
    good.raw_input_contents.append(ONE_STEP.tobytes())
    good.parameters["sequence_id"].int64_param = 557
    good.parameters["sequence_start"].bool_param = True
    good.parameters["sequence_end"].bool_param = True
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = list(call(iter([b"\x0a\x05abc", good.SerializeToString()]), timeout=30))
        unary = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            unary(b"\x0a\x05abc", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in caught.value.details()
    assert len(answers) == 2
    assert answers[0].error_message.startswith("[INVALID_ARGUMENT]")
    assert "not a valid ModelInferRequest" in answers[0].error_message
    assert answers[1].error_message == ""
    assert answers[1].infer_response.id == "after"


@pytest.mark.parametrize("version", ["²", "١", "1" * 5000, "9" * 20])
def test_a_version_that_is_not_a_plain_number(client, version: str) -> None:
    # "²" passes str.isdigit() and int() refuses it; int() refuses over 4300 digits: INTERNAL.
    expect_error(
        lambda: client.infer(
            "sensor_gru", [infer_input("sensor_gru", ONE_STEP)], model_version=version
        ),
        "INVALID_ARGUMENT",
        "model version must be a positive integer of at most 19 digits",
    )
    still_serving(client)


@pytest.mark.parametrize("char", ["\U0001f600", "€", "\x00"])
def test_a_long_message_fits_the_trailers(stub, char: str) -> None:
    # Percent-encoded, 1,024 characters of 4 bytes took 12 KiB of trailers, over the client's
    # 8 KiB: the client got RESOURCE_EXHAUSTED "received metadata size exceeds soft limit".
    request = pb.ModelInferRequest(model_name=char * 5000)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    details = caught.value.details()
    assert details.startswith("unknown model") and details.endswith("(message cut)")
    assert len(details.encode()) <= 1024
