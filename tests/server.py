"""The real server in a subprocess on free loopback ports, started as an operator starts it.

The tests' own harness: the benchmark (bench/procs.py) starts its servers its own way, with CPU
sampling the tests do not need.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.child import ChildServer

START_TIMEOUT_S = 90.0
"""Loading the bundled models takes a few seconds; a busy test machine, more."""


@dataclass(frozen=True)
class Ports:
    grpc: int
    metrics: int | None
    """None when the server was started with `--metrics-port off`."""
    http: int | None = None
    """None when the server serves no HTTP port (--http-port off, or the grpcio transport)."""


class RunningServer(ChildServer):
    """`rnnserve serve` on 127.0.0.1 with `flags` (and `env` added to the environment), its
    output in `workdir/rnnserve.log`."""

    def __init__(
        self,
        workdir: Path,
        flags: tuple[str, ...],
        env: Mapping[str, str] | None = None,
        transport: str | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "rnnserve.log"
        port_file = workdir / "rnnserve.ports.json"
        port_file.unlink(missing_ok=True)
        # -P: a models/ or service/ folder in the current directory must not shadow the package.
        command = [
            sys.executable, "-P", "-m", "rnnserve", "serve",
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
            "--port-file", str(port_file),
            *(("--transport", transport) if transport else ()), *flags,
        ]  # fmt: skip
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env},
            )
        self.ports = self._wait_for_ports(port_file)

    def _wait_for_ports(self, port_file: Path) -> Ports:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rnnserve exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"rnnserve wrote no port file in {START_TIMEOUT_S:.0f} s:\n{self.log_text()}"
                )
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())  # written whole: the server renames it in
        return Ports(ports["grpc"], ports["metrics"] or None, ports.get("http"))

    def scrape(self, host: str = "127.0.0.1") -> str:
        """The Prometheus exposition text of /metrics (at `host`: the server's --metrics-host)."""
        assert self.ports.metrics is not None, "this server exports no metrics"
        url = f"http://{host}:{self.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def counts_by_reason(self, counter: str) -> dict[str, float]:
        """The samples of the counter `counter` (its name without _total), by `reason`."""
        prefix = f"{counter}_total{{"
        found = {}
        for row in self.scrape().splitlines():
            if row.startswith(prefix):
                found[row.split('reason="')[1].split('"')[0]] = float(row.split()[-1])
        return found

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), SIGKILL after `timeout` seconds; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return self.process.returncode


def start_server(
    workdir: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    transport: str | None = None,
) -> RunningServer:
    """A server the caller stops (`stop()`), or that a test kills itself."""
    return RunningServer(workdir, flags, env, transport)


@contextmanager
def serving(
    workdir: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    transport: str | None = None,
) -> Iterator[RunningServer]:
    """A server for the duration of a `with`, which must then stop cleanly (exit code 0);
    `env`: variables set for it beside the test's own; `transport`: --transport (native or
    grpcio; the server's default when None)."""
    server = RunningServer(workdir, flags, env, transport)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
