"""The real server with TLS and mutual TLS on its gRPC port, as Triton's clients reach it
(tritonclient with `ssl=True`, perf_analyzer with `--ssl-grpc-*`), our own client and CLI; its
certificate rotated under it; its metrics on another interface; its state in a TLS Redis that
asks for a password.

Certificates come from throwaway CAs (tests/certs.py); outputs are checked against the
committed graph run in-process, as in test_golden.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from rnnserve.client import SequenceClient
from tests.api.conftest import OUTPUTS, Reference, Stream, infer_input, sequence_data
from tests.api.test_perf_analyzer import run_perf_analyzer
from tests.certs import Authority, Issued, replace
from tests.conftest import run_cli
from tests.redis_server import RedisTls, start_redis
from tests.server import RunningServer, serving

MODEL = "sensor_gru"


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    """A client certificate the server's client CA issued (CN alice)."""
    other: Authority
    stranger: Issued
    """A client certificate from the other CA."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority("rnnserve-ca", folder / "ca")
    other = Authority("other-ca", folder / "other")
    return Pki(
        ca,
        ca.issue("rnnserve"),
        ca.issue("alice", client=True),
        other,
        other.issue("mallory", client=True),
    )


@pytest.fixture(scope="module")
def mtls_server(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, serving_transport: str
) -> Iterator[RunningServer]:
    with serving(
        tmp_path_factory.mktemp("mtls"),
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca.path),
        "--metrics-host", "127.0.0.2",
        transport=serving_transport,
    ) as running:  # fmt: skip
        yield running


def tls_client(
    server: RunningServer, root: Path, client: Issued | None = None
) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        server.target,
        ssl=True,
        root_certificates=str(root),
        private_key=str(client.key) if client else None,
        certificate_chain=str(client.cert) if client else None,
    )


def stream_sequence(
    client: triton.InferenceServerClient,
    sequence_id: int,
    x: np.ndarray,
    cuts: list[int],
    end: bool = True,
) -> np.ndarray:
    """`x` [1, T, ...] sent as one sequence in parts ending at `cuts` (the last ends it, with
    `end`); the outputs joined."""
    stream = Stream(client)
    try:
        for part, (start, stop) in enumerate(zip([0, *cuts], cuts, strict=False)):
            client.async_stream_infer(
                MODEL,
                [infer_input(MODEL, x[:, start:stop])],
                request_id=str(part),
                sequence_id=sequence_id,
                sequence_start=part == 0,
                sequence_end=end and stop == cuts[-1],
            )
        results = stream.collect(len(cuts))
    finally:
        stream.close()
    outputs = []
    for part in range(len(cuts)):
        result, error = results[str(part)]
        assert error is None, error
        outputs.append(result.as_numpy(OUTPUTS[MODEL]))
    return np.concatenate(outputs, axis=1)


def health_status(server: RunningServer, pki: Pki) -> str:
    """grpc.health.v1 over TLS with the client certificate, as a mesh or a load balancer asks."""
    credentials = grpc.ssl_channel_credentials(
        pki.ca.pem, pki.client.key.read_bytes(), pki.client.cert.read_bytes()
    )
    with grpc.secure_channel(server.target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_sequence_streams_over_mutual_tls(mtls_server, pki, reference: Reference) -> None:
    x = sequence_data(MODEL, 12, np.random.default_rng(13))
    with tls_client(mtls_server, pki.ca.path, pki.client) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        outputs = stream_sequence(client, 4242, x, [3, 4, 9, 12])
    np.testing.assert_allclose(outputs, reference.run(MODEL, x), rtol=1e-5, atol=1e-5)
    assert health_status(mtls_server, pki) == "SERVING"


@pytest.mark.parametrize(
    "who", ["no-certificate", "another-ca", "plain-text", "server-not-trusted"]
)
def test_clients_without_a_trusted_certificate_are_refused(mtls_server, pki, who) -> None:
    clients = {
        "no-certificate": lambda: tls_client(mtls_server, pki.ca.path),
        "another-ca": lambda: tls_client(mtls_server, pki.ca.path, pki.stranger),
        "plain-text": lambda: triton.InferenceServerClient(mtls_server.target),
        # The client's own certificate is good, but it trusts another CA than the server's.
        "server-not-trusted": lambda: tls_client(mtls_server, pki.other.path, pki.client),
    }
    with clients[who]() as client, pytest.raises(InferenceServerException) as refused:
        client.is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    with tls_client(mtls_server, pki.ca.path, pki.client) as trusted:
        assert trusted.is_server_live()


def test_perf_analyzer_over_mutual_tls(mtls_server, pki, tmp_path) -> None:
    per_second = run_perf_analyzer(
        tmp_path / "report.csv",
        "-m", MODEL, "-i", "grpc", "-u", mtls_server.target,
        "--streaming", "--shape", "reading:1,1", "--input-data", "random",
        "--sequence-length", "8", "--concurrency-range", "2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "100",
        "--stability-percentage", "100", "--max-trials", "3",
        "--ssl-grpc-use-ssl",
        "--ssl-grpc-root-certifications-file", str(pki.ca.path),
        "--ssl-grpc-private-key-file", str(pki.client.key),
        "--ssl-grpc-certificate-chain-file", str(pki.client.cert),
    )  # fmt: skip
    assert per_second > 0


def test_metrics_stay_plain_http_on_their_own_interface(mtls_server) -> None:
    assert "rnnserve_request_duration_seconds" in mtls_server.scrape("127.0.0.2")
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{mtls_server.ports.metrics}/metrics", timeout=5)


def test_generate_over_mutual_tls(mtls_server, pki) -> None:
    tls = ["--tls-ca", str(pki.ca.path)]
    client = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    generate = ["generate", "def ", "--url", mtls_server.target, "--length", "8"]
    done = run_cli(*generate, *tls, *client, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout.rstrip("\n")) == 12
    refused = run_cli(*generate, timeout=60)  # plain text against TLS
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr and "--tls-ca" in refused.stderr


def test_unusable_tls_files_stop_the_start_with_a_message(pki) -> None:
    other = pki.ca.issue("not-the-server")
    done = run_cli(
        "serve", "--grpc-port", "0", "--metrics-port", "off",
        "--tls-cert", str(pki.server.cert), "--tls-key", str(other.key), timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"--tls-key {other.key} is not the key of the certificate" in done.stderr
    assert "Traceback" not in done.stderr
    alone = run_cli("serve", "--tls-cert", str(pki.server.cert), timeout=60)
    assert alone.returncode == 2 and "--tls-cert and --tls-key go together" in alone.stderr


def test_a_rotated_certificate_reaches_new_connections_only(
    pki, tmp_path, reference, serving_transport: str
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "tls.crt", served / "tls.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    successor = Authority("successor-ca", tmp_path / "successor")
    renewed = successor.issue("rnnserve")
    x = sequence_data(MODEL, 8, np.random.default_rng(5))
    expected = reference.run(MODEL, x)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    with serving(tmp_path / "server", *tls, transport=serving_transport) as server:
        with tls_client(server, pki.ca.path) as before:
            assert before.is_server_live()
            replace(key, renewed.key.read_bytes())
            replace(cert, renewed.cert.read_bytes())
            # The connection opened before keeps its certificate and its sequence.
            np.testing.assert_allclose(
                stream_sequence(before, 77, x, [3, 8]), expected, rtol=1e-5, atol=1e-5
            )
        with tls_client(server, pki.ca.path) as stale, pytest.raises(InferenceServerException):
            stale.is_server_live(client_timeout=10)
        with SequenceClient(server.target, MODEL, ssl=True, root_certificates=successor.path) as c:
            outputs = [c.step(x[0, :5]), c.step(x[0, 5:])]
        np.testing.assert_allclose(np.concatenate(outputs), expected[0], rtol=1e-5, atol=1e-5)
        # Half a rotation (a certificate whose key has not come yet) keeps the last whole pair.
        replace(cert, pki.server.cert.read_bytes())
        with tls_client(server, successor.path) as after:
            assert after.is_server_live()
        assert "is not the key of the certificate" in server.log_text()


def test_state_in_a_tls_redis_with_a_password_from_the_environment(
    pki, tmp_path, reference
) -> None:
    password = "pa$$ word/@"
    redis = start_redis(
        tmp_path / "redis",
        "--requirepass", password,
        tls=RedisTls(pki.server.cert, pki.server.key, pki.ca.path),
    )  # fmt: skip
    store = ("--state-store", redis.url, "--state-store-ca", str(pki.ca.path))
    try:
        env = {"RNNSERVE_STATE_STORE_PASSWORD": password}
        x = sequence_data(MODEL, 4, np.random.default_rng(3))
        with serving(tmp_path / "server", *store, env=env) as server:
            with triton.InferenceServerClient(server.target) as client:
                outputs = stream_sequence(client, 99, x, [2, 4], end=False)
            np.testing.assert_allclose(
                outputs, reference.run(MODEL, x)[:, :4], rtol=1e-5, atol=1e-5
            )
            # Each step's state is in Redis before its answer (durability step).
            assert redis.client(password=password).exists(f"rnnserve:{MODEL}:1:-:i99") == 1
            assert "state store rediss://127.0.0.1" in server.log_text()
        started = time.monotonic()
        refused = run_cli("serve", "--grpc-port", "0", "--metrics-port", "off", *store, timeout=60)
        assert refused.returncode == 1
        assert "refused the login" in refused.stderr and "Traceback" not in refused.stderr
        assert time.monotonic() - started < 30
    finally:
        redis.stop()


def test_client_library_over_mutual_tls_with_a_token(mtls_server, pki) -> None:
    from rnnserve.client import SyncClient, Unavailable

    x = np.linspace(20, 27, 8, dtype=np.float32)[None, :, None]
    options = {"root_certificates": pki.ca.path, "token": "not-checked-yet"}
    certificate = {"private_key": pki.client.key, "certificate_chain": pki.client.cert}
    with SyncClient(mtls_server.target, **options, **certificate) as client:
        with client.session(MODEL) as session:
            streamed = np.concatenate([session.step(x[:, :3]), session.step(x[:, 3:])], axis=1)
    # The same steps in one request, from the zero state: streaming changed nothing.
    with SyncClient(mtls_server.target, **options, **certificate) as client:
        with client.session(MODEL, explicit_state=True) as whole:
            np.testing.assert_allclose(streamed, whole.step(x), rtol=1e-5, atol=1e-5)
    with SyncClient(mtls_server.target, **options) as anonymous, pytest.raises(Unavailable):
        anonymous.health()  # no client certificate: the handshake fails


def test_a_failed_tls_handshake_is_told_as_one(mtls_server, pki) -> None:
    health = ["health", "--url", mtls_server.target]
    untrusted = run_cli(*health, "--tls-ca", str(pki.other.path), timeout=60)
    assert untrusted.returncode == 1
    assert "the TLS handshake failed" in untrusted.stderr, untrusted.stderr
    assert "--tls-ca" in untrusted.stderr
    assert "running there" not in untrusted.stderr
    # One line, as every failure of a command: none of gRPC's own ("I1207 ... Handshake failed").
    assert len(untrusted.stderr.splitlines()) == 1, untrusted.stderr
