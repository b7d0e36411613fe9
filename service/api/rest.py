"""The HTTP port's answers to everything but inference, as Triton's HTTP endpoint gives them.

The native transport routes each HTTP request to the inference service's method of the same
meaning (GET /v2/models/{name}/config is ModelConfig, ...), and the servicer answers it as it
answers gRPC; this module writes that answer as the JSON Triton's HTTP endpoint writes
(its http_server.cc, and the KServe v2 protocol's HTTP/REST section): metadata, configuration
and statistics as objects whose 64-bit integers are JSON numbers, the repository index as an
array, readiness as a status alone (200, or 400 with `{"error": ...}`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from rnnserve.errors import InvalidArgument

PREFIX = "http:"
"""What the transport puts before a method's name for a call that came over HTTP."""


class NotReady(InvalidArgument):
    """A readiness endpoint's "no": 400 with its reason, as Triton answers it."""


def _readiness(what: str) -> Callable[[Message], bytes]:
    def render(response: Message) -> bytes:
        if not getattr(response, "ready"):  # noqa: B009 - ServerReady and ModelReady alike
            raise NotReady(f"{what} is not ready")
        return b""

    return render


def _fields(message: Message) -> dict[str, Any]:
    """Every field of `message`: scalars and repeated fields always (their defaults too, as
    Triton prints them), a message field or one of a oneof only when set."""
    out: dict[str, Any] = {}
    descriptor: Any = message.DESCRIPTOR
    for field in descriptor.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.containing_oneof is not None or field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = _value(field, value)
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _fields(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value  # 64-bit integers stay numbers, as Triton writes them


def _metadata(response: Message) -> dict[str, Any]:
    return _fields(response)


def _config(response: Message) -> dict[str, Any]:
    return _fields(response.config)  # type: ignore[attr-defined]


def _index(response: Message) -> list[dict[str, Any]]:
    models = response.models  # type: ignore[attr-defined]
    return [
        {"name": m.name, "version": m.version, "state": m.state}
        | ({"reason": m.reason} if m.reason else {})
        for m in models
    ]


def _regions(response: Message) -> list[dict[str, Any]]:
    return [_fields(region) for region in response.regions.values()]  # type: ignore[attr-defined]


def _nothing(response: Message) -> None:
    return None


_RENDER: dict[str, Callable[[Message], Any]] = {
    "ServerMetadata": _metadata,
    "ModelMetadata": _metadata,
    "ModelConfig": _config,
    "ModelStatistics": _metadata,
    "RepositoryIndex": _index,
    "RepositoryModelLoad": _nothing,
    "RepositoryModelUnload": _nothing,
    "SystemSharedMemoryStatus": _regions,
    "CudaSharedMemoryStatus": _regions,
    "SystemSharedMemoryUnregister": _nothing,
    "CudaSharedMemoryUnregister": _nothing,
}
_READINESS = {
    "ServerReady": _readiness("the server (loading its models, or shutting down)"),
    "ModelReady": _readiness("this model version"),
}

METHODS = frozenset(_RENDER) | frozenset(_READINESS)
"""The inference service's methods the HTTP port calls."""


def render(method: str, response: Message) -> bytes:
    """The HTTP body answering `method`'s `response`: JSON, or nothing (an empty body) where
    Triton answers with a status alone. Raises NotReady for a readiness endpoint's "no"."""
    readiness = _READINESS.get(method)
    if readiness is not None:
        return readiness(response)
    document = _RENDER[method](response)
    return b"" if document is None else json.dumps(document, separators=(",", ":")).encode()
