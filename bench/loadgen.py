"""A cheap closed-loop load generator: N sequences, each waiting for its answer before it sends
its next request, on grpc.aio with requests encoded before the clock starts.

Requests travel as bytes (no serializer) and responses stay bytes (no deserializer): a stream
response is checked for an error by its first byte only. Each sequence has its own bidi stream
(stream mode) or makes one unary call at a time (unary mode); sequences spread over several
channels, each its own TCP connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from rnnserve.threads import cpu_between
from rnnserve_bench.workload import STREAM_METHOD, STREAM_OK_TAG, UNARY_METHOD, SequenceMessages

logger = logging.getLogger(__name__)

STREAM = "stream"
UNARY = "unary"
FINISH_TIMEOUT_S = 60.0
"""How long sequences may take to send their END and close once a point's window is over."""
SPARE_DESCRIPTORS = 256
"""Open files the client needs besides one socket per channel (gRPC's pollers and wake-ups,
the interpreter's own)."""


@dataclass(frozen=True)
class Snapshot:
    """Counters read at either edge of a measurement window."""

    time_s: float
    client_cpu_s: float
    server_cpu_s: float
    batch_sum: float = 0.0
    batch_count: float = 0.0
    server_threads: Mapping[int, tuple[str, float]] = field(default_factory=dict)
    """The server's threads: kind and CPU seconds of each (`rnnserve.threads.cpu_by_thread`)."""


@dataclass(frozen=True)
class LoadSpec:
    mode: str
    """stream (one bidi stream per sequence) or unary (one ModelInfer call at a time)."""
    sessions: int
    steps: int
    """Time steps per request."""
    warmup_s: float
    duration_s: float
    sessions_per_channel: int
    first_id: int
    """Sequence ids are first_id .. first_id + sessions - 1: distinct for every point."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Metadata every call sends (a bearer token)."""


@dataclass(frozen=True)
class LoadResult:
    spec: LoadSpec
    requests: int
    """Answered without error inside the window."""
    errors: int
    """Errors anywhere in the point: warm-up, window, START and END requests."""
    first_error: str
    window_s: float
    latencies_s: np.ndarray
    before: Snapshot
    after: Snapshot
    response_bytes: int
    channels: int
    started: tuple[int, int] = (0, 0)
    """Sequences whose first request had been answered, at the window's start and at its end:
    how many were in the closed loop."""

    @property
    def steps_per_s(self) -> float:
        return self.requests * self.spec.steps / self.window_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s

    def percentile_ms(self, q: float) -> float:
        if not len(self.latencies_s):
            return math.nan
        return float(np.percentile(self.latencies_s, q)) * 1e3

    def cpu_per_1000_steps(self, which: str) -> float:
        steps = self.requests * self.spec.steps
        if steps == 0:
            return math.nan
        used: float = getattr(self.after, which) - getattr(self.before, which)
        return used / steps * 1000

    def thread_cpu_per_1000_steps(self) -> dict[str, float]:
        """The server's CPU by kind of thread, over the threads alive at the window's end."""
        steps = self.requests * self.spec.steps
        if steps == 0:
            return {}
        used = cpu_between(self.before.server_threads, self.after.server_threads)
        return {kind: seconds / steps * 1000 for kind, seconds in used.items()}

    @property
    def mean_batch(self) -> float:
        count = self.after.batch_count - self.before.batch_count
        if count <= 0:
            return math.nan
        return (self.after.batch_sum - self.before.batch_sum) / count


class _Window:
    """What all sequences of one point share; written from one event loop only."""

    __slots__ = ("errors", "first_error", "latencies", "open", "response_bytes", "started", "stop")

    def __init__(self) -> None:
        self.open = False
        self.stop = False
        self.started = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.response_bytes = 0

    def error(self, message: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = message


def _decode_stream_error(reply: bytes) -> str:
    from rnnserve._pb import grpc_service_pb2 as pb  # only on the error path

    return pb.ModelStreamInferResponse.FromString(reply).error_message or "an empty response"


@dataclass(frozen=True)
class StreamApi:
    """A bidirectional streaming RPC, and how to tell its answers from its errors."""

    method: str
    ok_tag: int
    """The first byte of every answer that is not an error."""
    describe: Callable[[bytes], str]
    """What went wrong, from a reply that does not start with `ok_tag`."""

    def error(self, reply: Any) -> str | None:
        if reply is grpc.aio.EOF:
            return "the server closed the stream"
        if not reply or reply[0] != self.ok_tag:
            return self.describe(reply)
        return None


OPEN_INFERENCE = StreamApi(STREAM_METHOD, STREAM_OK_TAG, _decode_stream_error)
"""ModelStreamInfer: rnnserve's, Triton's and the transport-only server's."""


async def _stream_sequence(
    channel: grpc.aio.Channel,
    messages: SequenceMessages,
    w: _Window,
    api: StreamApi,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    call = channel.stream_stream(api.method)(metadata=metadata or None)
    ok_tag = api.ok_tag
    try:
        await call.write(messages.start)
        reply = await call.read()
        if (problem := api.error(reply)) is not None:
            w.error(problem)
            return
        w.response_bytes = len(reply)
        w.started += 1
        step, latencies, clock = messages.step, w.latencies, time.perf_counter
        while not w.stop:
            sent = clock()
            await call.write(step)
            reply = await call.read()
            answered = clock()
            if not reply or reply is grpc.aio.EOF or reply[0] != ok_tag:
                w.error(api.error(reply) or "")
                return
            if w.open:
                latencies.append(answered - sent)
        await call.write(messages.end)
        if (problem := api.error(await call.read())) is not None:
            w.error(problem)
        await call.done_writing()
        if (code := await call.code()) != grpc.StatusCode.OK:
            w.error(f"the stream ended with {code.name}: {await call.details()}")
    except grpc.aio.AioRpcError as error:
        w.error(f"{error.code().name}: {error.details()}")
    except asyncio.CancelledError:
        call.cancel()
        raise


async def _unary_sequence(
    channel: grpc.aio.Channel,
    messages: SequenceMessages,
    w: _Window,
    api: StreamApi,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """ModelInfer, one call at a time (`api` is the streams'; it is here for one signature)."""
    infer = channel.unary_unary(UNARY_METHOD)
    sent_with = metadata or None
    try:
        w.response_bytes = len(await infer(messages.start, metadata=sent_with))
        w.started += 1
        step, latencies, clock = messages.step, w.latencies, time.perf_counter
        while not w.stop:
            sent = clock()
            await infer(step, metadata=sent_with)
            answered = clock()
            if w.open:
                latencies.append(answered - sent)
        await infer(messages.end, metadata=sent_with)
    except grpc.aio.AioRpcError as error:
        w.error(f"{error.code().name}: {error.details()}")


async def _monitor(
    spec: LoadSpec, w: _Window, sample: Callable[[], Snapshot]
) -> tuple[Snapshot, Snapshot, tuple[int, int]]:
    await asyncio.sleep(spec.warmup_s)
    before = sample()
    started_before = w.started
    w.open = True
    await asyncio.sleep(spec.duration_s)
    w.open = False
    after = sample()
    w.stop = True
    return before, after, (started_before, w.started)


def channel_count(sessions: int, sessions_per_channel: int) -> int:
    return max(1, math.ceil(sessions / max(1, sessions_per_channel)))


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, so that the client and
    the servers it starts afterwards (which inherit it) can hold a socket per connection;
    the soft limit now. Streams share their channel's connection, so 4,096 streams on 1,024
    per channel take 4 descriptors; one channel per sequence takes one each, on both sides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            logger.warning("cannot raise the open-file limit from %d to %d", soft, hard)
    return soft


def _check_descriptors(channels: int) -> None:
    soft = raise_descriptor_limit()
    if soft != resource.RLIM_INFINITY and channels + SPARE_DESCRIPTORS > soft:
        raise ValueError(
            f"{channels} channels need about {channels + SPARE_DESCRIPTORS} open files, above "
            f"this process's limit of {soft} (`ulimit -n`); share channels between more "
            "sequences (--sessions-per-channel)"
        )


async def run_load(
    target: str,
    spec: LoadSpec,
    messages: list[SequenceMessages],
    sample: Callable[[], Snapshot],
    api: StreamApi = OPEN_INFERENCE,
) -> LoadResult:
    """One point: warm up, measure for spec.duration_s, then END every sequence.

    Stream mode speaks `api`; unary mode is the Open Inference Protocol's ModelInfer.
    """
    if len(messages) != spec.sessions:
        raise ValueError(f"{len(messages)} sequences' messages for {spec.sessions} sessions")
    count = channel_count(spec.sessions, spec.sessions_per_channel)
    _check_descriptors(count)
    # A local subchannel pool gives each channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        sequence = _stream_sequence if spec.mode == STREAM else _unary_sequence
        window = _Window()
        tasks = [
            asyncio.create_task(
                sequence(channels[i % len(channels)], m, window, api, spec.metadata)
            )
            for i, m in enumerate(messages)
        ]
        before, after, started = await _monitor(spec, window, sample)
        done, pending = await asyncio.wait(tasks, timeout=FINISH_TIMEOUT_S)
        for task in pending:
            task.cancel()
            window.error("a sequence did not finish in time")
        for task in done:
            if task.exception() is not None:
                window.error(f"{type(task.exception()).__name__}: {task.exception()}")
    finally:
        for channel in channels:
            await channel.close()
    return LoadResult(
        spec=spec,
        requests=len(window.latencies),
        errors=window.errors,
        first_error=window.first_error,
        window_s=after.time_s - before.time_s,
        latencies_s=np.asarray(window.latencies),
        before=before,
        after=after,
        response_bytes=window.response_bytes,
        channels=len(channels),
        started=started,
    )
