"""The gRPC port's TLS files: checked at start with messages that name the file, reloaded when
they change, and the client certificate's identity as a handler reads it from the auth context.

The handshakes are real: an in-process grpc.aio server with the credentials `CertificateFiles`
builds, and grpc clients on loopback.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rnnserve.errors import UnusableCredentials
from rnnserve.tls import CertificateFiles, ClientIdentity, TlsFiles, client_identity
from tests.certs import Authority, Issued, replace


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Authority, Issued, Issued]:
    ca = Authority("test-ca", tmp_path / "ca")
    served = tmp_path / "served"
    served.mkdir()
    issued = ca.issue("server")
    files = Issued(served / "tls.crt", served / "tls.key")
    shutil.copy(issued.cert, files.cert)
    shutil.copy(issued.key, files.key)
    return ca, files, ca.issue("alice", client=True, uri="spiffe://example.org/alice")


def test_unusable_files_are_named(pki, tmp_path) -> None:
    ca, files, client = pki
    other = ca.issue("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (TlsFiles(tmp_path / "missing.pem", files.key), r"--tls-cert .*missing\.pem: cannot read"),
        (TlsFiles(files.cert, other.key), r"--tls-key .*other\.key is not the key of the cert"),
        (TlsFiles(garbage, files.key), r"--tls-cert .*garbage\.pem: no PEM certificate"),
        (TlsFiles(files.cert, files.cert), r"--tls-key .*tls\.crt: no PEM private key"),
        (TlsFiles(files.cert, files.key, garbage), r"--tls-client-ca .*garbage\.pem: no PEM CA"),
    ]
    for tls_files, message in cases:
        with pytest.raises(UnusableCredentials, match=message):
            CertificateFiles(tls_files)
    assert CertificateFiles(TlsFiles(files.cert, files.key, ca.path)).mutual


def test_fetch_answers_only_a_whole_new_pair(pki, tmp_path, caplog) -> None:
    ca, files, _ = pki
    certificates = CertificateFiles(TlsFiles(files.cert, files.key))
    assert certificates.fetch() is None  # unchanged: gRPC keeps what it has
    renewed = ca.issue("server-renewed")
    replace(files.cert, renewed.cert.read_bytes())  # the new certificate, its key not yet
    assert certificates.fetch() is None
    assert "is not the key of the certificate" in caplog.text
    replace(files.key, renewed.key.read_bytes())
    assert certificates.fetch() is not None
    assert certificates.fetch() is None


def test_client_identity_of_an_auth_context() -> None:
    assert client_identity({"transport_security_type": [b"ssl"]}) is None
    context = {
        "x509_common_name": [b"alice"],
        "x509_subject_alternative_name": [b"spiffe://example.org/alice", b"alice.example.org"],
    }
    assert client_identity(context) == ClientIdentity(
        "alice", ("spiffe://example.org/alice", "alice.example.org")
    )


def test_the_principal_of_a_certificate_is_its_common_name_else_its_first_san() -> None:
    assert ClientIdentity("alice", ("spiffe://example.org/bob",)).principal == "alice"
    assert ClientIdentity(None, ("spiffe://example.org/bob", "b")).principal == (
        "spiffe://example.org/bob"
    )
    assert ClientIdentity("", ()).principal is None


class IdentityHealth(health.aio.HealthServicer):
    """Health that records who called: where an auth layer reads the caller's certificate."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[ClientIdentity | None] = []

    async def Check(self, request, context):  # noqa: N802 (gRPC's name)
        self.callers.append(client_identity(context.auth_context()))
        return await super().Check(request, context)


@pytest.fixture
async def mutual_server(pki) -> AsyncIterator[tuple[int, IdentityHealth, CertificateFiles]]:
    ca, files, _ = pki
    certificates = CertificateFiles(TlsFiles(files.cert, files.key, ca.path))
    server = grpc.aio.server()
    servicer = IdentityHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", certificates.credentials())
    await server.start()
    try:
        yield port, servicer, certificates
    finally:
        await server.stop(None)


def check(port: int, root: bytes, client: Issued | None = None) -> str:
    """One health check on a new channel: SERVING, or the status code of the failure."""
    key = client.key.read_bytes() if client else None
    chain = client.cert.read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials(root, key, chain)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_the_verified_client_certificate_reaches_the_handler(mutual_server, pki) -> None:
    port, servicer, _ = mutual_server
    ca, _, alice = pki
    assert await asyncio.to_thread(check, port, ca.pem, alice) == "SERVING"
    assert servicer.callers == [ClientIdentity("alice", ("spiffe://example.org/alice",))]
    assert await asyncio.to_thread(check, port, ca.pem) == "UNAVAILABLE"  # no certificate
    assert len(servicer.callers) == 1


async def test_rotation_reaches_new_connections(mutual_server, pki, tmp_path) -> None:
    port, _, _ = mutual_server
    ca, files, alice = pki
    successor = Authority("successor-ca", tmp_path / "successor")
    renewed = successor.issue("server")
    replace(files.key, renewed.key.read_bytes())
    replace(files.cert, renewed.cert.read_bytes())
    assert await asyncio.to_thread(check, port, successor.pem, alice) == "SERVING"
    assert await asyncio.to_thread(check, port, ca.pem, alice) == "UNAVAILABLE"


async def test_a_new_client_ca_reaches_new_connections(mutual_server, pki, tmp_path) -> None:
    port, _, _ = mutual_server
    ca, _, alice = pki
    successor = Authority("clients-successor", tmp_path / "clients")
    bob = successor.issue("bob", client=True)
    assert await asyncio.to_thread(check, port, ca.pem, bob) == "UNAVAILABLE"
    # The bundle during a client CA's rollover: the old CA and the new one.
    replace(mutual_server[2].files.client_ca, ca.pem + successor.pem)
    assert await asyncio.to_thread(check, port, ca.pem, bob) == "SERVING"
    assert await asyncio.to_thread(check, port, ca.pem, alice) == "SERVING"
