"""Request metrics, folded into buckets in bulk, expose what prometheus_client's own Histogram
and Counter expose for the same observations."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.metrics import BATCH_BUCKETS, FOLD_EVERY, LATENCY_BUCKETS, Metrics
from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, Provider, Spinning
from rnnserve.serving.model import Limits
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, SequenceControl
from rnnserve.serving.snapshot import BatchFigures, ModelSnapshot, StatisticsSnapshot
from tests.conftest import BUNDLED


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_request_metrics_match_prometheus_client() -> None:
    metrics = Metrics(lambda: [])
    reference = CollectorRegistry()
    counter = Counter("rnnserve_requests", "", ["model", "version", "outcome"], registry=reference)
    histogram = Histogram(
        "rnnserve_request_duration_seconds",
        "",
        ["model", "version", "stage"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    rng = np.random.default_rng(3)
    # Bounds themselves, values between them and beyond the last; more than one fold's worth.
    durations = [*LATENCY_BUCKETS, 0.0, 20.0, *rng.lognormal(-7, 2, FOLD_EVERY + 500).tolist()]
    for i, total in enumerate(durations):
        model, version = ("charlm_lstm", "1") if i % 3 else ("sensor_gru", "2")
        if i % 7 == 0:
            metrics.observe_request(model, version, "INVALID_ARGUMENT", total)
            counter.labels(model, version, "INVALID_ARGUMENT").inc()
            histogram.labels(model, version, "total").observe(total)
            continue
        queue, compute = total / 4, total / 2
        metrics.observe_request(model, version, "OK", total, queue, compute)
        counter.labels(model, version, "OK").inc()
        for stage, value in (("total", total), ("queue", queue), ("compute", compute)):
            histogram.labels(model, version, stage).observe(value)
    ours = samples(generate_latest(metrics.registry).decode())
    theirs = samples(generate_latest(reference).decode())
    for key, value in theirs.items():
        assert key in ours, key
        if key[0].endswith("_sum"):
            assert ours[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert ours[key] == value, key
    # A scrape folds what is pending; a second one, with nothing new, reads the same.
    assert samples(generate_latest(metrics.registry).decode()) == ours


def snapshot_with_batches(batches: dict[int, int]) -> ModelSnapshot:
    statistics = StatisticsSnapshot(
        batches={size: BatchFigures(count, 1000 * count) for size, count in batches.items()}
    )
    return ModelSnapshot("charlm_lstm", 1, "READY", "CPUExecutionProvider", statistics, None)


def test_batch_sizes_from_snapshots_match_prometheus_client() -> None:
    batches = {1: 5, 2: 1, 3: 7, 64: 2, 100: 1, 1024: 3, 5000: 2}
    metrics = Metrics(lambda: [snapshot_with_batches(batches)])
    reference = CollectorRegistry()
    histogram = Histogram(
        "rnnserve_batch_size", "", ["model", "version"], buckets=BATCH_BUCKETS, registry=reference
    )
    for size, count in batches.items():
        for _ in range(count):
            histogram.labels("charlm_lstm", "1").observe(size)
    ours = samples(generate_latest(metrics.registry).decode())
    theirs = samples(generate_latest(reference).decode())
    assert theirs and all(ours[key] == value for key, value in theirs.items())


async def test_scrapes_during_loads_unloads_and_inference_never_fail() -> None:
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(Provider.CPU, spinning=Spinning.NEVER)),
        Limits(max_queue_delay_s=0.0),
        unload_grace_s=0.0,
    )
    await registry.load_all()
    metrics = Metrics(registry.snapshot)
    stop, failures, scrapes = threading.Event(), [], [0]

    def scrape() -> None:
        while not stop.is_set():
            try:
                generate_latest(metrics.registry)
                scrapes[0] += 1
            except Exception as error:  # noqa: BLE001 - the test reports it
                failures.append(error)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for round_ in range(20):
            await registry.unload("sensor_gru")
            await registry.load("digits_lstm")
            sid = f"s{round_}"
            for t in range(3):
                request = InferenceRequest(
                    "charlm_lstm",
                    {"tokens": np.full((1, 1), t, np.int64)},
                    sequence=SequenceControl(sid, start=t == 0, end=t == 2),
                )
                await registry.get("charlm_lstm").infer(request)
            while registry.versions("sensor_gru"):  # retired in the background
                await asyncio.sleep(0.001)
            await registry.load("sensor_gru")
    finally:
        stop.set()
        scraper.join(30)
        await registry.stop()
    assert not failures, failures[:3]
    assert scrapes[0] > 20
    text = generate_latest(metrics.registry).decode()
    assert 'rnnserve_sequence_starts_total{model="charlm_lstm",version="1"} 20.0' in text
