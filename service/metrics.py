"""Every Prometheus metric the server exports, in one place, on a registry of its own.

Labels are few and fixed (model, version, stage, outcome, reason); never a sequence id.
Sequence gauges and counters are read from the serving layer at scrape time, so the figures
have one owner and cannot drift. GPU figures come from NVML when it is there, labelled
`gpu_uuid` only and named as Triton names them, so `perf_analyzer --collect-metrics` reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.batching.batcher import Step
from service.serving.model import ServedModel
from service.sessions.sync import EVENTS

logger = logging.getLogger(__name__)

# From 25 us: a single LSTM step on a CPU takes well under a millisecond.
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN_MODEL = "_unknown"
"""Label for requests naming a model that is not served: client input never becomes a label."""


class Metrics:
    def __init__(self, models: Callable[[], Iterable[ServedModel]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rnnserve_requests",
            "Inference requests by model, version and outcome (ok or a gRPC status name)",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "rnnserve_request_duration_seconds",
            "Request latency by stage: queue (waiting for a batch), compute (the batch's model "
            "call, state gather and scatter included) and total (decode to encode)",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Rows (sequences) per model call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}
        self.registry.register(_ServingCollector(models))
        self.registry.register(_GpuCollector())

    def observe_request(
        self,
        model: str,
        version: str,
        outcome: str,
        total_s: float,
        queue_s: float | None = None,
        compute_s: float | None = None,
    ) -> None:
        count, total, queue, compute = self._children(model, version, outcome)
        count.inc()
        total.observe(total_s)
        if queue_s is not None:
            queue.observe(queue_s)
        if compute_s is not None:
            compute.observe(compute_s)

    def _children(self, model: str, version: str, outcome: str) -> tuple[Any, Any, Any, Any]:
        """The labelled series of one request kind, looked up once (labels() is not free)."""
        key = (model, version, outcome)
        children = self._request_children.get(key)
        if children is None:
            duration = self.request_duration
            children = (
                self.requests.labels(model, version, outcome),
                duration.labels(model, version, "total"),
                duration.labels(model, version, "queue"),
                duration.labels(model, version, "compute"),
            )
            self._request_children[key] = children
        return children

    def observe_batch(self, model: ServedModel, batch: Sequence[Step], compute_s: float) -> None:
        self.batch_size.labels(model.name, str(model.version)).observe(sum(s.rows for s in batch))


class _ServingCollector(Collector):
    def __init__(self, models: Callable[[], Iterable[ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "version"]
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
        info = GaugeMetricFamily(
            "rnnserve_model_info",
            "Loaded model versions and the execution provider each runs on",
            labels=[*labels, "provider"],
        )
        for model in self._models():
            key = [model.name, str(model.version)]
            info.add_metric([*key, model.runtime.provider], 1)
            if model.sequences is None or model.arena is None:
                continue
            live.add_metric(key, len(model.sequences.live))
            memory.add_metric(key, model.state_bytes)
            capacity.add_metric(key, model.arena.capacity)
            counters = model.sequences.counters
            starts.add_metric(key, counters.started)
            ends.add_metric(key, counters.ended)
            for reason in ("idle", "unloaded"):
                evictions.add_metric([*key, reason], counters.evicted.get(reason, 0))
            if model.sync is not None:
                for event in EVENTS:
                    store.add_metric([*key, event], model.sync.events[event])
        return [live, memory, capacity, starts, ends, evictions, store, info]


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
