"""Server settings: one frozen object, from command-line flags and RNNSERVE_ environment variables.

Precedence: a flag, then the environment variable, then the default. Each field's docstring is
its `--help` text; the flag is the field name with dashes, the variable RNNSERVE_ + its name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnserve.models import bundled_repository

ENV_PREFIX = "RNNSERVE_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 for every interface (as in a container)."""
    grpc_port: int = 8001
    """Port for the gRPC inference API (0 picks a free one)."""
    metrics_port: int = 8002
    """Port for Prometheus /metrics over HTTP (0 picks a free one; -1 turns it off)."""
    model_repository: Path = field(default_factory=bundled_repository)
    """Model repository in Triton's layout (default: the bundled models)."""
    provider: str = "auto"
    """Execution provider: auto (CUDA when available, else CPU), cpu or cuda."""
    intra_op_threads: int = 0
    """ONNX Runtime threads inside one operator (0: ONNX Runtime's default)."""
    inter_op_threads: int = 0
    """ONNX Runtime threads across operators (0: ONNX Runtime's default)."""
    ort_spinning: int = 1
    """Whether ONNX Runtime's threads busy-wait for work: 0 never, 1 while a model call runs
    (they stop as it returns), 2 always (ONNX Runtime's default; idle threads burn CPU)."""
    parallel_min_work: int = 64
    """On the CPU, model calls of fewer rows x time steps than this run single-threaded, on a
    second ONNX Runtime session: splitting a small call across threads costs more CPU than it
    saves time. 0: every call uses the intra-op threads."""
    inline_max_steps: int = 1
    """A lone live sequence's batches of at most this many steps (rows x time steps) run on the
    event loop itself: a hand-off to the worker thread and back costs about as much as such a
    model call. Never with a shared state store. 0: none do."""
    max_queue_delay_us: int = -1
    """How long a step waits for others to batch with, in microseconds (-1: each model's config)."""
    max_sequences: int = 0
    """Live sequences each model version holds at most (0: each model's config)."""
    idle_timeout_s: float = 0.0
    """Evict a sequence after this many seconds without a request (0: each model's config)."""
    max_steps_per_request: int = 0
    """Time steps one request may carry at most (0: each model's config, else 4096)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    unload_grace_s: float = 30.0
    """When a model version is unloaded, how long its live sequences may go on before they end."""
    shutdown_grace_s: float = 20.0
    """On SIGTERM, how long in-flight requests (and, with a shared store, the hand-over of
    live states) get before the server exits."""
    state_store: str = "memory"
    """Where sequence states live beyond the replica that holds them: memory (this process
    only), or redis://[:password@]host:port/db (rediss:// for TLS), shared by replicas."""
    state_durability: str = "step"
    """With a shared state store: step (a response waits until its state is stored), end
    (states are stored only when the server shuts down) or none (never stored)."""
    state_store_timeout_s: float = 2.0
    """How long one round trip to the state store may take before requests fail UNAVAILABLE."""
    repository_poll_s: float = 0.0
    """Rescan the repository this often and load new versions (0: never)."""
    port_file: Path | None = None
    """Once serving, write the bound ports here as JSON (for supervisors and tests)."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """text (key=value) or json, one line per event."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + f.name.upper()
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                metavar=f.name.split("_")[-1].upper(),
                help=f"{docs.get(f.name, '')} [{env}]",
            )

    @classmethod
    def from_sources(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, hint in hints.items():
            raw = getattr(args, name, None)
            if raw is None:
                raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            values[name] = _convert(name, str(hint), raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.provider not in {"auto", "cpu", "cuda"}:
            raise ValueError(f"--provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.log_format not in {"text", "json"}:
            raise ValueError(f"--log-format must be text or json, got {self.log_format!r}")
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not -1 <= port <= 65535 or (name == "grpc_port" and port < 0):
                raise ValueError(f"--{name.replace('_', '-')} {port} is not a port number")
        self._validate_engine()
        if self.state_store != "memory" and not self.state_store.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"--state-store must be memory or redis://host:port/db (rediss:// for TLS), "
                f"got {self.state_store!r}"
            )
        if self.state_durability not in {"step", "end", "none"}:
            raise ValueError(
                f"--state-durability must be step, end or none, got {self.state_durability!r}"
            )
        if self.state_store_timeout_s <= 0:
            raise ValueError("--state-store-timeout-s must be positive")

    def _validate_engine(self) -> None:
        if self.ort_spinning not in {0, 1, 2}:
            raise ValueError(f"--ort-spinning must be 0, 1 or 2, got {self.ort_spinning}")
        if self.inline_max_steps < 0:
            raise ValueError("--inline-max-steps must be 0 (never) or more")
        if self.parallel_min_work < 0:
            raise ValueError("--parallel-min-work must be 0 (never single-threaded) or more")
        if self.max_steps_per_request < 0:
            raise ValueError("--max-steps-per-request must be 0 (per model) or more")


def _convert(name: str, hint: str, raw: str) -> Any:
    flag = "--" + name.replace("_", "-")
    try:
        if hint.startswith("int"):
            return int(raw)
        if hint.startswith("float"):
            return float(raw)
        if "Path" in hint:
            return Path(raw)
    except ValueError as error:
        raise ValueError(f"{flag} (or {ENV_PREFIX}{name.upper()}): {error}") from error
    return raw


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, read from the class source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = str(following.value.value)
    return docs


def environment() -> Mapping[str, str]:
    return os.environ
