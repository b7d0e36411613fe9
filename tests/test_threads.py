"""Threads are told apart by kind, and each kind's CPU is read from /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rnnserve.threads import (
    BATCH_THREAD,
    KINDS,
    cpu_between,
    cpu_by_thread,
    name_this_thread,
    usable_cpus,
)

pytestmark = pytest.mark.skipif(not Path("/proc/thread-self").exists(), reason="needs Linux")


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_thread_counts_as_its_kind() -> None:
    before = cpu_by_thread(os.getpid())
    assert before[os.getpid()][0] == "event_loop"
    burnt, done = threading.Event(), threading.Event()

    def work() -> None:
        name_this_thread(BATCH_THREAD)
        burn(0.3)
        burnt.set()
        done.wait(10)  # alive until it is read: a thread that ended is not in /proc

    thread = threading.Thread(target=work)
    thread.start()
    try:
        burn(0.3)  # on this, the first thread
        assert burnt.wait(10)
        names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
        after = cpu_by_thread(os.getpid())
    finally:
        done.set()
        thread.join()
    assert BATCH_THREAD in names
    used = cpu_between(before, after)
    assert set(used) == set(KINDS)
    # Clock ticks are 10 ms or finer: well under what each thread burnt.
    assert used["batch"] >= 0.2
    assert used["event_loop"] >= 0.2


def test_a_thread_that_ended_takes_only_its_own_time_out() -> None:
    before = {1: ("event_loop", 5.0), 2: ("batch", 3.0), 3: ("grpc", 9.0)}
    after = {1: ("event_loop", 6.0), 2: ("batch", 3.5), 4: ("grpc", 0.25)}  # 3 ended, 4 began
    assert cpu_between(before, after) == {
        "event_loop": 1.0,
        "batch": 0.5,
        "grpc": 0.25,
        "other": 0.0,
    }


def test_a_process_that_is_gone_has_no_threads() -> None:
    assert cpu_by_thread(2**22 + 1) == {}  # above the kernel's largest pid
    assert cpu_between({}, {}) == {}


def test_usable_cpus_are_bounded_by_the_cgroup_quota(tmp_path: Path) -> None:
    """What the default spin is decided on: a Kubernetes CPU limit of 1.5 makes 1.5 CPUs of
    however many the affinity mask has; no quota, or no cgroup v2, leaves the mask."""
    mask = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == min(mask, 1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == mask
    assert usable_cpus(tmp_path / "absent") == mask
