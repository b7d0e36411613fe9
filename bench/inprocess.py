"""The compute limit: ONNX Runtime called in this process on the model file the server loads,
with the server's own session options, carrying the recurrent state from call to call."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime
from rnnserve_bench.workload import Workload

logger = logging.getLogger(__name__)

MIN_CALLS = 5
"""Calls a point makes at least, however long they take."""


@dataclass(frozen=True)
class InProcessResult:
    batch: int
    steps: int
    calls: int
    seconds: float
    cpu_seconds: float
    call_latencies_s: np.ndarray

    @property
    def steps_per_s(self) -> float:
        return self.batch * self.steps * self.calls / self.seconds

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_per_1000_steps(self) -> float:
        return self.cpu_seconds / (self.batch * self.steps * self.calls) * 1000

    def percentile_ms(self, q: float) -> float:
        if not len(self.call_latencies_s):
            return math.nan
        return float(np.percentile(self.call_latencies_s, q)) * 1e3


def open_runtime(workload: Workload, settings: EngineSettings) -> OnnxRuntime:
    return OnnxRuntime(workload.model_file, settings)


def measure(
    runtime: OnnxRuntime,
    workload: Workload,
    batch: int,
    steps: int,
    warmup_s: float,
    duration_s: float,
) -> InProcessResult:
    feeds: dict[str, np.ndarray] = {t.name: t.zeros(batch, steps) for t in workload.inputs}
    for state in workload.states:
        feeds[state.input_name] = np.zeros((batch, *state.dims), np.float32)
    carry = [(s.input_name, s.output_name) for s in workload.states]

    def call() -> None:
        outputs = runtime.run(feeds)
        for input_name, output_name in carry:
            feeds[input_name] = outputs[output_name]

    clock = time.perf_counter
    warm_until = clock() + warmup_s
    call()
    while clock() < warm_until:
        call()
    latencies: list[float] = []
    cpu_started = time.process_time()
    started = last = clock()
    while last - started < duration_s or len(latencies) < MIN_CALLS:
        call()
        now = clock()
        latencies.append(now - last)
        last = now
    return InProcessResult(
        batch=batch,
        steps=steps,
        calls=len(latencies),
        seconds=last - started,
        cpu_seconds=time.process_time() - cpu_started,
        call_latencies_s=np.asarray(latencies),
    )
