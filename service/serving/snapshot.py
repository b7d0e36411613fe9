"""What the engine publishes about each loaded model version: frozen snapshots.

Metrics and ModelStatistics read these and nothing else of the engine. A snapshot is taken
from any thread (a Prometheus scrape runs on the HTTP server's) while the event loop goes on:
it is built from whole reads of plain counters and copies made under the figures' lock, so a
scrape during a load, an unload or a burst of batches cannot fail or see half an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rnnserve.sessions.store import ROUND_TRIP_BUCKETS, StoreStatistics

StoreSnapshot = StoreStatistics
"""What the shared state store has seen (None where the store is memory)."""
__all__ = ["ROUND_TRIP_BUCKETS", "StoreSnapshot"]


@dataclass(frozen=True, slots=True)
class BatchFigures:
    """Model calls of one batch size (rows)."""

    count: int
    compute_ns: int
    """Nanoseconds those calls took, all together."""


@dataclass(frozen=True, slots=True)
class StatisticsSnapshot:
    """Cumulative figures in Triton's terms (ModelStatistics); durations in nanoseconds."""

    inference_count: int = 0
    """Batch rows run (Triton counts each row of a batch as one inference)."""
    execution_count: int = 0
    """Model calls (batches) run."""
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    """Milliseconds since the Unix epoch of the latest batch; 0 when none ran."""
    batches: Mapping[int, BatchFigures] = field(default_factory=dict)
    """Model calls by batch size."""


@dataclass(frozen=True, slots=True)
class SequenceSnapshot:
    """A streamable model version's sequences and state."""

    live: int
    """Sequences whose state it holds."""
    capacity: int
    """Most live sequences it holds."""
    state_bytes: int
    """Bytes of recurrent state held for the live sequences."""
    started: int
    ended: int
    evicted_idle: int
    evicted_unloaded: int
    store_events: Mapping[str, int]
    """State store traffic by event (`rnnserve.sessions.sync.EVENTS`)."""


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """One loaded model version."""

    name: str
    version: int
    state: str
    """READY, UNLOADING or UNAVAILABLE."""
    provider: str
    """The execution provider ONNX Runtime runs it on."""
    statistics: StatisticsSnapshot
    sequences: SequenceSnapshot | None
    """None for a whole-sequence model."""
