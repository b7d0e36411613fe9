"""Requests sent with tritonclient, and answers recorded so that two servers can be compared.

Both servers get the same client code: `tritonclient.grpc` (its `infer`, its callback stream)
and `tritonclient.http` (its `infer`, tensors as binary data both ways, as it sends them by
default); and, where tritonclient cannot say something (a sequence id of 0 or "" with sequence
flags), the generated gRPC stub or a JSON body of our own, with the parameters written out.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

DATATYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}

TIMEOUT_S = 30.0
"""Every answer comes in milliseconds; a server that gives none fails the test, not hangs it."""

CODE_IN_BAND = re.compile(r"\[([A-Z_]+)\] ")
"""rnnserve's stream errors read "[CODE] message"; Triton's carry the message alone."""


@dataclass(frozen=True)
class Tensor:
    name: str
    value: np.ndarray

    @property
    def datatype(self) -> str:
        return DATATYPES[self.value.dtype]


@dataclass(frozen=True)
class Call:
    """One inference request, whether the protocol refuses it, and what the model computes."""

    model: str
    inputs: tuple[Tensor, ...]
    sequence_id: int | str = 0
    start: bool = False
    end: bool = False
    outputs: tuple[str, ...] = ()
    """The outputs asked for; none asks for the model's own (its state outputs excluded)."""
    refused: bool = False
    """Triton refuses it, and so must rnnserve unless the difference is deliberate."""
    expect: Mapping[str, np.ndarray] | None = field(default=None, compare=False)
    """The outputs computed in-process, for a server that answers it."""
    on_the_wire: bool = False
    """Write the sequence parameters even for id 0 or "", which tritonclient's `infer` omits."""


@dataclass(frozen=True)
class Outcome:
    """What a server answered to one call: outputs, or an error (its code, when it gave one)."""

    outputs: Mapping[str, np.ndarray] | None
    code: str | None = None
    message: str = ""
    parameters: frozenset[str] = frozenset()

    @property
    def answered(self) -> bool:
        return self.outputs is not None

    @property
    def status(self) -> str:
        if self.answered:
            return "OK"
        return self.code or "an error without a code"

    def describe(self) -> str:
        if self.answered:
            shapes = {name: list(value.shape) for name, value in self.outputs.items()}
            return f"OK {shapes}"
        return f"{self.status} {self.message!r}"


def answer(result: triton.InferResult) -> Outcome:
    response = result.get_response()
    outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
    return Outcome(outputs, parameters=frozenset(response.parameters))


def refusal(error: InferenceServerException) -> Outcome:
    """A gRPC status code by its name ("INVALID_ARGUMENT"), an HTTP one by its number ("400")."""
    status = error.status()
    return Outcome(None, status.removeprefix("StatusCode.") if status else None, error.message())


def in_band_refusal(message: str) -> Outcome:
    coded = CODE_IN_BAND.match(message)
    return Outcome(None, coded.group(1) if coded else None, message)


def infer_inputs(call: Call) -> list[triton.InferInput]:
    inputs = []
    for tensor in call.inputs:
        infer_input = triton.InferInput(tensor.name, list(tensor.value.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.value)
        inputs.append(infer_input)
    return inputs


def requested(call: Call) -> list[triton.InferRequestedOutput] | None:
    return [triton.InferRequestedOutput(name) for name in call.outputs] or None


def wire_request(call: Call, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=call.model, id=request_id)
    for tensor in call.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.value.shape)
        request.raw_input_contents.append(tensor.value.tobytes())
    for name in call.outputs:
        request.outputs.add(name=name)
    if isinstance(call.sequence_id, str):
        request.parameters["sequence_id"].string_param = call.sequence_id
    else:
        request.parameters["sequence_id"].int64_param = call.sequence_id
    request.parameters["sequence_start"].bool_param = call.start
    request.parameters["sequence_end"].bool_param = call.end
    return request


def run_unary(target: str, calls: Sequence[Call]) -> list[Outcome]:
    """Each call as one ModelInfer, in order, each after the previous answer."""
    outcomes = []
    with triton.InferenceServerClient(target) as client, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for index, call in enumerate(calls):
            if call.on_the_wire:
                try:
                    response = stub.ModelInfer(wire_request(call, str(index)), timeout=TIMEOUT_S)
                except grpc.RpcError as error:
                    outcomes.append(Outcome(None, error.code().name, error.details()))
                    continue
                outcomes.append(answer(triton.InferResult(response)))
                continue
            try:
                result = client.infer(
                    call.model,
                    infer_inputs(call),
                    outputs=requested(call),
                    request_id=str(index),
                    sequence_id=call.sequence_id,
                    sequence_start=call.start,
                    sequence_end=call.end,
                    client_timeout=TIMEOUT_S,
                )
            except InferenceServerException as error:
                outcomes.append(refusal(error))
                continue
            outcomes.append(answer(result))
    return outcomes


def run_stream(target: str, calls: Sequence[Call], pipelined: bool) -> list[Outcome]:
    """The calls over one ModelStreamInfer stream: all sent at once (`pipelined`, for the
    batchers to interleave), or each after the previous answer (so an error is attributed)."""
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]]
    answers = queue.Queue()
    with triton.InferenceServerClient(target) as client, grpc.insecure_channel(target) as channel:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            if pipelined:
                return _pipelined(client, calls, answers)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            outcomes = []
            for index, call in enumerate(calls):
                if call.on_the_wire:  # tritonclient's stream cannot send it: a stream of its own
                    outcomes.append(_stream_on_the_wire(stub, wire_request(call, str(index))))
                    continue
                _send(client, call, str(index))
                outcomes.append(_received(*_next(answers)))
            return outcomes
        finally:
            client.stop_stream()


def _send(client: triton.InferenceServerClient, call: Call, request_id: str) -> None:
    client.async_stream_infer(
        call.model,
        infer_inputs(call),
        outputs=requested(call),
        request_id=request_id,
        sequence_id=call.sequence_id,
        sequence_start=call.start,
        sequence_end=call.end,
    )


def _next(answers: queue.Queue) -> tuple:
    try:
        return answers.get(timeout=TIMEOUT_S)
    except queue.Empty:
        raise AssertionError(f"no answer on the stream in {TIMEOUT_S:.0f} s") from None


def _received(result: triton.InferResult | None, error: Exception | None) -> Outcome:
    if result is not None:
        return answer(result)
    assert isinstance(error, InferenceServerException), error
    return in_band_refusal(error.message())


def _pipelined(
    client: triton.InferenceServerClient, calls: Sequence[Call], answers: queue.Queue
) -> list[Outcome]:
    for index, call in enumerate(calls):
        _send(client, call, str(index))
    by_id: dict[str, Outcome] = {}
    errors: list[Outcome] = []
    for _ in calls:
        result, error = _next(answers)
        if result is not None:
            by_id[result.get_response().id] = answer(result)
        else:
            errors.append(_received(result, error))
    # tritonclient hands a stream error over without its response, so without the request id.
    unattributed = Outcome(
        None,
        errors[0].code if errors else None,
        "; ".join(error.message for error in errors) or "no answer",
    )
    return [by_id.get(str(index), unattributed) for index in range(len(calls))]


def _stream_on_the_wire(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> Outcome:
    (response,) = stub.ModelStreamInfer(iter([request]), timeout=TIMEOUT_S)
    if response.error_message:
        return in_band_refusal(response.error_message)
    return answer(triton.InferResult(response.infer_response))


def http_answer(result: triton_http.InferResult) -> Outcome:
    response = result.get_response()
    outputs = {output["name"]: result.as_numpy(output["name"]) for output in response["outputs"]}
    return Outcome(outputs, parameters=frozenset(response.get("parameters", {})))


def http_inputs(call: Call) -> list[triton_http.InferInput]:
    inputs = []
    for tensor in call.inputs:
        shape = list(tensor.value.shape)
        infer_input = triton_http.InferInput(tensor.name, shape, tensor.datatype)
        infer_input.set_data_from_numpy(tensor.value)  # binary data, tritonclient's default
        inputs.append(infer_input)
    return inputs


def http_requested(call: Call) -> list[triton_http.InferRequestedOutput] | None:
    return [triton_http.InferRequestedOutput(name) for name in call.outputs] or None


def run_http(target: str, calls: Sequence[Call]) -> list[Outcome]:
    """Each call as one POST /v2/models/{model}/infer, in order, each after the previous answer
    (HTTP has no stream: a sequence's requests are ordered by waiting for each answer)."""
    outcomes = []
    with triton_http.InferenceServerClient(target, network_timeout=TIMEOUT_S) as client:
        for index, call in enumerate(calls):
            if call.on_the_wire:
                outcomes.append(_http_on_the_wire(target, call, str(index)))
                continue
            try:
                result = client.infer(
                    call.model,
                    http_inputs(call),
                    outputs=http_requested(call),
                    request_id=str(index),
                    sequence_id=call.sequence_id,
                    sequence_start=call.start,
                    sequence_end=call.end,
                )
            except InferenceServerException as error:
                # tritonclient.http raises it from a frame that holds it: a cycle that keeps the
                # client alive until the cyclic collector runs, on whichever thread allocates
                # then (a gRPC stream's, in a later test), where gevent refuses to close it
                # (InvalidThreadUseError, raised in __del__). Without its traceback, the client
                # goes here.
                error.__traceback__ = None
                outcomes.append(refusal(error))
                continue
            outcomes.append(http_answer(result))
    return outcomes


def http_document(call: Call, request_id: str) -> dict[str, object]:
    """The JSON inference request, with the sequence parameters written out whatever the id,
    and the inputs as JSON data (the other form the protocol allows)."""
    document: dict[str, object] = {
        "id": request_id,
        "parameters": {
            "sequence_id": call.sequence_id,
            "sequence_start": call.start,
            "sequence_end": call.end,
            "binary_data_output": True,
        },
        "inputs": [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.value.shape),
                "data": tensor.value.ravel().tolist(),
            }
            for tensor in call.inputs
        ],
    }
    if call.outputs:
        document["outputs"] = [{"name": name} for name in call.outputs]
    return document


def _http_on_the_wire(target: str, call: Call, request_id: str) -> Outcome:
    host, port = target.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        connection.request(
            "POST",
            f"/v2/models/{call.model}/infer",
            json.dumps(http_document(call, request_id)).encode(),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        return Outcome(None, str(response.status), json.loads(body)["error"])
    header_length = response.getheader("Inference-Header-Content-Length")
    result = triton_http.InferenceServerClient.parse_response_body(
        body, header_length=int(header_length) if header_length else None
    )
    return http_answer(result)
