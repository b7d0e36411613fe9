"""Threads by what they do, and the CPU each kind uses, from /proc (Linux; nothing elsewhere).

The batch workers name themselves, so `top -H`, py-spy and the benchmark can tell them from
ONNX Runtime's pool threads, which, like every thread Python starts, are called "python".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BATCH_THREAD = "rnnserve-batch"
GRPC_THREADS = ("event_engine", "grpc_global_tim", "lifeguard", "rnnserve-io")
"""gRPC's core threads, and the native transport's (its tokio runtime, native/src/server.rs)."""
KINDS = ("event_loop", "batch", "grpc", "other")
"""The process's first thread runs the event loop; `other` is mostly ONNX Runtime's pools."""


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """How many CPUs this process may use at once: its affinity mask, bounded by its cgroup's
    CPU quota where one is set (cgroup v2 `cpu.max`, "quota period" in microseconds; a
    Kubernetes CPU limit). Affinity alone where there is no quota or no cgroup v2."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return cpus
    return min(cpus, int(quota) / int(period))


def name_this_thread(name: str) -> None:
    """Set the calling thread's name as the kernel shows it (15 characters at most)."""
    try:
        Path("/proc/thread-self/comm").write_text(name[:15])
    except OSError:
        logger.debug("cannot name thread %s", name)


def cpu_by_thread(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of a process: its kind, and its user plus system CPU seconds."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    threads = {}
    for tid in tids:
        try:
            name, seconds = stat_cpu(Path(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:
            continue  # the thread ended meanwhile
        threads[int(tid)] = (_kind(int(tid) == pid, name), seconds)
    return threads


def stat_cpu(path: Path) -> tuple[str, float]:
    """The name and user plus system CPU seconds in a /proc `stat` file (process or thread)."""
    stat = path.read_text()
    # The name (field 2) may hold spaces; the fields after it are space-separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], (
        int(fields[11]) + int(fields[12])
    ) / CLOCK_TICKS


def cpu_between(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds by kind between two readings, over the threads alive at the second.

    Per thread, so a thread that ends in between takes only its own time out of the sum.
    """
    if not after:
        return {}
    totals = dict.fromkeys(KINDS, 0.0)
    for tid, (kind, seconds) in after.items():
        start = before.get(tid)
        totals[kind] += seconds - (start[1] if start is not None and start[0] == kind else 0.0)
    return totals


def _kind(first: bool, name: str) -> str:
    if first:
        return "event_loop"
    if name == BATCH_THREAD:
        return "batch"
    if name.startswith(GRPC_THREADS):
        return "grpc"
    return "other"
