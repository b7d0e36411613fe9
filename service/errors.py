"""Domain errors, each carrying the gRPC status code the API edge answers with."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error a client or operator can act on; its message is shown to them as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidModelRepository(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
