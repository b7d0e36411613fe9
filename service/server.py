"""The one place that wires the parts together and runs them until SIGTERM.

Shutdown drains: health turns NOT_SERVING, new sequences are refused, in-flight requests get
`shutdown_grace_s` to finish, then the models stop. With a shared state store the server hands
its sequences over instead of serving them to the end: it refuses every stateful request at
once (UNAVAILABLE, so clients go to another replica), lets the steps already queued finish,
writes every live state to the store (whatever the durability, but `none`), and exits; all
within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from rnnserve import __version__, listeners
from rnnserve.api import native
from rnnserve.api.front import Front, Transport
from rnnserve.api.grpcio import GrpcioFront
from rnnserve.api.servicer import InferenceServicer
from rnnserve.auth import TokenFile
from rnnserve.config import Settings
from rnnserve.errors import ServiceError, StoreRejected
from rnnserve.listeners import Listener
from rnnserve.metrics import Metrics
from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, quiet_process_logger
from rnnserve.serving.model import Limits
from rnnserve.serving.policy import Policy, PolicySettings
from rnnserve.serving.registry import ModelRegistry
from rnnserve.sessions.connect import open_store
from rnnserve.sessions.store import StoreAccess
from rnnserve.tls import CertificateFiles, TlsFiles

logger = logging.getLogger(__name__)


class Server:
    """The parts wired from one Settings: state store, model registry, gRPC services (inference,
    health, reflection) and the metrics endpoint.

    On the event loop: `start`, then `wait` until `request_stop`, then `stop`. Opening the
    state store raises ValueError for a `state_store` of no known kind; TLS files or a password
    file that cannot be used raise UnusableCredentials, naming the file.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        quiet_process_logger()  # before any model loads: the log is ours alone
        engine = EngineSettings(
            settings.provider,
            settings.intra_op_threads,
            settings.inter_op_threads,
            spinning=settings.ort_spinning,
            parallel_min_work=settings.parallel_min_work,
        )
        delay_us = settings.max_queue_delay_us
        limits = Limits(
            max_sequences=settings.max_sequences,
            idle_timeout_s=settings.idle_timeout_s,
            max_queue_delay_s=delay_us / 1e6 if delay_us is not None else None,
            max_steps_per_request=settings.max_steps_per_request,
            inline_max_work=settings.inline_max_work,
            max_answer_bytes=settings.max_message_bytes,
        )
        self.tokens = TokenFile(settings.auth_tokens) if settings.auth_tokens else None
        self.tls: CertificateFiles | None = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            files = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            self.tls = CertificateFiles(files)
        access = StoreAccess(
            password=settings.state_store_password,
            password_file=settings.state_store_password_file,
            ca=settings.state_store_ca,
            cert=settings.state_store_cert,
            key=settings.state_store_key,
            verify=settings.state_store_verify,
        )
        self.store = open_store(
            settings.state_store,
            settings.state_store_timeout_s,
            access,
            settings.state_min_replicas,
        )
        self.durability = settings.state_durability
        self.registry = ModelRegistry(
            settings.model_repository,
            lambda path: OnnxRuntime(path, engine),
            limits,
            unload_grace_s=settings.unload_grace_s,
            store=self.store,
            durability=self.durability,
            policy=Policy(
                PolicySettings(
                    authenticated=settings.authenticates,
                    admins=settings.admins,
                    principal_max_sequences=settings.principal_max_sequences,
                    max_live_sequences=settings.max_live_sequences,
                    principal_requests_per_s=settings.principal_requests_per_s,
                    principal_burst=settings.principal_burst,
                    max_requests_per_s=settings.max_requests_per_s,
                    max_request_bytes=settings.max_request_bytes,
                )
            ),
        )
        self.metrics = Metrics(self.registry.snapshot, self.store.statistics)
        # A token's principal is checked again at each request (a stream's token is checked
        # once, as it opens); under mutual TLS a principal may be a certificate's instead, which
        # the token file does not name.
        tokens = self.tokens
        self.servicer = InferenceServicer(
            self.registry,
            self.metrics,
            max_stream_bytes=settings.max_message_bytes,
            known=tokens.names if tokens is not None and settings.tls_client_ca is None else None,
        )
        self.front = self._front()
        self.grpc_port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._http: Any = None
        self._front_started = False
        self._background: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def _front(self) -> Front:
        """The transport the settings ask for (native where installed, for auto; the settings
        refuse --transport native where it is not)."""
        if self.settings.transport is Transport.GRPCIO or not native.AVAILABLE:
            if self.settings.http_port is not None and self.settings.transport is Transport.AUTO:
                logger.warning(
                    "no HTTP port: the native transport is not installed, and the grpcio "
                    "transport serves gRPC only (`make install` builds rnnserve-native where "
                    "cargo is present); --http-port off silences this"
                )
            return GrpcioFront(self.servicer, self.settings, self.tokens, self.tls, self.metrics)
        return native.NativeFront(self.servicer, self.settings, self.tokens, self.metrics)

    async def start(self) -> None:
        """Load the models and listen: gRPC, and metrics over HTTP when a port is set; health
        turns SERVING.

        `grpc_port` and `metrics_port` become the ports bound (0 in the settings picks a free
        one); the port file, if asked for, is written. Raises CannotListen when an address
        cannot be listened on (checked before the models load, so a busy port fails at once),
        InvalidModelRepository when the repository cannot be read, StoreRejected when a shared
        state store refuses the password or certificates (or its own does not verify). Whatever
        it started before failing is stopped (`abandon`).
        """
        settings = self.settings
        try:
            for listener in self.addresses():
                listeners.check(listener)
            if self.store.shared:
                await self._check_store()
            await self.registry.load_all()
            # What exists now (modules, models, sessions) lives as long as the server: out of
            # the cyclic collector's sight, its full collections no longer walk it (measured:
            # p99 at 64 sequences 1.5 to 2 ms lower under perf_analyzer, docs/performance.md).
            gc.collect()
            gc.freeze()
            await self.listen()
        except BaseException:
            await self.abandon()
            raise
        await self.front.serve()
        metrics_host = settings.metrics_host or settings.host
        self._background.append(asyncio.create_task(self._evict_idle()))
        if settings.repository_poll_s is not None:
            poll = self._poll_repository(settings.repository_poll_s)
            self._background.append(asyncio.create_task(poll))
        if settings.port_file is not None:
            _write_port_file(settings.port_file, self.grpc_port, self.http_port, self.metrics_port)
        principals = [
            name
            for name, on in (
                ("tokens", settings.auth_tokens is not None),
                ("certificates", settings.tls_client_ca is not None),
            )
            if on
        ]
        logger.info(
            "serving version=%s transport=%s grpc=%s:%d http=%s tls=%s auth=%s metrics=%s "
            "models=%s",
            __version__,
            self.front.name,
            settings.host,
            self.grpc_port,
            f"{settings.host}:{self.http_port}" if self.http_port is not None else "off",
            "off" if self.tls is None else "mutual" if self.tls.mutual else "on",
            "+".join(principals) or "off",
            f"{metrics_host}:{self.metrics_port}" if self.metrics_port is not None else "off",
            ",".join(f"{m.name}:{m.version}" for m in self.registry.all_models()),
        )

    def addresses(self) -> list[Listener]:
        """The addresses this server listens on, as the settings give them."""
        settings = self.settings
        found = [Listener("gRPC", settings.host, settings.grpc_port, "host", "grpc_port")]
        if settings.http_port is not None and self.front.name == "native":
            found.append(
                Listener(
                    "HTTP",
                    settings.host,
                    settings.http_port,
                    "host",
                    "http_port",
                    port_hint="0 picks a free one; off turns HTTP off",
                )
            )
        if settings.metrics_port is not None:
            found.append(
                Listener(
                    "metrics (/metrics)",
                    settings.metrics_host or settings.host,
                    settings.metrics_port,
                    "metrics_host",
                    "metrics_port",
                    port_hint="0 picks a free one; off turns metrics off",
                )
            )
        return found

    async def listen(self) -> None:
        """Bind the gRPC and HTTP ports, then the metrics endpoint (what `start` does once the
        models are loaded); CannotListen naming the one refused, the rest left for `abandon`."""
        grpc_listener, *others = self.addresses()
        front_listeners = [grpc_listener, *(x for x in others if x.port_setting == "http_port")]
        try:
            self.grpc_port = await self.front.start()
        except OSError as error:
            # The native transport binds both ports; its message names the address refused.
            refused = next(
                (x for x in front_listeners[1:] if f"{x.address}:" in str(error)), grpc_listener
            )
            raise listeners.cannot_listen(refused, error) from None
        self._front_started = True
        self.http_port = getattr(self.front, "http_port", None)
        for listener in (x for x in others if x.port_setting == "metrics_port"):
            try:
                self._http, _ = start_http_server(
                    listener.port, listener.host, registry=self.metrics.registry
                )
            except OSError as error:
                raise listeners.cannot_listen(listener, error) from None
            self.metrics_port = self._http.server_port

    async def abandon(self) -> None:
        """Close what a failed `start` opened: the gRPC port and metrics endpoint (if bound),
        the models, the state store."""
        if self._front_started:
            await self.front.stop(0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        await self.registry.stop()
        await asyncio.to_thread(self.store.close)

    async def _check_store(self) -> None:
        """Say whether the store answers; serve either way (stateful requests wait for it),
        unless it refuses this server's credentials or its certificate does not verify:
        StoreRejected, which waiting does not fix."""
        try:
            await asyncio.to_thread(self.store.ping)
        except StoreRejected:
            raise
        except ServiceError as error:
            logger.warning("%s; stateful requests fail until it answers", error)
        else:
            logger.info("state store %s durability=%s", self.store.name, self.durability.value)

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.registry.evict_idle()

    async def _poll_repository(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.registry.poll()
            except Exception:
                logger.exception("repository poll failed")

    def request_stop(self) -> None:
        """Let `wait` return (the SIGTERM and SIGINT handler); calling it again does nothing."""
        self._stopping.set()

    async def wait(self) -> None:
        """Return once `request_stop` has been called."""
        await self._stopping.wait()

    async def stop(self) -> None:
        """Shut down within `shutdown_grace_s` seconds: drain, or hand the sequences over to a
        shared store (see the module docstring); then stop gRPC, the models, the store and the
        metrics endpoint."""
        grace = self.settings.shutdown_grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        logger.info("draining: no new sequences, %gs for in-flight requests", grace)
        if self.store.shared:
            await self.registry.mark_moving(grace)
        self.registry.stop_admitting(hand_over=self.store.shared)
        await self.front.drain()
        for task in self._background:
            task.cancel()
        if self.store.shared:
            await self._hand_over(grace)
            # Every request that could still arrive is refused: a moment for answers in flight.
            grace = min(max(deadline - loop.time(), 0.0), 1.0)
        await self.front.stop(grace)
        await self.registry.stop()
        await asyncio.to_thread(self.store.close)
        if self._http is not None:
            self._http.shutdown()
        logger.info("stopped")

    async def _hand_over(self, grace_s: float) -> None:
        """Let queued steps finish, then write every live state to the shared store."""
        if not await self.registry.quiesce(grace_s):
            logger.warning("steps still running after %gs; handing over what is stored", grace_s)
        written = await self.registry.write_states()
        logger.info(
            "handed over to %s: %d sequence states written (durability %s)",
            self.store.name,
            written,
            self.durability.value,
        )


def _write_port_file(
    path: Path, grpc_port: int, http_port: int | None, metrics_port: int | None
) -> None:
    staging = path.with_suffix(path.suffix + ".tmp")
    ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
    staging.write_text(json.dumps(ports))
    staging.replace(path)


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; raises what `start` raises."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    await server.start()
    try:
        await server.wait()
    finally:
        await server.stop()
