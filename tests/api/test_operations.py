"""What operators rely on: metrics, health, reflection, metadata, settings and a clean drain."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.api.conftest import infer_input
from tests.server import start_server

METRICS = [
    "rnnserve_requests_total",
    "rnnserve_request_duration_seconds_bucket",
    "rnnserve_batch_size_bucket",
    "rnnserve_live_sequences",
    "rnnserve_state_memory_bytes",
    "rnnserve_sequence_capacity",
    "rnnserve_sequence_starts_total",
    "rnnserve_sequence_ends_total",
    "rnnserve_sequence_evictions_total",
    "rnnserve_model_info",
]


def value(scrape: str, prefix: str) -> float:
    rows = [r for r in scrape.splitlines() if r.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return float(rows[0].rsplit(" ", 1)[1])


def test_prometheus_scrape(server, client) -> None:
    rows = np.zeros((1, 1, 8), np.float32)
    # Labelled series appear with their first request.
    client.infer(
        "digits_lstm",
        [infer_input("digits_lstm", rows)],
        sequence_id=300,
        sequence_start=True,
        sequence_end=True,
    )
    before = server.scrape()
    for name in METRICS:
        assert f"\n{name}" in before, name
    live = 'rnnserve_live_sequences{model="digits_lstm",version="1"}'
    ok = 'rnnserve_requests_total{model="digits_lstm",outcome="OK",version="1"}'
    compute = 'rnnserve_request_duration_seconds_count{model="digits_lstm",stage="compute",'
    live_before, ok_before = value(before, live), value(before, ok)
    for sid in (301, 302):
        client.infer(
            "digits_lstm", [infer_input("digits_lstm", rows)], sequence_id=sid, sequence_start=True
        )
    after = server.scrape()
    assert value(after, live) == live_before + 2
    assert value(after, ok) == ok_before + 2
    assert value(after, compute) >= 2
    state_bytes = value(after, 'rnnserve_state_memory_bytes{model="digits_lstm",version="1"}')
    assert state_bytes == value(after, live) * 2 * 128 * 4
    assert (
        'rnnserve_model_info{model="digits_lstm",provider="CPUExecutionProvider",version="1"}'
        in after
    )
    # Sub-millisecond buckets exist for single steps.
    assert 'le="0.0001"' in after
    for sid in (301, 302):
        client.infer(
            "digits_lstm", [infer_input("digits_lstm", rows)], sequence_id=sid, sequence_end=True
        )
    assert value(server.scrape(), live) == live_before


def test_failed_requests_are_counted_by_status(server, client) -> None:
    with pytest.raises(InferenceServerException):
        client.infer(
            "sensor_gru",
            [infer_input("sensor_gru", np.zeros((1, 1, 1), np.float32))],
            sequence_id=123456789,
        )
    scrape = server.scrape()
    assert 'outcome="INVALID_ARGUMENT"' in scrape
    assert "sequence_id" not in scrape  # never a sequence id as a label


def test_health_and_reflection(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        status = health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        ).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        assert "grpc.health.v1.Health" in names


def test_server_metadata_and_statistics(client) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "rnnserve"
    assert {"sequence", "statistics", "model_repository", "model_configuration"} <= set(
        metadata.extensions
    )
    client.infer(
        "sensor_gru",
        [infer_input("sensor_gru", np.ones((1, 2, 1), np.float32))],
        sequence_id=5150,
        sequence_start=True,
        sequence_end=True,
    )
    (stats,) = client.get_inference_statistics("sensor_gru").model_stats
    assert stats.version == "1"
    assert stats.inference_stats.success.count >= 1
    assert stats.inference_stats.queue.count == stats.inference_stats.compute_infer.count
    assert stats.execution_count >= 1 and stats.inference_count >= stats.execution_count


def test_sigterm_drains_and_exits(tmp_path) -> None:
    server = start_server(tmp_path, "--shutdown-grace-s", "10")
    with triton.InferenceServerClient(server.target) as client:
        x = np.zeros((1, 1, 1), np.float32)
        client.infer(
            "sensor_gru", [infer_input("sensor_gru", x)], sequence_id=1, sequence_start=True
        )
        results = []

        def keep_going() -> None:
            for _ in range(200):
                try:
                    client.infer("sensor_gru", [infer_input("sensor_gru", x)], sequence_id=1)
                    results.append("ok")
                except Exception as error:  # noqa: BLE001 - the drain's answers are the point
                    results.append(str(error))
                    return

        worker = threading.Thread(target=keep_going)
        worker.start()
        deadline = time.monotonic() + 30
        while not results:  # requests are flowing
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        worker.join(30)
    log = server.log_text()
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log
    assert results and results[0] == "ok"


def test_serve_help_documents_every_setting(cli) -> None:
    done = cli("serve", "--help")
    assert done.returncode == 0
    for flag, env in [
        ("--grpc-port", "RNNSERVE_GRPC_PORT"),
        ("--metrics-port", "RNNSERVE_METRICS_PORT"),
        ("--host", "RNNSERVE_HOST"),
        ("--model-repository", "RNNSERVE_MODEL_REPOSITORY"),
        ("--max-queue-delay-us", "RNNSERVE_MAX_QUEUE_DELAY_US"),
    ]:
        assert flag in done.stdout and env in done.stdout


def test_bad_settings_fail_cleanly(cli, tmp_path) -> None:
    done = cli("serve", "--grpc-port", "eighty")
    assert done.returncode == 2 and "--grpc-port" in done.stderr and "Traceback" not in done.stderr
    done = cli(
        "serve",
        "--grpc-port",
        "0",
        "--metrics-port",
        "off",
        "--model-repository",
        str(tmp_path / "missing"),
    )
    assert done.returncode == 1, done.stderr
    assert "is not a directory" in done.stderr and "Traceback" not in done.stderr


def test_json_logs_are_json_from_the_first_line(tmp_path) -> None:
    """What a log collector reads of a container: every line one JSON object, ONNX Runtime's
    own start-up warnings included (they would come first, coloured, on stderr)."""
    server = start_server(tmp_path, "--log-format", "json", "--metrics-port", "off")
    try:
        with triton.InferenceServerClient(server.target) as client:
            assert client.is_server_ready()
    finally:
        assert server.stop() == 0
    lines = server.log_text().splitlines()
    assert lines, "the server logged nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), line
