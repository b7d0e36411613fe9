"""The real server in a subprocess on free loopback ports, as an operator starts it.

The process handling is the benchmark's (bench/procs.py), so tests and benchmark start
servers the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rnnserve_bench.procs import ServerProcess, start_rnnserve

RunningServer = ServerProcess


def start_server(workdir: Path, *flags: str) -> ServerProcess:
    return start_rnnserve(workdir, flags)


@contextmanager
def serving(workdir: Path, *flags: str) -> Iterator[ServerProcess]:
    """A server for the duration of a `with`, which must then stop cleanly (exit code 0)."""
    server = start_rnnserve(workdir, flags)
    yield server
    assert server.stop() == 0, server.log_text()
