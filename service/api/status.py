"""Errors -> gRPC status codes and messages: the one place the API maps them.

Domain code raises ServiceError subclasses, each carrying its status code; anything else is a
bug, answered INTERNAL with a generic message while its traceback goes to the log. Messages are
bounded: a status travels in HTTP/2 trailers, whose size gRPC clients limit (8 KiB by default),
and its message travels percent-encoded there, each byte outside printable ASCII taking three.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from rnnserve.errors import InternalError, ServiceError

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024
"""The longest message a status carries, in UTF-8 bytes (at most 3 KiB percent-encoded);
longer ones are cut and marked."""


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`.

    A ServiceError keeps its code and message (cut to MAX_MESSAGE_BYTES); a cancellation is
    CANCELLED; anything else is logged with its traceback and answered INTERNAL.
    """
    if isinstance(error, ServiceError):
        return error.code, bounded(str(error))
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    logger.error("unexpected error while serving a request", exc_info=error)
    internal = InternalError()
    return internal.code, str(internal)


def bounded(message: str) -> str:
    """`message`, cut to MAX_MESSAGE_BYTES bytes of UTF-8 with a mark where it was cut."""
    if len(message) <= MAX_MESSAGE_BYTES // 4:  # cannot be over: at most 4 bytes a character
        return message
    encoded = message.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    # Cut between characters: the bytes of one cut in two are dropped.
    return encoded[: MAX_MESSAGE_BYTES - 20].decode(errors="ignore") + " ... (message cut)"
