"""The native transport as an operator meets it: built wherever cargo is, chosen by default and
named on the start line, grpc.aio still there (`--transport grpcio`, or where the extension is
missing); and what it decides itself: many streams on one connection, requests crossing into
Python in batches."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from rnnserve._pb import grpc_service_pb2 as pb
from tests.api.conftest import MODELS, infer_input, sequence_data
from tests.conftest import NATIVE_BUILT, ROOT
from tests.server import serving

pytestmark = pytest.mark.skipif(not NATIVE_BUILT, reason="the native transport is not built")

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
WITHOUT_NATIVE = (
    "import sys; sys.modules['rnnserve_native'] = None; "  # its import now fails
    "from rnnserve.cli import main; sys.exit(main(sys.argv[1:]))"
)
"""`rnnserve` run as where the extension is not installed."""


def test_the_native_transport_is_built_wherever_cargo_is() -> None:
    """`make install` and `make test` build it where cargo is present: a build that silently
    fell back to grpc.aio would leave every native test skipped."""
    assert shutil.which("cargo") is not None
    assert NATIVE_BUILT


def start_line(log: str) -> str:
    (line,) = (row for row in log.splitlines() if " msg=serving " in row)
    return line


def test_the_native_transport_serves_by_default_and_grpcio_on_request(tmp_path: Path) -> None:
    for transport, flags in (("native", ()), ("grpcio", ("--transport", "grpcio"))):
        with serving(tmp_path / transport, *flags) as server:
            with triton.InferenceServerClient(server.target) as client:
                assert client.is_server_ready()
            assert f" transport={transport} " in start_line(server.log_text())


def test_without_the_extension_auto_serves_through_grpcio(tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_NATIVE, "serve", "--grpc-port", "0",
         "--metrics-port", "off", "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), process.communicate(timeout=10)[0]
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert " transport=grpcio " in start_line(output), output


def test_without_the_extension_asking_for_it_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_NATIVE, "serve", "--transport", "native"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "RNNSERVE_GRPC_PORT": "0"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--transport native: the native transport is not installed" in done.stderr
    assert "--transport grpcio" in done.stderr
    assert "Traceback" not in done.stderr


def request(sequence_id: int, x: np.ndarray, start: bool) -> bytes:
    message = pb.ModelInferRequest(model_name="sensor_gru", id=str(sequence_id))
    message.inputs.add(name="reading", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    message.parameters["sequence_id"].int64_param = sequence_id
    message.parameters["sequence_start"].bool_param = start
    return message.SerializeToString()


async def test_hundreds_of_streams_share_one_connection(server) -> None:
    """HTTP/2 limits the streams open at once on a connection; the client library puts every
    session of a client on one connection (hyper's default limit, 200, would hold the rest)."""
    streams, steps = 300, 3
    rng = np.random.default_rng(31)
    data = {sid: sequence_data("sensor_gru", steps, rng) for sid in range(90_000, 90_000 + streams)}
    async with grpc.aio.insecure_channel(server.target) as channel:
        method = channel.stream_stream(
            STREAM,
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        calls = {sid: method() for sid in data}  # all open before any is answered
        for step in range(steps):
            for sid, call in calls.items():
                await call.write(request(sid, data[sid][:, step : step + 1], step == 0))
            answers = await asyncio.wait_for(
                asyncio.gather(*(call.read() for call in calls.values())), 60
            )
            assert all(not a.error_message for a in answers), [a.error_message for a in answers]
        for call in calls.values():
            await call.done_writing()


def handoffs(server) -> tuple[float, float]:
    """(requests, crossings) of rnnserve_transport_handoff_requests."""
    found = {}
    for row in server.scrape().splitlines():
        for part in ("sum", "count"):
            if row.startswith(f"rnnserve_transport_handoff_requests_{part} "):
                found[part] = float(row.split()[-1])
    return found["sum"], found["count"]


def test_concurrent_requests_cross_into_python_in_batches(server) -> None:
    """64 closed loops: what arrives while the engine works crosses with one wake-up."""
    before = handoffs(server)

    def one_sequence(sid: int) -> None:
        x = sequence_data(MODELS[1], 20, np.random.default_rng(sid))
        with triton.InferenceServerClient(server.target) as client:
            for step in range(x.shape[1]):
                client.infer(
                    MODELS[1],
                    [infer_input(MODELS[1], x[:, step : step + 1])],
                    sequence_id=sid,
                    sequence_start=step == 0,
                    sequence_end=step == x.shape[1] - 1,
                )

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one_sequence, range(91_000, 91_064)))
    requests, crossings = (a - b for a, b in zip(handoffs(server), before, strict=True))
    assert requests >= 64 * 20
    assert requests / crossings > 2, (requests, crossings)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process `pid` has spent, all its threads (/proc, man 5
    proc: utime and stime, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lone_sequence(target: str, x: np.ndarray) -> list[np.ndarray]:
    """The forecasts of `x` [1, T, 1] as one sequence over unary calls, then as another over a
    stream, one step in flight at a time (a lone sequence)."""
    answers: list[np.ndarray] = []
    streamed: list[object] = []
    with triton.InferenceServerClient(target) as client:
        for step in range(x.shape[1]):
            result = client.infer(
                MODELS[1],
                [infer_input(MODELS[1], x[:, step : step + 1])],
                sequence_id=7,
                sequence_start=step == 0,
                sequence_end=step == x.shape[1] - 1,
            )
            answers.append(result.as_numpy("forecast"))
        client.start_stream(lambda result, error: streamed.append(error or result))
        for step in range(x.shape[1]):
            client.async_stream_infer(
                MODELS[1],
                [infer_input(MODELS[1], x[:, step : step + 1])],
                sequence_id=8,
                sequence_start=step == 0,
                sequence_end=step == x.shape[1] - 1,
            )
            deadline = time.monotonic() + 10
            while len(streamed) <= step and time.monotonic() < deadline:
                time.sleep(0.0005)
        client.stop_stream()
    for result in streamed:
        assert isinstance(result, triton.InferResult), result
        answers.append(result.as_numpy("forecast"))
    return answers


def test_spinning_changes_when_threads_sleep_not_what_is_answered(tmp_path: Path) -> None:
    """--native-spin-us: a lone sequence, unary and over a stream, gets the same outputs with
    spinning off and on, and once its requests stop the spinning server sleeps (a thread left
    spinning would spend a CPU second per second)."""
    x = sequence_data(MODELS[1], 30, np.random.default_rng(5))
    outputs: dict[str, list[np.ndarray]] = {}
    idle: dict[str, float] = {}
    for spin in ("0", "300"):
        with serving(tmp_path / spin, "--native-spin-us", spin) as server:
            outputs[spin] = lone_sequence(server.target, x)
            time.sleep(0.3)
            before = cpu_seconds(server.process.pid)
            time.sleep(1.0)
            idle[spin] = cpu_seconds(server.process.pid) - before
    assert len(outputs["300"]) == 2 * x.shape[1]
    for off, on in zip(outputs["0"], outputs["300"], strict=True):
        np.testing.assert_array_equal(off, on)
    np.testing.assert_array_equal(outputs["300"][: x.shape[1]], outputs["300"][x.shape[1] :])
    assert idle["300"] < 0.2, idle
