"""Servers under test run as child processes on free loopback ports; their CPU time is read from
/proc and their metrics from their Prometheus endpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from rnnserve.threads import cpu_by_thread, stat_cpu

PYTHON = (sys.executable, "-P")
"""How servers under test are started: -P keeps the current folder off the module path, so a
`models/` or `service/` folder where the benchmark runs does not shadow the installed ones."""
START_TIMEOUT_S = 90.0
START_LINE = re.compile(r"serving version=\S+ transport=(\w+)")
"""rnnserve's start line, which names the transport serving the port."""


class ProcessError(RuntimeError):
    """A server under test did not start, or died."""


@dataclass(frozen=True)
class Ports:
    grpc: int
    metrics: int | None
    http: int | None = None
    """The HTTP port (the KServe v2 REST protocol), where the server has one."""


class Measured(Protocol):
    """A server under test, as a load point needs it."""

    name: str

    @property
    def target(self) -> str: ...

    def alive(self) -> bool: ...

    def log_tail(self, lines: int = 30) -> str: ...

    def cpu_seconds(self) -> float: ...

    def cpu_by_thread(self) -> dict[int, tuple[str, float]]: ...


class Restartable(Measured, Protocol):
    """A peer that may crash under load: the runner records how it ended and starts it again."""

    def death(self) -> str:
        """How the process ended, in words ("" while it runs)."""
        ...

    def restart(self) -> None: ...


class HasGrpcPort(Protocol):
    @property
    def grpc(self) -> int: ...


class ChildServer:
    """A server process the benchmark started; subclasses set `process`, `log_path`, `ports`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    ports: HasGrpcPort

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_target(self) -> str:
        """host:port of its HTTP endpoint; LookupError when it serves none."""
        port = getattr(self.ports, "http", None)
        if port is None:
            raise LookupError(f"{type(self).__name__} serves no HTTP port")
        return f"127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def death(self) -> str:
        """How the process ended, in words ("" while it runs)."""
        code = self.process.poll()
        if code is None:
            return ""
        if code < 0:
            return f"(pid {self.pid}) died of {signal.Signals(-code).name}"
        return f"(pid {self.pid}) exited with {code}"


class ServerProcess(ChildServer):
    """A server started with `--port-file`, stopped with SIGTERM on exit from its `with`;
    `restart` starts it again (on fresh ports) after it died, keeping the earlier logs as
    NAME.1.log, NAME.2.log, ..."""

    ports: Ports
    _last_threads: dict[int, tuple[str, float]]

    def __init__(self, name: str, command: Sequence[str], workdir: Path) -> None:
        self.name = name
        self._command = list(command)
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self._port_file = workdir / f"{name}.ports.json"
        self.starts = 0
        self._start()

    def _start(self) -> None:
        if self.starts:
            self.log_path.rename(self._workdir / f"{self.name}.{self.starts}.log")
        self.starts += 1
        self._last_cpu, self._last_threads = 0.0, {}
        self._port_file.unlink(missing_ok=True)
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [*self._command, "--port-file", str(self._port_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.ports = self._wait_for_ports()

    def restart(self) -> None:
        """A fresh process after a crash (or a stop)."""
        self.stop()
        self._start()

    def _wait_for_ports(self) -> Ports:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._port_file.exists():
            if self.process.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"{self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        ports = json.loads(self._port_file.read_text())
        return Ports(ports["grpc"], ports.get("metrics"), ports.get("http"))

    def cpu_seconds(self) -> float:
        """The last reading stays once the process is gone, so a point it dies in still ends."""
        try:
            self._last_cpu = process_cpu_seconds(self.pid)
        except OSError:
            pass
        return self._last_cpu

    def cpu_by_thread(self) -> dict[int, tuple[str, float]]:
        """Each thread's kind and CPU seconds (`rnnserve.threads.cpu_by_thread`); the last
        reading once the process is gone."""
        threads = cpu_by_thread(self.pid)
        if threads:
            self._last_threads = threads
        return self._last_threads

    def scrape(self) -> str:
        if self.ports.metrics is None:
            raise ProcessError(f"{self.name} exports no metrics")
        url = f"http://127.0.0.1:{self.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def stop(self, timeout: float = 30.0) -> int:
        return end_process(self.process, signal.SIGTERM, timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def end_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 20.0
) -> int:
    """Signal a process we started and wait for it (SIGKILL after `timeout_s`); its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    return process.returncode


def start_rnnserve(
    workdir: Path, server_args: Sequence[str], name: str = "rnnserve"
) -> ServerProcess:
    """The real server, started as an operator starts it (tests/server.py does the same)."""
    command = [
        *PYTHON, "-m", "rnnserve", "serve",
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        *server_args,
    ]  # fmt: skip
    return ServerProcess(name, command, workdir)


def serving_transport(server: ServerProcess, timeout_s: float = 10.0) -> str:
    """The transport the server's start line names (`transport=native` or `grpcio`).

    The line follows the port file by a moment; ProcessError if it does not come."""
    deadline = time.monotonic() + timeout_s
    while True:
        if found := START_LINE.search(server.log_text()):
            return found.group(1)
        if time.monotonic() > deadline or not server.alive():
            raise ProcessError(f"{server.name} logged no start line:\n{server.log_tail()}")
        time.sleep(0.05)


def start_echo(workdir: Path, repository: Path, model: str, steps: int) -> ServerProcess:
    command = [
        *PYTHON, "-m", "rnnserve_bench.echo", "--model", model,
        "--model-repository", str(repository), "--steps", str(steps),
    ]  # fmt: skip
    return ServerProcess(f"echo-t{steps}", command, workdir)


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads included."""
    return stat_cpu(Path(f"/proc/{pid}/stat"))[1]


def histogram_totals(metrics_text: str, name: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram for one model, all versions added up."""
    label = f'model="{model}"'
    total = count = 0.0
    for line in metrics_text.splitlines():
        if label not in line:
            continue
        if line.startswith(f"{name}_sum{{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count{{"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count
