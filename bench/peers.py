"""Triton's perf_analyzer, Triton's own load generator, run unchanged against each server when it
is installed, and skipped with a reason when it is not. (The peer servers are
`rnnserve_bench.triton` and `rnnserve_bench.torchserve`.)

It runs in its three ways of sending a sequence's steps: one ModelInfer call per step (its
default, asynchronous for a sequence model), one bidirectional stream per sequence
(`--streaming`), and one HTTP request per step (`-i http`, the KServe v2 REST protocol).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from rnnserve_bench.workload import Workload

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = Path("build") / "perf_analyzer" / "bin" / "perf_analyzer"
SEQUENCE_LENGTH = 20
UNARY = "unary"
STREAMING = "streaming"
HTTP = "http"
MODES = (UNARY, STREAMING, HTTP)
"""Its default (ModelInfer), --streaming (ModelStreamInfer) and -i http (POST .../infer)."""
CONCURRENCIES = {HTTP: (1, 16)}
"""Concurrencies a mode runs at besides the headline's (1 and the headline for the others): the
HTTP issue's targets are at 1, 16 and 64."""
IDS_PER_RUN = 10_000
"""Sequence ids each run has to itself (`--sequence-id-range`): a run leaves the sequences it
was in the middle of open, and the next must not find them."""
TRIALS = 3
"""Measurement windows per run. Its stability check is set out of reach, so every run measures
exactly this many windows and reports them, as the benchmark's own points do; left to itself it
may give up on a lone sequence whose latency varies more than it allows (no figure at all)."""
TIMEOUT_S = 180


def find_perf_analyzer() -> Path | None:
    """$RNNSERVE_PERF_ANALYZER, else what `make perf-analyzer` installs, here or in the checkout."""
    candidates = [Path.cwd() / PERF_ANALYZER, REPOSITORY_ROOT / PERF_ANALYZER]
    if "RNNSERVE_PERF_ANALYZER" in os.environ:
        candidates.insert(0, Path(os.environ["RNNSERVE_PERF_ANALYZER"]))
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def missing() -> str:
    return f"perf_analyzer not found ({PERF_ANALYZER}; `make perf-analyzer`)"


def command(
    binary: Path,
    target: str,
    workload: Workload,
    mode: str,
    concurrency: int,
    interval_s: float,
    first_id: int,
    report: Path,
) -> list[str]:
    """perf_analyzer's command line: `concurrency` sequences of SEQUENCE_LENGTH one-step
    requests, zeros as input, TRIALS windows of `interval_s`."""
    if mode not in MODES:
        raise ValueError(f"perf_analyzer mode {mode!r} is not one of {MODES}")
    shapes = [f"{t.name}:{','.join(str(d) for d in t.shape(1, 1)[1:])}" for t in workload.inputs]
    return [
        str(binary), "-m", workload.model, "-i", "http" if mode == HTTP else "grpc", "-u", target,
        *(["--streaming"] if mode == STREAMING else []),
        *(arg for shape in shapes for arg in ("--shape", shape)),
        "--input-data", "zero", "--sequence-length", str(SEQUENCE_LENGTH),
        "--sequence-id-range", f"{first_id}:{first_id + IDS_PER_RUN - 1}",
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(max(500, round(interval_s * 1000))),
        "--max-trials", str(TRIALS), "--stability-percentage", "10000", "-f", str(report),
    ]  # fmt: skip


def perf_analyzer(
    binary: Path,
    target: str,
    workload: Workload,
    mode: str,
    concurrency: int,
    interval_s: float,
    first_id: int,
    report: Path,
) -> dict[str, Any]:
    """One run at one concurrency: its steps/s and latency percentiles, or `failed` with the
    reason (the tail of its output)."""
    argv = command(binary, target, workload, mode, concurrency, interval_s, first_id, report)
    report.unlink(missing_ok=True)
    found: dict[str, Any] = {
        "mode": mode,
        "concurrency": concurrency,
        "sequence_length": SEQUENCE_LENGTH,
        "command": argv,
    }
    logger.info("running %s", " ".join(argv))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**found, "failed": f"perf_analyzer ran past {TIMEOUT_S} s"}
    output = done.stdout + done.stderr
    if done.returncode != 0 or not report.exists():
        tail = " / ".join(line.strip() for line in output.splitlines()[-4:] if line.strip())
        return {**found, "failed": f"perf_analyzer exited with {done.returncode}: {tail}"}
    rows = list(csv.DictReader(io.StringIO(report.read_text())))
    if not rows:
        return {**found, "failed": "perf_analyzer wrote no result row"}
    row = rows[-1]
    return {
        **found,
        "steps_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
    }
