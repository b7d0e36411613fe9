"""Cumulative figures of one model version, for ModelStatistics and metrics.

Written on the event loop (once per batch, once per refused request), read from any thread
through `snapshot()`; one lock keeps each update and each snapshot whole.
"""

from __future__ import annotations

import threading
import time

from rnnserve.serving.snapshot import BatchFigures, StatisticsSnapshot


class Statistics:
    """Triton's ModelStatistics figures, in its terms; durations in nanoseconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inference_count = 0
        self._execution_count = 0
        self._success_count = 0
        self._success_ns = 0
        self._fail_count = 0
        self._fail_ns = 0
        self._queue_ns = 0
        self._compute_ns = 0
        self._last_inference_ms = 0
        self._batches: dict[int, tuple[int, int]] = {}
        """Batch size (rows) -> (model calls, their nanoseconds)."""

    def refused(self) -> None:
        """A request refused before it was queued (it names no input the model has, ...)."""
        with self._lock:
            self._fail_count += 1

    def completed(
        self,
        rows: int,
        compute_ns: int,
        queue_ns: int,
        succeeded: tuple[int, int],
        failed: tuple[int, int],
    ) -> None:
        """A batch of `rows` rows completed.

        `rows` is 0 for a batch that did not run (cancelled, or its model call failed); then
        only the requests count. `compute_ns` is the model call's nanoseconds, `queue_ns` the
        requests' waits added up; `succeeded` and `failed` are (requests, their nanoseconds
        from submission to outcome).
        """
        with self._lock:
            self._success_count += succeeded[0]
            self._success_ns += succeeded[1]
            self._fail_count += failed[0]
            self._fail_ns += failed[1]
            if rows == 0:
                return
            self._inference_count += rows
            self._execution_count += 1
            # Triton's compute figure is per request: each request of the batch waited for it.
            self._compute_ns += compute_ns * (succeeded[0] + failed[0])
            self._queue_ns += queue_ns
            self._last_inference_ms = int(time.time() * 1000)
            count, ns = self._batches.get(rows, (0, 0))
            self._batches[rows] = (count + 1, ns + compute_ns)

    def snapshot(self) -> StatisticsSnapshot:
        """The figures as they are now."""
        with self._lock:
            return StatisticsSnapshot(
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success_count=self._success_count,
                success_ns=self._success_ns,
                fail_count=self._fail_count,
                fail_ns=self._fail_ns,
                queue_ns=self._queue_ns,
                compute_ns=self._compute_ns,
                last_inference_ms=self._last_inference_ms,
                batches={size: BatchFigures(*figures) for size, figures in self._batches.items()},
            )
