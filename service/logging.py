"""Structured logs: one line per event, as key=value text or JSON."""

from __future__ import annotations

import enum
import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event)


class LogFormat(enum.Enum):
    """How each log line is written."""

    TEXT = "text"
    """key=value pairs."""
    JSON = "json"
    """One JSON object per line."""


class LogLevel(enum.Enum):
    """The least severe level logged."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class _ClientLeftMidWrite(logging.Filter):
    """gRPC's record of an answer it was writing when its client went away: it logs the failed
    write at ERROR with a traceback (grpc/grpc#32551), though nothing failed on the server. One
    line at INFO says what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "grpc._cython.cygrpc" and str(record.msg).startswith(
            "ExecuteBatchError raised in core by servicer method"
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a client left while its answer was being written", None
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def configure(level: LogLevel = LogLevel.INFO, fmt: LogFormat = LogFormat.TEXT) -> None:
    """Log to stderr at `level` and above, one line per event; replaces any handler before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ClientLeftMidWrite())
    if fmt is LogFormat.JSON:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.value)
