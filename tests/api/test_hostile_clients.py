"""What a hostile client found on the real server (issue 13's review): each test states what
the server promises.

- Without credentials, nothing a client sends may stay in the server's memory: the health
  service is open to all, so its Watch must not hold what it was sent (a service name longer
  than any service's is refused).
- A stream whose client stops reading its answers must not make the server hold every answer
  it goes on asking for (a 32 KiB request of charlm_lstm is answered with 1.6 MB).
- An END the server refuses (ABORTED: `sequence_version` differs) is not applied: the
  sequence is still live, at the version the refusal named.
- Every refusal is a proper status: bytes that are not the method's message are
  INVALID_ARGUMENT on every method, as they are on ModelInfer, never UNKNOWN.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from tests.api.conftest import bearer
from tests.api.test_stress import rss_mb
from tests.server import RunningServer, serving

BEARER = tuple(bearer("alice").items())
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def server(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # A stream holds up to the largest message (32 MiB here) before it stops being read.
    flags = ("--auth-tokens", str(token_file), "--max-message-bytes", str(32 << 20))
    with serving(tmp_path_factory.mktemp("hostile"), *flags) as running:
        yield running


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.target, options=options) as opened:
        yield opened


def settled_rss_mb(pid: int) -> float:
    """RSS once the allocator has had a moment to give freed memory back."""
    time.sleep(1.0)
    return rss_mb(pid)


def test_health_watch_without_credentials_holds_no_memory(server, channel) -> None:
    pid = server.process.pid
    health = health_pb2_grpc.HealthStub(channel)
    names = [f"{n}" + "x" * (16 << 20) for n in range(8)]
    # Receiving a 16 MiB message leaves freed buffers with the allocator: measure from there.
    for name in names:
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(service=name))
    before = settled_rss_mb(pid)
    watches = []
    try:
        for name in names:
            watch = health.Watch(health_pb2.HealthCheckRequest(service=name))
            watches.append(watch)
            try:
                next(watch)  # SERVICE_UNKNOWN, or a refusal of the name: either way it was read
            except grpc.RpcError as refused:
                assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.details()
        held = settled_rss_mb(pid) - before
    finally:
        for watch in watches:
            watch.cancel()
    # Eight streams of 16 MiB names: a server that kept them would hold 128 MiB or more.
    assert held < 64, f"the server holds {held:.0f} MiB more for 8 unauthenticated watches"


def charlm_step(n: int, steps: int) -> bytes:
    request = pb.ModelInferRequest(model_name="charlm_lstm", id=str(n))
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, steps])
    request.raw_input_contents.append(np.ones((1, steps), np.int64).tobytes())
    request.parameters["sequence_id"].string_param = "unread-answers"
    request.parameters["sequence_start"].bool_param = n == 0
    return request.SerializeToString()


HELD_MB = 96
"""What one stream's unread answers may hold: 60 of the largest charlm_lstm answers."""


def test_a_stream_whose_answers_are_not_read_stops_being_read(server, channel) -> None:
    pid = server.process.pid
    count, steps = 200, 4096  # 32 KiB requests, answers of 1.6 MB: 320 MB if all were held
    before = settled_rss_mb(pid)
    sent = 0

    def requests() -> Iterator[bytes]:
        nonlocal sent
        for n in range(count):
            yield charlm_step(n, steps)
            sent = n + 1
        time.sleep(120)  # keep the stream open, its answers unread

    call = channel.stream_stream(STREAM)(requests(), metadata=BEARER)
    peak, last_sent, still_since = 0.0, -1, time.monotonic()
    try:
        # Until the server holds too much, or no request went out for 8 s (the server stopped
        # reading, or all are out: a server that ran them all, about 30 ms each here, would
        # hold over 150 answers by then), or 60 s passed.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and peak <= HELD_MB:
            time.sleep(0.5)
            peak = max(peak, rss_mb(pid) - before)
            if sent != last_sent:
                last_sent, still_since = sent, time.monotonic()
            elif time.monotonic() - still_since > 8:
                break
    finally:
        call.cancel()
    assert peak <= HELD_MB, f"{peak:.0f} MiB held for one stream's unread answers ({sent} sent)"


def sensor_step(sequence_id: str, **parameters: bool | int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="sensor_gru")
    reading = request.inputs.add(name="reading", datatype="FP32", shape=[1, 1, 1])
    reading.contents.fp32_contents.append(24.0)
    request.parameters["sequence_id"].string_param = sequence_id
    for name, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        else:
            request.parameters[name].int64_param = value
    return request


def test_an_end_refused_for_its_sequence_version_leaves_the_sequence_live(channel) -> None:
    inference = pb_grpc.GRPCInferenceServiceStub(channel)
    inference.ModelInfer(sensor_step("end-refused", sequence_start=True), metadata=BEARER)
    with pytest.raises(grpc.RpcError) as refused:
        inference.ModelInfer(
            sensor_step("end-refused", sequence_end=True, sequence_version=7), metadata=BEARER
        )
    assert refused.value.code() is grpc.StatusCode.ABORTED
    assert "is at version 1" in refused.value.details()
    # What ABORTED says: not applied. The END sent again at the version named ends it.
    answer = inference.ModelInfer(
        sensor_step("end-refused", sequence_end=True, sequence_version=1), metadata=BEARER
    )
    assert answer.parameters["sequence_version"].int64_param == 2


NOT_A_MESSAGE = b"\xff\xff\xff"
"""A field tag with no end: no protobuf message parses from it."""


@pytest.mark.parametrize(
    ("method", "credentials"),
    [
        ("/grpc.health.v1.Health/Check", ()),
        ("/inference.GRPCInferenceService/ServerLive", ()),
        ("/inference.GRPCInferenceService/ModelMetadata", BEARER),
        ("/inference.GRPCInferenceService/RepositoryModelLoad", BEARER),
    ],
)
def test_bytes_that_are_not_the_request_are_invalid_argument_on_every_method(
    channel, method: str, credentials
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(method)(NOT_A_MESSAGE, metadata=credentials, timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
