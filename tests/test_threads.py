"""Threads are told apart by kind, and each kind's CPU is read from /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from service.threads import BATCH_THREAD, KINDS, cpu_by_kind, name_this_thread

pytestmark = pytest.mark.skipif(not Path("/proc/thread-self").exists(), reason="needs Linux")


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_thread_counts_as_its_kind() -> None:
    before = cpu_by_kind(os.getpid())
    assert set(before) == set(KINDS)
    burnt, done = threading.Event(), threading.Event()

    def work() -> None:
        name_this_thread(BATCH_THREAD)
        burn(0.3)
        burnt.set()
        done.wait(10)  # alive until it is read: a thread that ended is not in /proc

    thread = threading.Thread(target=work)
    thread.start()
    burn(0.3)  # on this, the first thread
    assert burnt.wait(10)
    names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    after = cpu_by_kind(os.getpid())
    done.set()
    thread.join()
    assert BATCH_THREAD in names
    # Clock ticks are 10 ms or finer: well under what each thread burnt.
    assert after["batch"] - before["batch"] >= 0.2
    assert after["event_loop"] - before["event_loop"] >= 0.2


def test_a_process_that_is_gone_has_no_threads() -> None:
    assert cpu_by_kind(2**22 + 1) == {}  # above the kernel's largest pid
