"""Every Prometheus metric the server exports, in one place, on a registry of its own.

Labels are few and fixed (model, version, stage, outcome, reason); never a sequence id.
Model, batch and sequence figures are read at scrape time from the frozen snapshots the engine
publishes (`rnnserve.serving.snapshot`), so they have one owner and cannot drift; request
durations are observed by the API as each request ends. GPU figures come from NVML when it is
there, labelled `gpu_uuid` only and named as Triton names them, so `perf_analyzer
--collect-metrics` reads them.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rnnserve.serving.snapshot import ROUND_TRIP_BUCKETS, ModelSnapshot, StoreSnapshot

logger = logging.getLogger(__name__)

# From 25 us: a single LSTM step on a CPU takes well under a millisecond.
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
Snapshots = Callable[[], Iterable[ModelSnapshot]]
StoreSnapshots = Callable[[], StoreSnapshot | None]


class Metrics:
    """The server's metrics: `registry` is what /metrics serves.

    `snapshots` returns the engine's figures for every loaded model version, `store` the
    shared state store's (None: no store metrics); both are called at each scrape, from the
    HTTP server's thread.
    """

    def __init__(self, snapshots: Snapshots, store: StoreSnapshots = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self._handoffs = Histogram(
            "rnnserve_transport_handoff_requests",
            "Inference requests the native transport handed the engine in one crossing into "
            "Python (one event-loop wake-up): above 1, requests cross in batches",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._by_protocol = Counter(
            "rnnserve_requests_by_protocol",
            "Inference requests by the protocol that carried them: grpc (ModelInfer and "
            "ModelStreamInfer), http (POST .../infer), websocket (a step on .../stream); the "
            "native transport's count (the grpcio transport carries gRPC alone)",
            ["protocol"],
            registry=self.registry,
        )
        # Counted at every wake-up of the native transport: the children, looked up once.
        self._protocol_counts = {
            p: self._by_protocol.labels(p) for p in ("grpc", "http", "websocket")
        }
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.registry.register(_ServingCollector(snapshots))
        self.registry.register(_StoreCollector(store))
        self.registry.register(_GpuCollector())
        self._auth_failures = Counter(
            "rnnserve_auth_failures",
            "Calls refused UNAUTHENTICATED, by reason: missing (no token, nor a certificate naming "
            "a principal), malformed or unknown token",
            ["reason"],
            registry=self.registry,
        )

        self._limit_refusals = Counter(
            "rnnserve_limit_refusals",
            "Requests refused by a limit, by which: principal_sequences, server_sequences, "
            "model_sequences, principal_rate, server_rate, request_bytes, answer_bytes, "
            "time_steps",
            ["reason"],
            registry=self.registry,
        )

    def handed_over(self, requests: int) -> None:
        """The native transport handed the engine `requests` inference requests in one
        crossing."""
        self._handoffs.observe(requests)

    def arrived(self, protocol: str, count: int) -> None:
        """`count` inference requests came over `protocol` (grpc, http, websocket)."""
        self._protocol_counts[protocol].inc(count)

    def refused_authentication(self, reason: str, count: int = 1) -> None:
        """`count` calls were refused UNAUTHENTICATED for `reason` (missing, malformed,
        unknown)."""
        self._auth_failures.labels(reason).inc(count)

    def refused_by_limit(self, limit: str) -> None:
        """A request was refused by the limit `limit` (`ServiceError.limit`)."""
        self._limit_refusals.labels(limit).inc()

    def observe_request(
        self,
        model: str,
        version: str,
        outcome: str,
        total_s: float,
        queue_s: float | None = None,
        compute_s: float | None = None,
    ) -> None:
        """One inference request ended: `outcome` is OK or a status code's name; durations in
        seconds (queue and compute only for a request that ran)."""
        self._requests.observe(model, version, outcome, total_s, queue_s, compute_s)


class _RequestSeries:
    """One model version's requests: counts by outcome, and durations not yet in buckets."""

    __slots__ = ("outcomes", "pending", "buckets", "sums")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.pending: tuple[list[float], list[float], list[float]] = ([], [], [])
        """Durations by stage (total, queue, compute) since the last fold."""
        self.buckets = np.zeros((len(STAGES), len(LATENCY_BUCKETS) + 1), dtype=np.int64)
        self.sums = [0.0] * len(STAGES)


STAGES = ("total", "queue", "compute")
_LE = [floatToGoString(b) for b in LATENCY_BUCKETS]  # type: ignore[no-untyped-call]
FOLD_EVERY = 4096
"""Durations kept per stage before they are sorted into buckets."""


class _RequestCollector(Collector):
    """rnnserve_requests_total and rnnserve_request_duration_seconds, cheap to update.

    prometheus_client's Histogram takes a lock and walks its buckets for every observation; at
    tens of thousands of requests a second, three of them per request are a visible share of the
    server's CPU. Here a request is a count and three list appends under one lock, and durations
    are sorted into buckets with numpy in bulk: every FOLD_EVERY requests and at each scrape.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _RequestSeries] = {}
        self._bounds = np.asarray(LATENCY_BUCKETS)

    def observe(
        self,
        model: str,
        version: str,
        outcome: str,
        total_s: float,
        queue_s: float | None,
        compute_s: float | None,
    ) -> None:
        with self._lock:
            series = self._series.get((model, version))
            if series is None:
                series = self._series[model, version] = _RequestSeries()
            series.outcomes[outcome] = series.outcomes.get(outcome, 0) + 1
            total, queue, compute = series.pending
            total.append(total_s)
            if queue_s is not None:
                queue.append(queue_s)
            if compute_s is not None:
                compute.append(compute_s)
            if len(total) >= FOLD_EVERY:
                self._fold(series)

    def _fold(self, series: _RequestSeries) -> None:
        for stage, durations in enumerate(series.pending):
            if durations:
                values = np.asarray(durations)
                # Prometheus buckets hold values <= their bound ("le").
                index = np.searchsorted(self._bounds, values, side="left")
                series.buckets[stage] += np.bincount(index, minlength=len(self._bounds) + 1)
                series.sums[stage] += float(values.sum())
                durations.clear()

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "rnnserve_requests",
            "Inference requests by model, version and outcome (OK or a gRPC status name)",
            labels=["model", "version", "outcome"],
        )
        durations = HistogramMetricFamily(
            "rnnserve_request_duration_seconds",
            "Request latency by stage: queue (waiting for a batch), compute (the batch's model "
            "call, state gather and scatter included) and total (decode to encode)",
            labels=["model", "version", "stage"],
        )
        bounds = [*_LE, "+Inf"]
        with self._lock:
            for (model, version), series in self._series.items():
                self._fold(series)
                for outcome, count in series.outcomes.items():
                    requests.add_metric([model, version, outcome], count)
                for stage, name in enumerate(STAGES):
                    cumulative = np.cumsum(series.buckets[stage]).tolist()
                    durations.add_metric(
                        [model, version, name],
                        list(zip(bounds, cumulative, strict=True)),
                        series.sums[stage],
                    )
        return [requests, durations]


class _ServingCollector(Collector):
    """Model versions, batch sizes and sequences, from the engine's snapshots."""

    def __init__(self, snapshots: Snapshots) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "version"]
        info = GaugeMetricFamily(
            "rnnserve_model_info",
            "Loaded model versions and the execution provider each runs on",
            labels=[*labels, "provider"],
        )
        batch_size = HistogramMetricFamily(
            "rnnserve_batch_size", "Rows (sequences) per model call", labels=labels
        )
        live = GaugeMetricFamily(
            "rnnserve_live_sequences", "Sequences whose state the server holds", labels=labels
        )
        memory = GaugeMetricFamily(
            "rnnserve_state_memory_bytes",
            "Bytes of recurrent state held for live sequences",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "rnnserve_sequence_capacity", "Most live sequences a model version holds", labels=labels
        )
        starts = CounterMetricFamily(
            "rnnserve_sequence_starts", "Sequence starts (restarts included)", labels=labels
        )
        ends = CounterMetricFamily(
            "rnnserve_sequence_ends", "Sequences ended by their client", labels=labels
        )
        evictions = CounterMetricFamily(
            "rnnserve_sequence_evictions",
            "Sequences ended by the server, by reason (idle, unloaded)",
            labels=[*labels, "reason"],
        )
        store = CounterMetricFamily(
            "rnnserve_state_store_events",
            "State store traffic by event: loaded (read into memory), written, aborted (a step "
            "that lost a race), refused (a stored state of other shapes), unavailable (the "
            "store failed)",
            labels=[*labels, "event"],
        )
        for model in self._snapshots():
            key = [model.name, str(model.version)]
            info.add_metric([*key, model.provider], 1)
            buckets, total = _batch_buckets(model)
            batch_size.add_metric(key, buckets, total)
            sequences = model.sequences
            if sequences is None:
                continue
            live.add_metric(key, sequences.live)
            memory.add_metric(key, sequences.state_bytes)
            capacity.add_metric(key, sequences.capacity)
            starts.add_metric(key, sequences.started)
            ends.add_metric(key, sequences.ended)
            evictions.add_metric([*key, "idle"], sequences.evicted_idle)
            evictions.add_metric([*key, "unloaded"], sequences.evicted_unloaded)
            for event, count in sequences.store_events.items():
                store.add_metric([*key, event], count)
        return [info, batch_size, live, memory, capacity, starts, ends, evictions, store]


class _StoreCollector(Collector):
    """The shared state store's round trips, failovers and replication failures."""

    def __init__(self, store: StoreSnapshots) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        figures = self._store()
        if figures is None:
            return []
        round_trips = HistogramMetricFamily(
            "rnnserve_state_store_round_trip_seconds",
            "Round trips to the state store (one per batch and direction), by duration",
        )
        bounds = [*(floatToGoString(b) for b in ROUND_TRIP_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
        cumulative = list(itertools.accumulate(figures.round_trips))
        round_trips.add_metric([], list(zip(bounds, cumulative, strict=True)), figures.round_trip_s)
        failovers = CounterMetricFamily(
            "rnnserve_state_store_failovers",
            "Times the state store's primary moved to another server (Redis Sentinel)",
        )
        failovers.add_metric([], figures.failovers)
        replication = CounterMetricFamily(
            "rnnserve_state_store_replication_failures",
            "Write round trips that fewer than --state-min-replicas replicas acknowledged in "
            "time (their steps failed UNAVAILABLE)",
        )
        replication.add_metric([], figures.replication_failures)
        return [round_trips, failovers, replication]


def _batch_buckets(model: ModelSnapshot) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets of the model's batch sizes, and their sum in rows."""
    batches = model.statistics.batches
    counts = [0] * (len(BATCH_BUCKETS) + 1)
    total = 0
    for size, figures in batches.items():
        counts[bisect.bisect_left(BATCH_BUCKETS, size)] += figures.count
        total += size * figures.count
    cumulative = list(itertools.accumulate(counts))
    bounds = [*(floatToGoString(b) for b in BATCH_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
    return list(zip(bounds, cumulative, strict=True)), float(total)


class _GpuCollector(Collector):
    """GPU utilisation and memory through NVML; nothing at all where there is no NVML."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no library, no driver or no GPU: all mean no metrics
            logger.debug("NVML not available; no GPU metrics")

    def collect(self) -> Iterable[Metric]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        utilization = GaugeMetricFamily(
            "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
        )
        used = GaugeMetricFamily(
            "nv_gpu_memory_used_bytes", "GPU used memory (bytes)", labels=["gpu_uuid"]
        )
        total = GaugeMetricFamily(
            "nv_gpu_memory_total_bytes", "GPU total memory (bytes)", labels=["gpu_uuid"]
        )
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization.add_metric([uuid], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            used.add_metric([uuid], float(memory.used))
            total.add_metric([uuid], float(memory.total))
        return [utilization, used, total]
