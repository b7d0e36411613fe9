"""The grpc.aio transport: the gRPC port served by Python's grpcio, for platforms without the
native extension (`--transport grpcio`).

Authentication is an interceptor (`api.auth`), requests that do not parse are INVALID_ARGUMENT
(`api.parsing`), health is gRPC's own servicer with names bounded (`api.health`), TLS reloads
its files through gRPC's dynamic credentials (`rnnserve.tls`).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.api.auth import Authentication
from rnnserve.api.health import HealthServicer
from rnnserve.api.parsing import register
from rnnserve.api.servicer import SERVICE_NAME, InferenceServicer, add_to_server
from rnnserve.auth import TokenFile
from rnnserve.config import Settings
from rnnserve.metrics import Metrics
from rnnserve.tls import CertificateFiles


class GrpcioFront:
    """The inference, health and reflection services on a grpc.aio server."""

    name = "grpcio"

    def __init__(
        self,
        servicer: InferenceServicer,
        settings: Settings,
        tokens: TokenFile | None,
        tls: CertificateFiles | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.health = HealthServicer()
        size = settings.max_message_bytes
        interceptors = []
        if settings.authenticates:
            interceptors.append(
                Authentication(
                    tokens,
                    settings.tls_client_ca is not None,
                    lambda why: metrics.refused_authentication(why.value),
                )
            )
        self._tls = tls
        self._server = grpc.aio.server(
            interceptors=interceptors or None,  # none: gRPC's path without interceptors
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
                # gRPC cancels calls beyond 1,000 waiting to be picked up; a server built to
                # hold thousands of concurrent sequences must not.
                ("grpc.server.max_pending_requests", 65536),
            ],
        )
        add_to_server(servicer, self._server)
        register(
            self._server, lambda s: health_pb2_grpc.add_HealthServicer_to_server(self.health, s)
        )
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )

    async def start(self) -> int:
        """Listen on the settings' host and gRPC port; the port bound. OSError when it cannot
        be bound."""
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        port: int
        try:
            if self._tls is not None:
                port = self._server.add_secure_port(address, self._tls.credentials())
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as error:  # grpcio's "Failed to bind to address"
            raise OSError(f"cannot listen on {address}: {error}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        return port

    async def serve(self) -> None:
        """Health SERVING for the server and the inference service."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Health NOT_SERVING, for good."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """grpc.aio's graceful stop: no new calls, `grace_s` seconds for those in flight."""
        await self._server.stop(grace_s)
