"""The real server in a subprocess on free loopback ports, as an operator starts it.

The process handling is the benchmark's (service/bench/procs.py), so tests and benchmark start
servers the same way.
"""

from __future__ import annotations

from pathlib import Path

from service.bench.procs import ServerProcess, start_rnnserve

RunningServer = ServerProcess


def start_server(workdir: Path, *flags: str) -> ServerProcess:
    return start_rnnserve(workdir, flags)
