"""The scale point: thousands of concurrent streams on one rnnserve server, and their memory.

On a server of its own (fresh, so that no earlier point's memory is reused and hides the cost):
after a short warm-up, `streams` idle sequences are opened (a START request each, never ended,
as `rnnserve_bench.idle` does) and the RSS they add is divided among them; then `streams`
streams run closed loops, each its own sequence, for one short window, and the RSS they add
(read at the window's end, with the idle sequences still held) is divided among them. The
window gives steps/s, latency and errors at that concurrency too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnserve_bench.idle import open_sequences, rss_bytes
from rnnserve_bench.loadgen import STREAM, LoadSpec, Snapshot, run_load
from rnnserve_bench.procs import ServerProcess
from rnnserve_bench.workload import Workload

STREAMS = 4096
WARMUP_SESSIONS = 64
"""Streams of the warm-up: the model's sessions and the transport's buffers are allocated before
the first RSS reading."""
MIN_WARMUP_S = 2.0
"""Opening 4,096 streams takes about a second on the 2-core VM: the window opens once they run."""


def peak_rss_bytes(pid: int) -> int:
    """The process's highest RSS so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def ids_needed(streams: int) -> int:
    """Sequence ids the point takes: the warm-up's, the idle sequences' and the streams'."""
    return 2 * streams + WARMUP_SESSIONS


def server_flags(streams: int) -> list[str]:
    """Room for the idle sequences, the streams' and the warm-up's at once (the model's config
    allows 4,096)."""
    return ["--max-sequences", str(ids_needed(streams))]


def measure(
    server: ServerProcess,
    workload: Workload,
    sample: Callable[[], Snapshot],
    streams: int,
    first_id: int,
    warmup_s: float,
    duration_s: float,
    sessions_per_channel: int,
) -> dict[str, Any]:
    """The point on `server` (fresh, serving `workload`'s model), with ids from `first_id` on
    (`ids_needed(streams)` of them)."""
    started = time.monotonic()

    def spec(sessions: int, first: int, warmup: float, duration: float) -> LoadSpec:
        return LoadSpec(
            mode=STREAM,
            sessions=sessions,
            steps=1,
            warmup_s=warmup,
            duration_s=duration,
            sessions_per_channel=sessions_per_channel,
            first_id=first,
        )

    def load(
        sessions: int, first: int, warmup: float, duration: float, probe: Callable[[], Snapshot]
    ) -> Any:
        messages = [workload.messages(first + i, 1) for i in range(sessions)]
        return asyncio.run(
            run_load(server.target, spec(sessions, first, warmup, duration), messages, probe)
        )

    load(WARMUP_SESSIONS, first_id, 0.2, 0.5, sample)
    first_id += WARMUP_SESSIONS
    rss_start = rss_bytes(server.pid)

    requests = [workload.request(first_id + i, 1, start=True, end=False) for i in range(streams)]
    idle_started = time.perf_counter()
    idle_errors = asyncio.run(open_sequences(server.target, requests))
    idle_seconds = time.perf_counter() - idle_started
    first_id += streams
    rss_idle = rss_bytes(server.pid)

    at_window: list[int] = []

    def probe() -> Snapshot:
        at_window.append(rss_bytes(server.pid))
        return sample()

    result = load(streams, first_id, max(warmup_s, MIN_WARMUP_S), duration_s, probe)
    rss_after = rss_bytes(server.pid)
    state_bytes = sum(4 * math.prod(s.dims) for s in workload.states)
    return {
        "transport": "native",
        "streams": streams,
        "channels": result.channels,
        "streams_in_window": list(result.started),
        "requests": result.requests,
        "errors": result.errors + idle_errors,
        "first_error": result.first_error
        or (f"{idle_errors} idle sequences were refused" if idle_errors else ""),
        "steps_per_s": result.steps_per_s,
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        "server_cpu_s_per_1000_steps": result.cpu_per_1000_steps("server_cpu_s"),
        "idle_sequences": streams,
        "idle_errors": idle_errors,
        "seconds_to_open_idle": round(idle_seconds, 2),
        "rss_start_mib": rss_start / 2**20,
        "rss_idle_mib": rss_idle / 2**20,
        "rss_streams_mib": at_window[-1] / 2**20,
        "rss_after_mib": rss_after / 2**20,
        "rss_peak_mib": peak_rss_bytes(server.pid) / 2**20,
        "rss_per_idle_sequence_bytes": (rss_idle - rss_start) / streams,
        "rss_per_open_stream_bytes": (at_window[-1] - rss_idle) / streams,
        "state_bytes_per_sequence": state_bytes,
        "seconds": round(time.monotonic() - started, 1),
    }
