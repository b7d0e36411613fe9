"""A server that dies under load (Triton 2.51 has, of SIGSEGV) costs its point, never the run:
the runner records the crash with the log's tail, starts the server again and goes on. First
with a stand-in whose load is scripted, then with the real rnnserve killed mid-point and
mid-perf_analyzer run."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rnnserve_bench import peers, report, runner
from rnnserve_bench.loadgen import LoadResult, LoadSpec
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import ProcessError, ServerProcess, start_rnnserve
from rnnserve_bench.workload import load_workload
from tests.conftest import BUNDLED

WORKLOAD = SimpleNamespace(model="fake", messages=lambda sequence, steps: None)
OPTIONS = BenchOptions(duration_s=0.1, warmup_s=0)


class FakePeer:
    """A `sleep` standing in for Triton: `restart` starts another, unless told it cannot."""

    name = "fake"
    target = "127.0.0.1:1"

    def __init__(self, log: Path) -> None:
        self.log_path = log
        log.write_text("starting\nSignal (11) received.\n")
        self.can_restart = True
        self.starts = 0
        self.restart()

    def restart(self) -> None:
        if not self.can_restart:
            raise ProcessError("the fake peer would not start")
        self.process = subprocess.Popen(["sleep", "60"])
        self.starts += 1

    def alive(self) -> bool:
        return self.process.poll() is None

    def death(self) -> str:
        code = self.process.poll()
        return "" if code is None else f"died of {signal.Signals(-code).name}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        return 0.0

    def cpu_by_thread(self) -> dict[int, tuple[str, float]]:
        return {}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def peer(tmp_path, monkeypatch):
    """The fake peer; each point's load kills it when `peer.kill_next` is set."""
    fake = FakePeer(tmp_path / "fake.log")
    fake.kill_next = False

    async def load(target, spec: LoadSpec, messages, sample, api) -> LoadResult:
        before = sample()
        errors = 0
        if fake.kill_next:
            fake.process.kill()
            fake.process.wait()
            fake.kill_next, errors = False, 3
        after = sample()
        return LoadResult(
            spec, 10, errors, "UNAVAILABLE" if errors else "", 1.0, np.full(10, 1e-3),
            before, after, 100, 1,
        )  # fmt: skip

    monkeypatch.setattr(runner, "run_load", load)
    monkeypatch.setattr(runner, "SETTLE_S", 0.0)
    yield fake
    fake.stop()


def measure(run: runner.PeerRun, sessions: int) -> dict | None:
    series = runner.Series("stream", 1)
    return runner.peer_point(OPTIONS, WORKLOAD, run, series, sessions, runner._Ids())  # type: ignore[arg-type]


def test_a_peer_that_dies_mid_point_is_recorded_and_started_again(peer) -> None:
    run = runner.PeerRun(peer)
    peer.kill_next = True
    crashed = measure(run, 1)
    assert peer.alive() and peer.starts == 2
    [crash] = run.crashes
    assert crash["sessions"] == 1 and crash["when"] == "during the point"
    assert crash["death"] == "died of SIGKILL" and "Signal (11)" in crash["log_tail"]
    assert crashed is not None and crashed["crashed"] and crashed["errors"] == 3

    fine = measure(run, 2)  # the run goes on with the fresh process
    assert fine is not None and fine["sessions"] == 2 and "crashed" not in fine
    assert len(run.crashes) == 1 and run.stopped == ""

    # Rounds of one point: the median of the rounds without a crash speaks for it (a crashed
    # round's figures measure the crash), and the crash is not forgotten.
    faster = {**fine, "steps_per_s": 3 * fine["steps_per_s"]}
    point = runner.median_point([fine, crashed, faster])
    assert point["steps_per_s"] == fine["steps_per_s"] and point["rounds"] == 3
    assert point["crashed"] and point["crashed_rounds"] == 1
    assert point["errors"] == 3 and point["first_error"] == "UNAVAILABLE"
    slow_crash = {**crashed, "steps_per_s": fine["steps_per_s"] / 10}
    assert (
        runner.median_point([slow_crash, faster, slow_crash])["steps_per_s"]
        == faster["steps_per_s"]
    )
    assert runner.median_point([slow_crash])["crashed_rounds"] == 1
    assert sorted(point["steps_per_s_rounds"]) == sorted(
        [fine["steps_per_s"], crashed["steps_per_s"], 3 * fine["steps_per_s"]]
    )


def test_a_peer_found_dead_between_points_or_that_will_not_restart_stops_cleanly(peer) -> None:
    run = runner.PeerRun(peer)
    peer.stop()
    peer.can_restart = False
    assert measure(run, 1) is None  # found dead before the point, and it will not start again
    assert run.crashes[0]["when"] == "between points"
    assert run.server is None and "would not start" in run.stopped
    assert measure(run, 2) is None  # later points are skipped, not failed


# ---------------------------------------------------------------- real servers that die
@pytest.fixture
def real_server(tmp_path):
    """rnnserve on grpc.aio, started by the benchmark's own harness; the tests kill it."""
    flags = ["--provider", "cpu", "--transport", "grpcio", "--log-level", "WARNING"]
    with start_rnnserve(tmp_path / "logs", flags, "rnnserve-grpcio") as server:
        yield server


def kill_after(server: ServerProcess, seconds: float) -> threading.Timer:
    """SIGKILL the server's current process in `seconds` (a process this test started)."""
    process = server.process
    timer = threading.Timer(seconds, lambda: process.poll() is None and process.kill())
    timer.start()
    return timer


def test_a_real_server_that_dies_mid_point_is_marked_and_started_again(
    real_server, tmp_path
) -> None:
    workload = load_workload(BUNDLED, "charlm_lstm")
    options = BenchOptions(duration_s=1.5, warmup_s=0.2, out=tmp_path)
    run = runner.PeerRun(real_server, "rnnserve-grpcio", scrape=True)
    ids, series, first_pid = runner._Ids(), runner.Series("stream", 1), real_server.pid

    timer = kill_after(real_server, 0.8)  # inside the window
    crashed = runner.peer_point(options, workload, run, series, 4, ids)
    timer.join()

    assert crashed is not None and crashed["crashed"] and not crashed["valid"]
    assert crashed["server"] == "rnnserve-grpcio" and crashed["errors"] > 0
    [crash] = run.crashes
    assert crash["when"] == "during the point" and crash["sessions"] == 4
    assert crash["death"] == f"(pid {first_pid}) died of SIGKILL"
    assert real_server.alive() and real_server.pid != first_pid and real_server.starts == 2
    assert (tmp_path / "logs" / "rnnserve-grpcio.1.log").exists()  # the dead one's log is kept

    fine = runner.peer_point(options, workload, run, series, 4, ids)  # the run goes on
    assert fine is not None and fine["valid"] and fine["errors"] == 0 and fine["requests"] > 0
    assert fine["mean_batch"] >= 1  # its metrics are read on the fresh process's ports
    point = runner.median_point([crashed, fine])
    assert point["valid"] and point["crashed_rounds"] == 1 and report.valid(point)
    assert not report.valid(runner.median_point([crashed]))


@pytest.mark.skipif(peers.find_perf_analyzer() is None, reason=peers.missing())
def test_perf_analyzer_against_a_real_server_that_dies(real_server, tmp_path) -> None:
    workload = load_workload(BUNDLED, "charlm_lstm")
    binary = peers.find_perf_analyzer()
    assert binary is not None
    run = runner.PeerRun(real_server, "rnnserve-grpcio")

    kill_after(real_server, 0).join()
    real_server.process.wait()
    before = runner.PerfAnalyzerRun(binary, "streaming", 4, 0.5, 1)
    measured = runner.perf_analyzer_run(before, workload, run, tmp_path)
    assert [c["when"] for c in run.crashes] == ["between points"]
    assert "crashed" not in measured and measured["steps_per_s"] > 0, measured  # the fresh one

    timer = kill_after(real_server, 1.5)  # perf_analyzer measures 3 windows of 1 s
    during = runner.PerfAnalyzerRun(binary, "unary", 4, 1.0, 2)
    measured = runner.perf_analyzer_run(during, workload, run, tmp_path)
    timer.join()
    assert measured["crashed"] and not report.valid(measured), measured
    assert [c["when"] for c in run.crashes] == ["between points", "during the run"]
    assert real_server.alive() and real_server.starts == 3
    assert report.verdict(measured, {"steps_per_s": 1.0, "p99_ms": 1.0})["status"] == (
        "missed: rnnserve crashed"
    )
