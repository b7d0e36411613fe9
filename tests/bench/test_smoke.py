"""`rnnserve bench` end to end with tiny settings: every section is there, nothing failed.

No figure is compared with a speed: the machine running the tests may be slow or busy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rnnserve_bench import torchserve, triton
from tests.conftest import ROOT, run_cli


def test_bench_runs_end_to_end(tmp_path) -> None:
    out = tmp_path / "bench"
    done = run_cli(
        "bench", "--quick", "--sessions", "1,4", "--batches", "1", "--duration", "0.3",
        "--provider", "cpu", "--out", str(out), timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    for section in ("machine", "options", "inprocess", "rnnserve", "transport", "peers"):
        assert results[section], section
    assert results["machine"]["cores"] >= 1 and results["machine"]["packages"]["grpcio"]
    assert {(p["batch"], p["steps"]) for p in results["inprocess"]} == {(1, 1), (1, 32)}
    assert all(p["steps_per_s"] > 0 for p in results["inprocess"])
    assert results["options"]["provider"] == "cpu"
    assert {p["provider"] for p in results["inprocess"]} == {"CPUExecutionProvider"}

    expected = {
        (series, n) for series in ("stream T=1", "unary T=1", "stream T=32") for n in (1, 4)
    }
    for server in ("rnnserve", "transport"):
        points = results[server]
        assert {(p["series"], p["sessions"]) for p in points} == expected, server
        for p in points:
            assert p["errors"] == 0, (server, p["first_error"])
            assert p["steps_per_s"] > 0 and p["requests"] > 0, (server, p)
            assert p["p50_ms"] <= p["p99_ms"]
            assert p["server_cpu_s_per_1000_steps"] >= 0
            assert p["client_cpu_s_per_1000_steps"] >= 0
    assert all(p["mean_batch"] >= 1 for p in results["rnnserve"])
    # The model runs on the batch worker (or, for one sequence, the event loop); the transport
    # has no batch worker.
    kinds = "server_cpu_by_thread_s_per_1000_steps"
    for server in ("rnnserve", "transport"):
        for p in results[server]:
            assert set(p[kinds]) == {"event_loop", "batch", "grpc", "other"}, (server, p)
            assert p[kinds]["event_loop"] > 0, (server, p)
    assert all(p[kinds]["batch"] == 0 for p in results["transport"])
    assert any(p[kinds]["batch"] > 0 for p in results["rnnserve"] if p["sessions"] == 4)

    # The transport ceiling answers with responses of exactly rnnserve's size.
    sizes = {(p["server"], p["series"]): p["response_bytes"] for p in results["transport"]}
    for p in results["rnnserve"]:
        assert p["response_bytes"] == sizes[("transport", p["series"])] > 0, p["series"]

    assert set(results["peers"]) == {"triton", "torchserve", "perf_analyzer"}
    for name, peer in results["peers"].items():
        assert "skipped" in peer or name == "triton" or peer["steps_per_s"] > 0, (name, peer)
    _check_triton(results, done.stdout, expected)
    peer = results["peers"]["torchserve"]
    if not isinstance(torchserve.find(), str):  # `make test` installs it
        assert "skipped" not in peer, peer
        assert peer["sessions"] == 4 and peer["errors"] == 0, peer
        assert peer["server_cpu_s_per_1000_steps"] > 0, peer
        assert "- torchserve 0.12, the same model file" in done.stdout

    headline = results["headline"]
    assert headline["sessions"] == 4 and headline["E"] > 0 and headline["R"] > 0
    for name in ("results.md", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = done.stdout.strip().splitlines()[-2:]
    assert last[0].startswith(f"E = {headline['E']:.2f}"), last
    assert last[1].startswith(f"R = {headline['R']:.2f}"), last
    assert "| rnnserve | stream T=1 | 4 |" in done.stdout
    assert "## Server CPU by thread (stream T=1)" in done.stdout


def _check_triton(results: dict, stdout: str, expected: set) -> None:
    """Triton's points beside rnnserve's, where `make triton` installed it (`make test` does)."""
    peer = results["peers"]["triton"]
    if isinstance(triton.find(), str):
        assert "skipped" in peer and results["triton"] == [], peer
        return
    assert "skipped" not in peer, peer
    assert {"kind": "KIND_CPU", "count": 2} in peer["settings"]["instance_group"]
    points = results["triton"]
    crashed = {(c["series"], c["sessions"]) for c in peer["crashes"]}
    assert {(p["series"], p["sessions"]) for p in points} | crashed == expected
    for p in points:
        assert p["server"] == "triton"
        if (p["series"], p["sessions"]) not in crashed:  # it has died of SIGSEGV under load
            assert p["errors"] == 0, p["first_error"]
            assert p["steps_per_s"] > 0 and p["server_cpu_s_per_1000_steps"] > 0, p
    assert "## rnnserve and Triton 2.51, point by point" in stdout
    assert "| triton | stream T=1 | 4 |" in stdout or ("stream T=1", 4) in crashed
    assert [f["sessions"] for f in results["headline"]["triton"]] == [1, 4]
    assert "rnnserve / Triton " in stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_script_refuses_a_machine_without_a_gpu() -> None:
    done = subprocess.run(
        [str(ROOT / "bench" / "run-gpu.sh"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 2, done.stderr
    assert "no NVIDIA GPU here" in done.stderr
