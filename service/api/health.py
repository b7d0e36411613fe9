"""grpc.health.v1.Health, with the service names it is asked about bounded.

The health service is open to every caller, authenticated or not (probes and load balancers
call it without credentials). gRPC's own servicer keeps a Watch's service name, as a key of
its watchers, for as long as the stream lives: a name as long as the largest message (64 MiB
by default) would let anyone who reaches the port hold that much memory per stream. The
server serves two names ("" and the inference service's), so a name longer than
`MAX_SERVICE_NAME_CHARS` is refused INVALID_ARGUMENT before it is kept or looked up.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from rnnserve.api.handlers import end_call

MAX_SERVICE_NAME_CHARS = 1024
"""The longest service name asked about: far beyond any gRPC service's full name."""


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """gRPC's health servicer, refusing service names over `MAX_SERVICE_NAME_CHARS`."""

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        """The service's status; NOT_FOUND for one not served, INVALID_ARGUMENT for a name
        too long to be one."""
        if _refused(request, context):
            return health_pb2.HealthCheckResponse()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """The service's status now and at each change; INVALID_ARGUMENT for a name too long
        to be a service's."""
        if _refused(request, context):
            return
        await super().Watch(request, context)


def _refused(request: health_pb2.HealthCheckRequest, context: Any) -> bool:
    """Whether the request's name is refused; the call's status says why (`end_call`)."""
    length = len(request.service)
    if length <= MAX_SERVICE_NAME_CHARS:
        return False
    end_call(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the service name is {length:,} characters long; health names a service by its full "
        f"name (at most {MAX_SERVICE_NAME_CHARS:,} characters), or the server by ''",
    )
    return True
