"""What the tests' server processes (rnnserve, Triton) have in common: a child process on
loopback ports, its output in a log file. The benchmark starts its servers on the same base."""

from __future__ import annotations

from rnnserve_bench.procs import ChildServer, HasGrpcPort, end_process

__all__ = ["ChildServer", "HasGrpcPort", "end_process"]
