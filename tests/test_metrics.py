"""Request metrics, folded into buckets in bulk, expose what prometheus_client's own Histogram
and Counter expose for the same observations."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.metrics import FOLD_EVERY, LATENCY_BUCKETS, Metrics


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
