"""Triton's own load generator, perf_analyzer, in sequence mode against the server: over a
gRPC stream, and over HTTP (one request at a time per sequence: perf_analyzer streams only on
gRPC)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

PERF_ANALYZER = Path(
    os.environ.get(
        "RNNSERVE_PERF_ANALYZER", ROOT / "build" / "perf_analyzer" / "bin" / "perf_analyzer"
    )
)


def run_perf_analyzer(report: Path, *args: str) -> float:
    """perf_analyzer with `args`, its report written to `report`; its inferences a second,
    once it ran without an error."""
    if not PERF_ANALYZER.exists():
        pytest.fail(f"{PERF_ANALYZER} is missing: `make test` installs it (tests/tools/)")
    done = subprocess.run(
        [str(PERF_ANALYZER), *args, "-f", str(report)], capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "error" not in output.lower(), output
    with report.open() as rows:
        (row,) = list(csv.DictReader(rows))
    return float(row["Inferences/Second"])


@pytest.mark.parametrize(
    ("model", "shape", "data"),
    [("sensor_gru", "reading:1,1", "random"), ("charlm_lstm", "tokens:1", "zero")],
)
def test_streaming_sequences_complete_without_errors(server, tmp_path, model, shape, data) -> None:
    per_second = run_perf_analyzer(
        tmp_path / "report.csv",
        "-m", model, "-i", "grpc", "-u", server.target, "--streaming",
        "--shape", shape, "--input-data", data,
        "--sequence-length", "8", "--concurrency-range", "4",
        "--measurement-mode", "count_windows", "--measurement-request-count", "150",
        "--stability-percentage", "100", "--max-trials", "4",
    )  # fmt: skip
    assert per_second > 0


def test_sequences_over_http_complete_without_errors(server, tmp_path) -> None:
    if server.ports.http is None:
        pytest.skip("the grpcio transport serves no HTTP port")
    # --sync: in its asynchronous HTTP mode perf_analyzer once (1 run in about 10) had a step
    # refused as following its sequence's END ("is not live (it ended)"), as if a sequence's
    # steps reached the server out of order over its several connections; not yet explained
    # (issue 24's note). Synchronous, each thread's steps go one after another.
    per_second = run_perf_analyzer(
        tmp_path / "report.csv",
        "-m", "sensor_gru", "-i", "http", "-u", server.http_target, "--sync",
        "--shape", "reading:1,1", "--input-data", "random",
        "--sequence-length", "8", "--concurrency-range", "4",
        "--measurement-mode", "count_windows", "--measurement-request-count", "150",
        "--stability-percentage", "100", "--max-trials", "4",
    )  # fmt: skip
    assert per_second > 0
