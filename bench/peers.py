"""Triton's perf_analyzer against rnnserve, run when it is installed and skipped with a reason
when it is not. (The peer server, TorchServe, is `rnnserve_bench.torchserve`.)"""

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


def find_perf_analyzer() -> Path | None:
    """$RNNSERVE_PERF_ANALYZER, else what `make perf-analyzer` installs, here or in the checkout."""
    candidates = [Path.cwd() / PERF_ANALYZER, REPOSITORY_ROOT / PERF_ANALYZER]
    if "RNNSERVE_PERF_ANALYZER" in os.environ:
        candidates.insert(0, Path(os.environ["RNNSERVE_PERF_ANALYZER"]))
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def perf_analyzer(
    target: str, workload: Workload, concurrency: int, interval_s: float, workdir: Path
) -> dict[str, Any]:
    """perf_analyzer's streaming sequence mode at one concurrency, one step per request."""
    binary = find_perf_analyzer()
    if binary is None:
        return {"skipped": f"perf_analyzer not found ({PERF_ANALYZER}; `make perf-analyzer`)"}
    report = workdir / "perf_analyzer.csv"
    report.unlink(missing_ok=True)
    shapes = [f"{t.name}:{','.join(str(d) for d in t.shape(1, 1)[1:])}" for t in workload.inputs]
    command = [
        str(binary), "-m", workload.model, "-i", "grpc", "-u", target, "--streaming",
        *(arg for shape in shapes for arg in ("--shape", shape)),
        "--input-data", "zero", "--sequence-length", str(SEQUENCE_LENGTH),
        "--concurrency-range", str(concurrency),
        "--measurement-interval", str(max(500, round(interval_s * 1000))),
        "--max-trials", "3", "--stability-percentage", "100", "-f", str(report),
    ]  # fmt: skip
    logger.info("running %s", " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"skipped": "perf_analyzer ran past 180 s", "command": command}
    output = done.stdout + done.stderr
    if done.returncode != 0 or not report.exists():
        tail = "\n".join(output.splitlines()[-10:])
        return {"skipped": f"perf_analyzer failed ({done.returncode}): {tail}", "command": command}
    rows = list(csv.DictReader(io.StringIO(report.read_text())))
    if not rows:
        return {"skipped": "perf_analyzer wrote no result row", "command": command}
    row = rows[-1]
    return {
        "concurrency": concurrency,
        "sequence_length": SEQUENCE_LENGTH,
        "steps_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "command": command,
    }
