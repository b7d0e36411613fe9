"""Server settings: one frozen object, from command-line flags and RNNSERVE_ environment variables.

Precedence: a flag, then the environment variable, then the default. Each field's docstring is
its `--help` text; the flag is the field name with dashes, the variable RNNSERVE_ + its name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnserve.api.front import Transport, native_installed
from rnnserve.logging import LogFormat, LogLevel
from rnnserve.models import bundled_repository
from rnnserve.runtime.onnx import Provider, Spinning
from rnnserve.sessions.connect import REDIS_SCHEMES, url_password
from rnnserve.sessions.store import Durability, Verify

ENV_PREFIX = "RNNSERVE_"
MAX_SPIN_US = 100_000
"""The longest spin --native-spin-us allows: a tenth of a second, past any request's gap."""


@dataclass(frozen=True)
class Settings:
    """Every setting of `rnnserve serve`; each field's docstring is its `--help` text."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 for every interface (as in a container)."""
    grpc_port: int = 8001
    """Port for the gRPC inference API (0 picks a free one)."""
    http_port: int | None = 8000
    """Port for the HTTP inference API, the KServe v2 REST protocol as Triton serves it (0
    picks a free one; off turns it off). Served by the native transport; with --transport
    grpcio there is none."""
    http_header_timeout_s: float = 10.0
    """How long the HTTP port waits for a request's headers; past it, the connection closes
    (a slow client holds a connection no longer)."""
    http_body_timeout_s: float = 60.0
    """How long the HTTP port waits for a request's body once its headers came; past it, 408."""
    metrics_port: int | None = 8002
    """Port for Prometheus /metrics over HTTP (0 picks a free one; off turns it off)."""
    metrics_host: str | None = None
    """Address the metrics endpoint listens on (default: --host), e.g. an internal interface
    only; it serves plain HTTP, with TLS on the gRPC port too."""
    transport: Transport = Transport.AUTO
    """What serves the gRPC port: native (rnnserve-native, the Rust transport, built where cargo
    was present at install), grpcio (Python's grpc.aio) or auto (native where installed)."""
    native_threads: int = 1
    """Threads of the native transport (HTTP/2, TLS, framing; the engine runs beside them)."""
    native_spin_us: int | None = None
    """While one sequence is served, how long the native transport spins for its next request
    (the engine) and its answer (the transport's thread) before sleeping, in microseconds: each
    wake-up it saves costs tens of microseconds, at the price of CPU spent spinning (at most
    this long per request, none while idle). 0: never spin (default: 300 where the server may
    use 2 CPUs or more, by its affinity and cgroup quota; else 0, as a thread spinning on the
    only CPU takes it from the thread it waits for)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the gRPC port; with --tls-key the port speaks TLS only. Both
    files are read again when they change: new connections get the new certificate."""
    tls_key: Path | None = None
    """PEM private key (unencrypted) of --tls-cert."""
    tls_client_ca: Path | None = None
    """PEM CA certificates for mutual TLS: every client must present a certificate they signed
    (default: no client certificate asked for). Read again when it changes."""
    auth_tokens: Path | None = None
    """File of `<principal> <sha256 hex of the token>` lines: every call but health, liveness and
    readiness then needs `authorization: Bearer <token>` metadata, or ends UNAUTHENTICATED. Read
    again when it changes (default: no authentication; with --tls-client-ca, a call without a
    token is its client certificate's principal: its common name, else its first SAN)."""
    auth_admins: str = ""
    """Comma-separated principals that may load and unload models (RepositoryModelLoad and
    Unload) when callers authenticate (--auth-tokens or --tls-client-ca); others get
    PERMISSION_DENIED. Without authentication anyone may."""
    model_repository: Path = field(default_factory=bundled_repository)
    """Model repository in Triton's layout (default: the bundled models)."""
    provider: Provider = Provider.AUTO
    """Execution provider: auto (CUDA when available, else CPU), cpu or cuda."""
    intra_op_threads: int | None = None
    """ONNX Runtime threads inside one operator (default: ONNX Runtime's choice)."""
    inter_op_threads: int | None = None
    """ONNX Runtime threads across operators (default: ONNX Runtime's choice)."""
    ort_spinning: Spinning = Spinning.DURING_RUN
    """Whether ONNX Runtime's threads busy-wait for work: never, during-run (while a model call
    runs; they stop as it returns) or always (ONNX Runtime's default; idle threads burn CPU)."""
    parallel_min_work: int = 64
    """On the CPU, model calls of fewer rows x time steps than this run single-threaded, on a
    second ONNX Runtime session: splitting a small call across threads costs more CPU than it
    saves time; a lone sequence's call runs on whichever of the two has answered calls of its
    size sooner. 0: every call uses the intra-op threads."""
    inline_max_work: int = 64
    """A lone live sequence's requests of at most this many rows x time steps run on the event
    loop itself: a hand-off to the worker thread and back cost 0.5 ms of a 32-step request of
    charlm_lstm on the 2-core benchmark machine, more than half its model call. The bound
    keeps the loop from being busy long with one call (64 steps of charlm_lstm: about 1.5 ms
    there; lower it for a model whose steps cost more). "Lone" is over the whole server: one
    live sequence of any model. Never with a shared state store. 0: none do."""
    max_queue_delay_us: int | None = None
    """How long a request waits for others to batch with, in microseconds (default: each
    model's config)."""
    max_sequences: int | None = None
    """Live sequences each model version holds at most (default: each model's config)."""
    idle_timeout_s: float | None = None
    """Evict a sequence after this many seconds without a request (default: each model's
    config)."""
    max_steps_per_request: int | None = None
    """Time steps one request may carry at most (default: each model's config, else 4096)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    max_request_bytes: int | None = None
    """Largest inference request accepted, in bytes, refused RESOURCE_EXHAUSTED before it is
    decoded (default: --max-message-bytes, which also bounds answers)."""
    principal_max_sequences: int | None = None
    """Live sequences one principal may hold over all models (default: no limit); without
    authentication all callers are one principal."""
    max_live_sequences: int | None = None
    """Live sequences the server may hold over all models (default: no limit beyond each
    model's --max-sequences)."""
    principal_requests_per_s: float | None = None
    """Inference requests per second one principal may send on average, stream requests
    included; over it, RESOURCE_EXHAUSTED (default: no limit)."""
    principal_burst: int | None = None
    """Requests one principal may send at once above --principal-requests-per-s (default: one
    second's worth)."""
    max_requests_per_s: float | None = None
    """Inference requests per second the server takes from all callers together (default: no
    limit)."""
    unload_grace_s: float = 30.0
    """When a model version is unloaded, how long its live sequences may go on before they end."""
    shutdown_grace_s: float = 20.0
    """On SIGTERM, how long in-flight requests (and, with a shared state store, the hand-over of
    live states) get before the server exits."""
    state_store: str = "memory"
    """Where sequence states live beyond the replica that holds them: memory (this process
    only), or redis://[[user]:password@]host:port/db (rediss:// for TLS), or the primary of
    Redis Sentinels, redis+sentinel://[:password@]host:port[,host:port...]/primary-name[/db], or
    a Redis Cluster, redis+cluster://[:password@]host:port[,host:port...]; shared by replicas."""
    state_store_password: str | None = field(default=None, repr=False)
    """Password of the Redis state store, instead of one in the URL (with a user in the URL,
    rediss://user@host:port/db, that ACL user's). Set it through the variable or
    --state-store-password-file: a flag's value shows in the process list."""
    state_store_password_file: Path | None = None
    """File that holds the Redis password (a mounted secret; a final newline is ignored)."""
    state_store_ca: Path | None = None
    """With rediss://: PEM CA certificates the Redis server's certificate must chain to
    (default: the system's CAs)."""
    state_store_cert: Path | None = None
    """With rediss://: PEM client certificate, for a Redis that asks for one (its
    tls-auth-clients)."""
    state_store_key: Path | None = None
    """With rediss://: PEM private key of --state-store-cert."""
    state_store_verify: Verify = Verify.FULL
    """With rediss://: full (the Redis server's certificate must chain to --state-store-ca, or
    the system's CAs, and name the URL's host) or none (encrypted, but any server is trusted:
    anyone on the path can read the states; for tests only)."""
    state_durability: Durability = Durability.STEP
    """With a shared state store: step (a response waits until its state is stored), end
    (states are stored only when the server shuts down) or none (never stored)."""
    state_store_timeout_s: float = 2.0
    """How long a wait on the state store, to connect or for a reply, lasts before requests
    fail UNAVAILABLE, in seconds (for a reply, twice that with --state-min-replicas, for WAIT).
    A timeout is never retried; a connection that breaks within a quarter of it is replaced
    once."""
    state_min_replicas: int = 0
    """At durability step with Redis: a step is acknowledged only once its state reached this
    many replicas (Redis WAIT, within --state-store-timeout-s); otherwise it fails UNAVAILABLE."""
    repository_poll_s: float | None = None
    """Rescan the repository this often, in seconds: load new models and versions, unload those
    that left it, leave models unloaded by request alone (default: never)."""
    port_file: Path | None = None
    """Once serving, write the bound ports here as JSON (for supervisors and tests)."""
    log_level: LogLevel = LogLevel.INFO
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: LogFormat = LogFormat.TEXT
    """text (key=value) or json, one line per event."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field on `parser`, each with its help and environment variable."""
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + f.name.upper()
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                metavar=f.name.split("_")[-1].upper(),
                help=f"{docs.get(f.name, '')} [{env}{_shown(f)}]",
            )

    @classmethod
    def from_sources(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        """Settings from parsed flags, else `environ` (RNNSERVE_ + the name), else defaults.

        Raises ValueError naming the flag and variable of a value that does not fit.
        """
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name, None)
            if raw is None:
                raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, hints[f.name], str(raw))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError, naming the flag, for a value out of its range."""
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                off = " (0 picks a free one; off turns it off)" if name != "grpc_port" else ""
                raise ValueError(f"{_flag(name)} {port} is not a port number{off}")
        self._validate_transport()
        for name in ("inline_max_work", "parallel_min_work"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be 0 (none) or more")
        for name in (
            "intra_op_threads",
            "inter_op_threads",
            "max_sequences",
            "max_steps_per_request",
            "max_queue_delay_us",
            "idle_timeout_s",
            "repository_poll_s",
            "max_request_bytes",
            "principal_max_sequences",
            "max_live_sequences",
            "principal_requests_per_s",
            "principal_burst",
            "max_requests_per_s",
            "http_header_timeout_s",
            "http_body_timeout_s",
        ):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "max_queue_delay_us" else 1e-9):
                least = "0 or more" if name == "max_queue_delay_us" else "positive"
                raise ValueError(f"{_flag(name)} must be {least}, got {value:g}")
        if self.principal_burst is not None and self.principal_requests_per_s is None:
            raise ValueError("--principal-burst needs --principal-requests-per-s")
        if self.admins and not self.authenticates:
            raise ValueError(
                "--auth-admins needs authenticated callers: --auth-tokens, or mutual TLS "
                "(--tls-client-ca)"
            )
        self._validate_store()

    def _validate_transport(self) -> None:
        if self.transport is Transport.NATIVE and not native_installed():
            raise ValueError(
                "--transport native: the native transport is not installed (`make install` "
                "builds it where cargo is present; `pip install ./native` from a clone); "
                "--transport grpcio serves without it"
            )
        if self.native_threads < 1:
            raise ValueError(f"{_flag('native_threads')} must be 1 or more")
        if self.native_spin_us is not None and not 0 <= self.native_spin_us <= MAX_SPIN_US:
            raise ValueError(
                f"{_flag('native_spin_us')} must be 0 (never spin) to {MAX_SPIN_US} microseconds"
            )

    @property
    def authenticates(self) -> bool:
        """Whether callers are authenticated: bearer tokens, or client certificates."""
        return self.auth_tokens is not None or self.tls_client_ca is not None

    @property
    def admins(self) -> frozenset[str]:
        """The principals of --auth-admins."""
        return frozenset(p.strip() for p in self.auth_admins.split(",") if p.strip())

    def _validate_store(self) -> None:
        if self.state_store != "memory" and not self.state_store.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"--state-store must be memory, redis://host:port/db (rediss:// for TLS), "
                f"redis+sentinel://host:port[,host:port...]/primary-name or "
                f"redis+cluster://host:port[,host:port...], got {self.state_store!r}"
            )
        if self.state_store_timeout_s <= 0:
            raise ValueError("--state-store-timeout-s must be positive")
        if self.state_min_replicas < 0:
            raise ValueError("--state-min-replicas must be 0 or more")
        if self.state_min_replicas and not self.state_store.startswith(REDIS_SCHEMES):
            raise ValueError("--state-min-replicas needs a Redis --state-store")
        self._validate_tls()
        self._validate_store_access()

    def _validate_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def _validate_store_access(self) -> None:
        tls_options = [
            _flag(name)
            for name in ("state_store_ca", "state_store_cert", "state_store_key")
            if getattr(self, name) is not None
        ]
        if self.state_store_verify is not Verify.FULL:
            tls_options.append(_flag("state_store_verify"))
        if tls_options and not self.state_store.startswith("rediss://"):
            raise ValueError(f"{', '.join(tls_options)}: only for a TLS state store (rediss://...)")
        if (self.state_store_cert is None) != (self.state_store_key is None):
            raise ValueError("--state-store-cert and --state-store-key go together")
        given = [
            name
            for name in ("state_store_password", "state_store_password_file")
            if getattr(self, name) is not None
        ]
        if len(given) == 2:
            raise ValueError(
                "--state-store-password and --state-store-password-file: give one of them"
            )
        if given and self.state_store == "memory":
            raise ValueError(f"{_flag(given[0])} needs a Redis --state-store")
        if given and url_password(self.state_store) is not None:
            raise ValueError(
                f"--state-store already holds a password; {_flag(given[0])} would be a second"
            )


def _shown(f: dataclasses.Field[Any]) -> str:
    """`; default: X` for a field's default as a flag spells it; nothing for None (the
    field's docstring says what None means)."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is None:
        return ""
    return f"; default: {value.value if isinstance(value, enum.Enum) else value}"


OFF = ("off", "none")
"""Values that turn off a setting whose default is on (`--metrics-port off`)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting_source(name: str) -> str:
    """How an operator sets the field `name`: its flag or its environment variable, as a
    message names them (`--grpc-port or RNNSERVE_GRPC_PORT`)."""
    return f"{_flag(name)} or {ENV_PREFIX}{name.upper()}"


def _convert(name: str, hint: Any, raw: str) -> Any:
    """`raw` as the field's type: int, float, Path, an enum, or None for `off`."""
    source = f"{_flag(name)} (or {ENV_PREFIX}{name.upper()})"
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    if optional and kinds[0] is not str and raw.lower() in OFF:
        return None
    kind = kinds[0]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        for spelling in (raw, raw.lower(), raw.upper()):  # INFO or info, cpu or CPU
            try:
                return kind(spelling)
            except ValueError:
                continue
        choices = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"{source} must be {choices}; got {raw!r}")
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        off = " or off" if optional else ""
        raise ValueError(f"{source} must be {what}{off}; got {raw!r}") from None
    if kind is Path:
        return Path(raw)
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
    """The process environment, where the RNNSERVE_ variables of `Settings` are read."""
    return os.environ
