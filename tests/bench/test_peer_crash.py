"""A peer that dies under load (Triton 2.51 has, of SIGSEGV) costs its point, never the run: the
runner records the crash with the log's tail, starts the peer again and goes on."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rnnserve_bench import runner
from rnnserve_bench.loadgen import LoadResult, LoadSpec
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import ProcessError

WORKLOAD = SimpleNamespace(messages=lambda sequence, steps: None)
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
