"""What the tests' server processes (rnnserve, Triton) have in common: a child process on
loopback ports, its output in a log file."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Protocol

from rnnserve_bench.procs import end_process

__all__ = ["ChildServer", "HasGrpcPort", "end_process"]


class HasGrpcPort(Protocol):
    @property
    def grpc(self) -> int: ...


class ChildServer:
    """A server process the test started; subclasses set `process`, `log_path` and `ports`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    ports: HasGrpcPort

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
