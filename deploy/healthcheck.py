"""The image's HEALTHCHECK: exit 0 when the server's gRPC health service answers SERVING.

It asks the standard service (grpc.health.v1, overall status ""), as Kubernetes' gRPC probes
do, so the container runtime and the cluster see the same thing: NOT_SERVING from the moment
a drain begins. The port and address are the server's own settings (RNNSERVE_GRPC_PORT,
RNNSERVE_HOST; a wildcard address is reached over loopback).
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

host = os.environ.get("RNNSERVE_HOST", "127.0.0.1")
if host in ("", "0.0.0.0", "::", "[::]"):
    host = "127.0.0.1"
elif ":" in host and not host.startswith("["):
    host = f"[{host}]"  # an IPv6 address
port = os.environ.get("RNNSERVE_GRPC_PORT", "8001")
with grpc.insecure_channel(f"{host}:{port}") as channel:
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=4
        )
    except grpc.RpcError as error:
        sys.exit(f"health check of {host}:{port} failed: {error.code().name}")
status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
sys.exit(0 if answer.status == health_pb2.HealthCheckResponse.SERVING else f"status {status}")
