"""The HTTP port (the KServe v2 REST protocol, Triton's binary and sequence extensions) on a
real server: tritonclient.http unchanged, Triton's statuses and `{"error": ...}` bodies, and
hostile requests answered with a proper status while the server serves on.

The same protocol cases run against the real Triton's HTTP port in tests/conformance.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.api.conftest import INPUTS, OUTPUTS, Reference, sequence_data
from tests.conftest import NATIVE_BUILT
from tests.server import RunningServer, serving

pytestmark = pytest.mark.skipif(not NATIVE_BUILT, reason="the HTTP port is the native transport's")

MAX_MESSAGE_BYTES = 4 << 20
TOKEN = "http-token-0123"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("http")
    flags = ("--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-queue-delay-us", "500")
    with serving(workdir, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Callers present tokens, and each may send 2 requests a second (bursts of 2)."""
    workdir = tmp_path_factory.mktemp("http-guarded")
    tokens = workdir / "tokens"
    tokens.write_text(f"alice {hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    flags = ("--auth-tokens", str(tokens), "--principal-requests-per-s", "2")
    with serving(workdir, *flags, "--principal-burst", "2") as running:
        yield running


def request(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers (lower-case names), body."""
    host, port = server.http_target.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


def raw_exchange(server: RunningServer, data: bytes) -> bytes:
    """`data` written as is on a new connection, in slices, until the server answers (a server
    that refuses a body answers before it is all sent, then closes); what comes back until
    the server closes."""
    host, port = server.http_target.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            for start in range(0, len(data), 65536):
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already: what is left would only be refused
                sock.sendall(data[start : start + 65536])
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the rest was on its way
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def infer_body(sequence_id: int, start: bool, end: bool, x: np.ndarray) -> str:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "reading",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ],
            "parameters": {
                "sequence_id": sequence_id,
                "sequence_start": start,
                "sequence_end": end,
            },
        }
    )


def error_of(body: bytes) -> str:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    message: str = document["error"]
    return message


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["sensor_gru", "charlm_lstm"])
def test_tritonclient_http_runs_sequences_as_the_model_computes(
    http_server: RunningServer, reference: Reference, model: str, binary: bool
) -> None:
    x = sequence_data(model, 6, np.random.default_rng(3))
    datatype = "INT64" if x.dtype == np.int64 else "FP32"
    sequence_id = 7_000 + binary
    got = []
    with triton_http.InferenceServerClient(http_server.http_target) as client:
        for first in range(0, 6, 2):
            chunk = x[:, first : first + 2]
            tensor = triton_http.InferInput(INPUTS[model], list(chunk.shape), datatype)
            tensor.set_data_from_numpy(chunk, binary_data=binary)
            result = client.infer(
                model,
                [tensor],
                outputs=[triton_http.InferRequestedOutput(OUTPUTS[model], binary_data=binary)],
                sequence_id=sequence_id,
                sequence_start=first == 0,
                sequence_end=first == 4,
            )
            got.append(result.as_numpy(OUTPUTS[model]))
            assert result.get_response()["parameters"]["sequence_version"] == first // 2 + 1
    np.testing.assert_allclose(
        np.concatenate(got, axis=1), reference.run(model, x), rtol=1e-5, atol=1e-5
    )


def test_metadata_configuration_and_statistics_are_the_grpc_answers_as_json(
    http_server: RunningServer,
) -> None:
    with (
        triton_http.InferenceServerClient(http_server.http_target) as over_http,
        triton_grpc.InferenceServerClient(http_server.target) as over_grpc,
    ):
        assert over_http.is_server_live() and over_http.is_server_ready()
        assert over_http.is_model_ready("sensor_gru")
        assert not over_http.is_model_ready("no_such_model")
        server = over_http.get_server_metadata()
        assert server["name"] == "rnnserve"
        assert server["extensions"] == list(over_grpc.get_server_metadata().extensions)
        metadata = over_http.get_model_metadata("charlm_lstm")
        expected = over_grpc.get_model_metadata("charlm_lstm", as_json=True)
        for tensors in ("inputs", "outputs"):
            assert metadata[tensors] == [
                {**t, "shape": [int(d) for d in t["shape"]]} for t in expected[tensors]
            ]
        config = over_http.get_model_config("sensor_gru")
        grpc_config = over_grpc.get_model_config("sensor_gru").config
        assert config["max_batch_size"] == grpc_config.max_batch_size
        assert config["input"][0]["dims"] == list(grpc_config.input[0].dims)  # numbers, not strings
        assert config["sequence_batching"]["state"][0]["input_name"] == "h_in"
        before = over_http.get_inference_statistics("sensor_gru")["model_stats"][0]
        x = np.zeros((1, 1, 1), np.float32)
        status, _, _ = request(
            http_server, "POST", "/v2/models/sensor_gru/infer", infer_body(31, True, True, x)
        )
        assert status == 200
        after = over_http.get_inference_statistics("sensor_gru")["model_stats"][0]
        assert after["inference_count"] == before["inference_count"] + 1
        index = over_http.get_model_repository_index()
        assert {m["name"] for m in index} == {"charlm_lstm", "digits_lstm", "sensor_gru"}
        assert all(m["state"] == "READY" for m in index)


READINGS = {"name": "reading", "datatype": "FP32", "shape": [1, 1, 1]}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/v2/models/no_such_model", None, 404, "unknown model 'no_such_model'"),
        ("GET", "/v2/models/sensor_gru/versions/9/config", None, 404, "version 9"),
        ("GET", "/v2/models/no_such_model/ready", None, 400, "not ready"),
        ("GET", "/v2/models/sensor_gru/infer", None, 405, "Method Not Allowed"),
        ("GET", "/v2/nothing/here", None, 404, "Not Found"),
        ("POST", "/v2/models/sensor_gru/infer", "not json", 400, "not JSON"),
        ("POST", "/v2/models/sensor_gru/infer", "{}", 400, "'inputs'"),
        (
            "POST",
            "/v2/models/sensor_gru/infer",
            json.dumps({"inputs": [{**READINGS, "data": [1.0, 2.0]}]}),
            400,
            "holds 1 values, but its 'data' has 2",
        ),
        (
            "POST",
            "/v2/models/sensor_gru/infer",
            json.dumps(
                {"inputs": [{**READINGS, "data": [1.0]}], "parameters": {"sequence_id": 404}}
            ),
            400,
            "sequence 404 of model sensor_gru (version 1) is not live",
        ),
        (
            "POST",
            "/v2/models/sensor_gru/infer",
            json.dumps({"inputs": [{**READINGS, "datatype": "INT64", "data": [1]}]}),
            400,
            "must be FP32, got INT64",
        ),
        (
            "POST",
            "/v2/models/sensor_gru/infer",
            "[" * 1_000_000 + "]" * 1_000_000,
            400,
            "recursion limit",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "model-not-ready",
        "get-infer",
        "unknown-path",
        "not-json",
        "no-inputs",
        "data-shape",
        "sequence-not-live",
        "datatype",
        "nested-a-million-deep",
    ],
)
def test_errors_carry_tritons_status_and_rnnserves_message(
    http_server: RunningServer, method: str, path: str, body: str | None, status: int, says: str
) -> None:
    got, headers, answer = request(http_server, method, path, body)
    assert got == status, answer
    assert headers["content-type"] == "application/json"
    assert says in error_of(answer)


def binary_request(x: np.ndarray, size: int, extra: bytes = b"", header_extra: int = 0) -> tuple:
    header = json.dumps(
        {
            "inputs": [{**READINGS, "parameters": {"binary_data_size": size}}],
            "parameters": {"sequence_id": 77, "sequence_start": True, "sequence_end": True},
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header) + header_extra)}
    return header + x.tobytes() + extra, headers


@pytest.mark.parametrize(
    ("size", "extra", "header_extra", "says"),
    [
        (8, b"", 0, "binary_data_size is 8, but only 4 bytes"),
        (4, b"\0\0\0\0", 0, "4 bytes of binary data after"),
        (4, b"", 10_000, "Inference-Header-Content-Length is"),
        (2, b"", 0, "after the tensors' binary_data_size"),
    ],
    ids=["size-over", "bytes-left", "header-over", "size-under"],
)
def test_binary_lengths_that_lie_are_refused(
    http_server: RunningServer, size: int, extra: bytes, header_extra: int, says: str
) -> None:
    body, headers = binary_request(np.ones((1, 1, 1), np.float32), size, extra, header_extra)
    status, _, answer = request(http_server, "POST", "/v2/models/sensor_gru/infer", body, headers)
    assert status == 400
    assert says in error_of(answer)


def test_oversized_and_malformed_requests_get_a_status_and_the_server_serves_on(
    http_server: RunningServer,
) -> None:
    path = "/v2/models/sensor_gru/infer"
    # A declared length over the largest message: refused before the body is read.
    declared = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_MESSAGE_BYTES * 4}\r\n\r\n"
    ).encode()
    assert raw_exchange(http_server, declared).startswith(b"HTTP/1.1 413")
    # A chunked body that grows past it: refused once it does.
    chunk = b"x" * 65536
    chunked = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunked += (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 80 + b"0\r\n\r\n"
    answer = raw_exchange(http_server, chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-message-bytes" in answer
    # Headers past the bound: 431.
    huge = f"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 100_000}\r\n\r\n".encode()
    assert raw_exchange(http_server, huge).startswith(b"HTTP/1.1 431")
    # A compressed body it cannot read: 415, saying so.
    status, _, body = request(http_server, "POST", path, b"\x1f\x8b", {"Content-Encoding": "gzip"})
    assert status == 415 and "uncompressed" in error_of(body)
    # A valid chunked request is served.
    x = np.full((1, 1, 1), 24.0, np.float32)
    valid = infer_body(88, True, True, x).encode()
    chunked = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".encode()
    chunked += b"Connection: close\r\n\r\n" + f"{len(valid):x}\r\n".encode() + valid
    answer = raw_exchange(http_server, chunked + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    with triton_http.InferenceServerClient(http_server.http_target) as client:
        assert client.is_server_ready()


def test_tokens_guard_every_endpoint_but_health(guarded_server: RunningServer) -> None:
    status, headers, body = request(guarded_server, "GET", "/v2/models/sensor_gru")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert "token" in error_of(body)
    status, _, _ = request(
        guarded_server, "GET", "/v2", headers={"Authorization": "Bearer not-the-token"}
    )
    assert status == 401
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert request(guarded_server, "GET", path)[0] == 200
    status, _, body = request(
        guarded_server, "GET", "/v2/models/sensor_gru", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200 and json.loads(body)["name"] == "sensor_gru"
    refusals = guarded_server.counts_by_reason("rnnserve_auth_failures")
    assert refusals.get("missing", 0) >= 1 and refusals.get("unknown", 0) >= 1


def test_a_principal_over_its_rate_is_told_429_and_when_to_retry(
    guarded_server: RunningServer,
) -> None:
    x = np.zeros((1, 1, 1), np.float32)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses = []
    for n in range(6):
        body = infer_body(500 + n, True, True, x)
        status, headers, answer = request(
            guarded_server, "POST", "/v2/models/sensor_gru/infer", body, auth
        )
        statuses.append(status)
        if status == 429:
            assert "--principal-requests-per-s" in error_of(answer)
            assert int(headers["retry-after"]) >= 1
    assert 200 in statuses and 429 in statuses, statuses


def test_the_http_port_is_named_in_the_start_line_and_the_port_file(
    http_server: RunningServer,
) -> None:
    assert http_server.ports.http is not None
    assert f"http=127.0.0.1:{http_server.ports.http}" in http_server.log_text()


def test_http_port_off_serves_none(tmp_path: Path) -> None:
    with serving(tmp_path, "--http-port", "off") as running:
        assert running.ports.http is None
        assert "http=off" in running.log_text()


async def _socket_exchange(
    url: str, messages: list[str | bytes], answers: int
) -> list[aiohttp.WSMessage]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
        for message in messages:
            if isinstance(message, bytes):
                await socket.send_bytes(message)
            else:
                await socket.send_str(message)
        return [await socket.receive(timeout=30) for _ in range(answers)]


def test_a_websocket_carries_interleaved_sequences_and_answers_a_bad_step_alone(
    http_server: RunningServer, reference: Reference
) -> None:
    rng = np.random.default_rng(8)
    series = {11: sequence_data("sensor_gru", 5, rng), 12: sequence_data("sensor_gru", 5, rng)}
    messages: list[str | bytes] = []
    for t in range(5):
        for sequence_id, x in series.items():
            body = json.loads(infer_body(sequence_id, t == 0, t == 4, x[:, t : t + 1]))
            messages.append(json.dumps({**body, "id": f"{sequence_id}/{t}"}))
        if t == 2:  # a step that does not parse, and one of a sequence never started
            messages.append("{not json")
            messages.append(json.dumps({**json.loads(infer_body(13, False, False, x[:, :1])),
                                        "id": "13/0"}))  # fmt: skip
    url = f"ws://{http_server.http_target}/v2/models/sensor_gru/stream"
    received = asyncio.run(_socket_exchange(url, messages, len(messages)))
    answers = [json.loads(m.data) for m in received]
    errors = {a.get("id"): a["error"] for a in answers if "error" in a}
    assert set(errors) == {None, "13/0"}, errors
    assert errors[None].startswith("[INVALID_ARGUMENT] the request body is not JSON")
    assert errors["13/0"].startswith("[INVALID_ARGUMENT] sequence 13 of model sensor_gru")
    by_id = {a["id"]: a for a in answers if "error" not in a}
    for sequence_id, x in series.items():
        got = np.concatenate(
            [
                np.asarray(by_id[f"{sequence_id}/{t}"]["outputs"][0]["data"], np.float32)
                for t in range(5)
            ]
        ).reshape(1, 5, 1)
        np.testing.assert_allclose(got, reference.run("sensor_gru", x), rtol=1e-5, atol=1e-5)
        versions = [by_id[f"{sequence_id}/{t}"]["parameters"]["sequence_version"] for t in range(5)]
        assert versions == [1, 2, 3, 4, 5]


def test_a_websocket_takes_binary_steps_and_answers_binary_when_asked(
    http_server: RunningServer, reference: Reference
) -> None:
    x = sequence_data("sensor_gru", 3, np.random.default_rng(9))
    messages: list[str | bytes] = []
    for t in range(3):
        header = json.dumps(
            {
                "inputs": [{**READINGS, "parameters": {"binary_data_size": 4}}],
                "parameters": {"sequence_id": 21, "sequence_start": t == 0, "sequence_end": t == 2},
            }
        ).encode()
        messages.append(len(header).to_bytes(4, "little") + header + x[:, t].tobytes())
    target = http_server.http_target
    url = f"ws://{target}/v2/models/sensor_gru/stream?binary_data_output=true"
    received = asyncio.run(_socket_exchange(url, messages, 3))
    got = []
    for message in received:
        assert message.type == aiohttp.WSMsgType.BINARY
        n = int.from_bytes(message.data[:4], "little")
        header = json.loads(message.data[4 : 4 + n])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 4
        got.append(np.frombuffer(message.data[4 + n :], np.float32))
    np.testing.assert_allclose(
        np.concatenate(got).reshape(1, 3, 1), reference.run("sensor_gru", x), rtol=1e-5, atol=1e-5
    )


def test_a_websocket_authenticates_at_connect_time(guarded_server: RunningServer) -> None:
    url = f"ws://{guarded_server.http_target}/v2/models/sensor_gru/stream"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(_socket_exchange(url, [], 0))
    assert refused.value.status == 401
    step = infer_body(31, True, True, np.zeros((1, 1, 1), np.float32))
    (answer,) = asyncio.run(_socket_exchange(f"{url}?access_token={TOKEN}", [step], 1))
    assert json.loads(answer.data)["outputs"][0]["name"] == "forecast"


def test_requests_are_counted_by_the_protocol_that_carried_them(
    http_server: RunningServer,
) -> None:
    def counts() -> dict[str, float]:
        prefix = 'rnnserve_requests_by_protocol_total{protocol="'
        return {
            row[len(prefix) :].split('"')[0]: float(row.split()[-1])
            for row in http_server.scrape().splitlines()
            if row.startswith(prefix)
        }

    before = counts()
    x = np.zeros((1, 1, 1), np.float32)
    path = "/v2/models/sensor_gru/infer"
    assert request(http_server, "POST", path, infer_body(41, True, True, x))[0] == 200
    url = f"ws://{http_server.http_target}/v2/models/sensor_gru/stream"
    steps = [infer_body(42, True, False, x), infer_body(42, False, True, x)]
    asyncio.run(_socket_exchange(url, steps, 2))
    with triton_grpc.InferenceServerClient(http_server.target) as client:
        tensor = triton_grpc.InferInput("reading", [1, 1, 1], "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("sensor_gru", [tensor], sequence_id=43, sequence_start=True, sequence_end=True)
    after = counts()
    assert after["http"] - before.get("http", 0) == 1
    assert after["websocket"] - before.get("websocket", 0) == 2
    assert after["grpc"] - before.get("grpc", 0) == 1


def test_a_caller_refused_authentication_is_answered_before_its_body_is_read(
    guarded_server: RunningServer,
) -> None:
    host, port = guarded_server.http_target.split(":")
    head = (
        b"POST /v2/models/sensor_gru/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"{" * 1000)  # the rest of the body never comes
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_slow_clients_are_let_go_on_time_while_others_are_served(
    tmp_path: Path,
) -> None:
    """--http-header-timeout-s and --http-body-timeout-s: a connection that stops mid-headers is
    closed (as hyper does, unanswered), one that stops mid-body is answered 408, once their
    time is up (here 0.5 s, against defaults of 10 and 60); a client that sends its request
    whole is served meanwhile."""
    flags = ("--http-header-timeout-s", "0.5", "--http-body-timeout-s", "0.5")
    with serving(tmp_path, *flags) as server:
        host, port = server.http_target.split(":")
        head = b"POST /v2/models/sensor_gru/infer HTTP/1.1\r\nHost: x\r\n"
        body = infer_body(3, True, True, np.ones((1, 1, 1), np.float32)).encode()
        whole = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        slow = [socket.create_connection((host, int(port)), timeout=30) for _ in range(12)]
        started = time.monotonic()
        try:
            for k, sock in enumerate(slow):
                # Half stop inside their headers, half after them, inside their bodies.
                sock.sendall(head if k % 2 == 0 else head + whole + body[:10])
            infer = "/v2/models/sensor_gru/infer"
            status, _, answer = request(server, "POST", infer, body.decode())
            assert status == 200, answer
            answers = []
            for sock in slow:
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
                answers.append(received)
            waited = time.monotonic() - started
        finally:
            for sock in slow:
                sock.close()
    assert waited < 8, f"slow connections were held {waited:.1f} s"
    assert answers[0::2] == [b""] * 6, answers[0::2]
    for received in answers[1::2]:
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert b"the body did not arrive within 0.5 s" in received, received
