"""The native transport's Python side: the engine's end of `rnnserve_native.Transport`.

Rust serves the port (HTTP/2, TLS, framing, flow control, authentication) and hands over what
arrives in batches; this side runs each batch through the engine on the event loop and hands
the answers back in one call (`native/src/queue.rs` describes the hand-off):

- the transport writes a byte to a socket the event loop watches when the first request after
  a take arrives; the loop then `take`s everything that arrived meanwhile, so while nothing
  arrives Python waits in its event loop with the GIL released, and tokio never calls Python;
- each inference request goes through `InferenceServicer.submit`, exactly as on the grpcio
  transport: one meaning per request, whichever transport carried it;
- answers gather while the loop runs and go back in one `answer` call per loop iteration; a
  lone request runs at the end of the wake-up that took it, and its answer leaves with it;
- while one sequence is served, the loop spins briefly for its next request instead of
  sleeping (--native-spin-us, `_spin`);
- the service's other methods run as tasks, through the servicer's own methods;
- a call that ends first (cancelled, disconnected, past its deadline) comes back as a
  cancelled key, and its request is dropped if it has not run.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api import rest
from rnnserve.api.auth import CERTIFICATE_MESSAGE, MESSAGE, PRINCIPAL
from rnnserve.api.parsing import not_this_message
from rnnserve.api.servicer import SERVICE_NAME, Answer, Cancellable, InferenceServicer
from rnnserve.api.status import status_of
from rnnserve.auth import Refusal, TokenFile
from rnnserve.config import Settings
from rnnserve.errors import UnusableCredentials
from rnnserve.metrics import Metrics
from rnnserve.serving.model import ServedModel
from rnnserve.serving.request import InferenceRequest
from rnnserve.threads import usable_cpus

try:
    from rnnserve_native import Transport as NativeTransport
except ImportError:  # built only where cargo was present at install
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from rnnserve_native import Arrival  # a type of the stub only

logger = logging.getLogger(__name__)
native_logger = logging.getLogger("rnnserve.native")

MAINTENANCE_S = 1.0
"""How often the token file's stat and the models' answer bound are checked again."""
HOT_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})
PROTOCOLS = ("grpc", "http", "websocket")
"""The protocols of the request counts a take reports, in their order."""
REFUSALS = tuple(reason.value for reason in Refusal)
"""The reasons of the refusal counts a take reports, in their order (missing, malformed,
unknown)."""
SPIN_US = 300
"""--native-spin-us where the server may use 2 CPUs or more: past the few hundred
microseconds a lone sequence's next request takes to come (its answer's trip to the client
and back) on the benchmark machine."""
UNBOUNDED = 1e12
"""An answer bound per request byte that always reserves the largest message."""


def spin_us(settings: Settings) -> int:
    """--native-spin-us as set, or its default for the CPUs this process may use."""
    if settings.native_spin_us is not None:
        return settings.native_spin_us
    return SPIN_US if usable_cpus() >= 2 else 0


def descriptor_set() -> bytes:
    """The served services' files and their dependencies, as an encoded FileDescriptorSet:
    what the native reflection service describes."""
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        file.CopyToProto(files.file.add())

    add(pb.DESCRIPTOR)
    add(health_pb2.DESCRIPTOR)
    return files.SerializeToString()


class _Cold:
    """One of the service's other methods: its request type and the servicer's method."""

    __slots__ = ("parse", "run")

    def __init__(self, parse: Callable[[bytes], Message], run: Callable[..., Awaitable[Any]]):
        self.parse = parse
        self.run = run


class _CallContext:
    """What the servicer's methods ask of a call's context: the status they set."""

    __slots__ = ("code", "details")

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class NativeFront:
    """The gRPC port served by `rnnserve_native`, its work run by `servicer`."""

    name = "native"

    def __init__(
        self,
        servicer: InferenceServicer,
        settings: Settings,
        tokens: TokenFile | None,
        metrics: Metrics,
    ) -> None:
        if not AVAILABLE:
            raise RuntimeError("the native transport is not installed (rnnserve-native)")
        self.servicer = servicer
        self.tokens = tokens
        self.metrics = metrics
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        self._cold = {
            m.name: _Cold(getattr(pb, m.input_type.name).FromString, getattr(servicer, m.name))
            for m in service.methods
            if m.name not in HOT_METHODS
        }
        certificates = settings.tls_client_ca is not None
        self._spin_us = spin_us(settings)
        self._transport = NativeTransport(
            host=settings.host,
            port=settings.grpc_port,
            http_port=settings.http_port,
            threads=settings.native_threads,
            max_message_bytes=settings.max_message_bytes,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_client_ca=settings.tls_client_ca,
            tokens=tokens is not None,
            auth_message=CERTIFICATE_MESSAGE if certificates else MESSAGE,
            cold_methods=list(self._cold),
            descriptors=descriptor_set(),
            spin_us=self._spin_us,
            http_header_timeout_s=settings.http_header_timeout_s,
            http_body_timeout_s=settings.http_body_timeout_s,
        )
        self._tickets: dict[int, Cancellable] = {}
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._ok: list[tuple[int, bytes]] = []
        self._failed: list[tuple[int, int, str, float]] = []
        self._reserved: list[tuple[int, int]] = []
        self._flush_scheduled = False
        self._stopped = asyncio.Event()
        self._answer_bound: tuple[float, int] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.http_port: int | None = None
        """The HTTP port bound, once started (None when --http-port is off)."""

    # ------------------------------------------------------------------ life
    async def start(self) -> int:
        """Bind and serve; the port bound. OSError when the address cannot be bound,
        UnusableCredentials when a TLS file cannot be used."""
        try:
            port: int = self._transport.start()
        except ValueError as error:
            raise UnusableCredentials(str(error)) from None
        self.http_port = self._transport.http_port()
        self._push_tokens()
        self._push_answer_bound()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._transport.wake_fd(), self._on_wake)
        self._maintenance = asyncio.create_task(self._maintain())
        return port

    async def serve(self) -> None:
        """Health SERVING for the server and the inference service."""
        for name in ("", SERVICE_NAME):
            self._transport.set_health(name, True)

    async def drain(self) -> None:
        """Health NOT_SERVING, for good."""
        self._transport.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """No new connections or calls; calls in flight get `grace_s` seconds (answers keep
        flowing meanwhile), then the rest are answered UNAVAILABLE and the threads end."""
        self._transport.stop(grace_s)
        await self._stopped.wait()
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self._transport.wake_fd())
        tickets, self._tickets = self._tickets, {}
        for ticket in tickets.values():  # no one waits for them any more
            ticket.cancel()
        for task in list(self._calls.values()):
            task.cancel()
        await asyncio.to_thread(self._transport.close)

    # ------------------------------------------------------------------ hand-off
    def _on_wake(self) -> None:
        """Take everything that arrived and start it; answers go back as they come."""
        arrivals, calls, cancelled, logs, refusals, protocols, stopped = self._transport.take()
        if arrivals:
            self._arrive(arrivals)
            # A lone request runs now, once everything taken is submitted (so what arrived
            # together still batches together), and its answer leaves with this wake-up's.
            self.servicer.registry.turn.run()
        for key, method, data, principal in calls:
            self._start_call(key, method, data, principal or "")
        if cancelled:
            self._cancel(cancelled)
        for level, message in logs:
            native_logger.log(level, "%s", message)
        if any(refusals) or any(protocols):
            self._count(refusals, protocols)
        if stopped:
            self._stopped.set()
        # What was answered at once (refused, or run inline) goes back now, not a loop
        # iteration later.
        self._flush()
        if arrivals and not stopped:
            self._spin()

    def _spin(self) -> None:
        """With nothing left to run (a lone sequence's request answered, no call running),
        spin up to --native-spin-us for the next request rather than sleep in the event
        loop: a sleeping loop is woken through the kernel, tens of microseconds on a virtual
        machine (`native/src/spin.rs`). What arrives is taken on the loop's next turn, so
        timers and other callbacks still run between requests."""
        if self._spin_us and not self._tickets and not self._calls:
            if self._transport.spin_for_arrivals(self._spin_us):
                asyncio.get_running_loop().call_soon(self._on_wake)

    def _count(self, refusals: tuple[int, ...], protocols: tuple[int, ...]) -> None:
        """Authentication refusals by reason, inference requests by protocol, since the last
        take."""
        for reason, count in zip(REFUSALS, refusals, strict=True):
            if count:
                self.metrics.refused_authentication(reason, count)
        for protocol, count in zip(PROTOCOLS, protocols, strict=True):
            if count:
                self.metrics.arrived(protocol, count)

    def _arrive(self, arrivals: list[Arrival]) -> None:
        """Submit each inference request, in the order they arrived."""
        self.metrics.handed_over(len(arrivals))
        submit, tickets = self.servicer.submit, self._tickets
        for key, stream, reserved, data, principal, arrived in arrivals:
            reply = _Reply(self, key)
            ticket = submit(
                data,
                reply,
                in_band=stream,
                principal=principal or "",
                received=arrived,
                resolved=reply.reserve if reserved else None,
            )
            if ticket is not None:
                tickets[key] = ticket

    def _cancel(self, keys: list[int]) -> None:
        """Their calls ended: drop these requests if they have not run, stop these calls."""
        for key in keys:
            ticket = self._tickets.pop(key, None)
            if ticket is not None:
                ticket.cancel()
            elif (task := self._calls.get(key)) is not None:
                task.cancel()

    def answer(self, key: int, answer: Answer) -> None:
        """Queue the answer to `key`; the queue goes to the transport once this loop
        iteration's callbacks have run."""
        self._tickets.pop(key, None)
        if isinstance(answer, bytes):
            self._ok.append((key, answer))
        else:
            code, text, *retry = answer
            self._failed.append((key, code.value[0], text, retry[0] if retry else 0.0))
        self._schedule_flush()

    def reserve(self, key: int, nbytes: int) -> None:
        """Stream request `key`'s answer will take `nbytes`: what the stream reserves for it
        while it is deep (the transport held a provisional bound until told)."""
        self._reserved.append((key, nbytes))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Hand what is queued to the transport, in one call."""
        self._flush_scheduled = False
        ok, failed, reserved = self._ok, self._failed, self._reserved
        if ok or failed or reserved:
            self._ok, self._failed, self._reserved = [], [], []
            try:
                self._transport.answer(ok, failed, reserved)
            except Exception:
                # A bug (an extension built from other sources than this package, say): each
                # of these calls still gets an answer, not a wait until its deadline.
                logger.exception("answers could not be handed to the native transport")
                keys = [key for key, _ in ok] + [key for key, *_ in failed]
                internal = grpc.StatusCode.INTERNAL.value[0]
                message = "internal error; see the server log"
                self._transport.answer([], [(k, internal, message, 0.0) for k in keys], [])

    # ------------------------------------------------------------------ cold methods
    def _start_call(self, key: int, method: str, data: bytes, principal: str) -> None:
        task = asyncio.ensure_future(self._call(key, method, data, principal))
        self._calls[key] = task
        task.add_done_callback(lambda _: self._calls.pop(key, None))

    async def _call(self, key: int, method: str, data: bytes, principal: str) -> None:
        """Run one of the service's other methods as the servicer does on grpcio; a call that
        came over HTTP (its method named with rest.PREFIX) is answered as JSON (`rest`)."""
        PRINCIPAL.set(principal)  # this task's own context: no other call sees it
        http = method.startswith(rest.PREFIX)
        name = method.removeprefix(rest.PREFIX)
        cold = self._cold[name]
        try:
            request = cold.parse(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the client's
            reason = f"{type(error).__name__}: {error}"
            self.answer(key, (grpc.StatusCode.INVALID_ARGUMENT, not_this_message(reason)))
            return
        context = _CallContext()
        try:
            response = await cold.run(request, context)
        except Exception as error:  # noqa: BLE001 - a method that set its status, or a bug
            if context.code is None:
                self.answer(key, status_of(error))
                return
        if context.code is not None and context.code is not grpc.StatusCode.OK:
            self.answer(key, (context.code, context.details))
        elif not http:
            self.answer(key, response.SerializeToString())
        else:
            try:
                self.answer(key, rest.render(name, response))
            except Exception as error:  # noqa: BLE001 - not ready (400), or a bug (INTERNAL)
                self.answer(key, status_of(error))

    # ------------------------------------------------------------------ upkeep
    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_S)
            try:
                if self.tokens is not None and self.tokens.refresh():
                    self._push_tokens()
                self._push_answer_bound()
            except Exception:
                logger.exception("native transport upkeep failed")

    def _push_tokens(self) -> None:
        if self.tokens is not None:
            self._transport.set_tokens(list(self.tokens.entries))

    def _push_answer_bound(self) -> None:
        """The loaded models' largest answer per request byte, for streams' flow control."""
        per_byte, fixed = 0.0, 0
        for model in self.servicer.registry.all_models():
            model_per_byte, model_fixed = model.answer_bound()
            per_byte, fixed = max(per_byte, model_per_byte), max(fixed, model_fixed)
        bound = (min(per_byte, UNBOUNDED), fixed)
        if bound != self._answer_bound and math.isfinite(bound[0]):
            self._answer_bound = bound
            self._transport.set_answer_bound(*bound)


class _Reply:
    """The reply callable of one request: names it by key (never by its ticket, which holds
    the work, which holds this: a cycle for the cyclic collector)."""

    __slots__ = ("front", "key")

    def __init__(self, front: NativeFront, key: int) -> None:
        self.front = front
        self.key = key

    def __call__(self, answer: Answer) -> None:
        self.front.answer(self.key, answer)

    def reserve(self, model: ServedModel, request: InferenceRequest) -> None:
        """Tell the transport what the answer to this stream request will take."""
        self.front.reserve(self.key, model.answer_bytes_of(request))
