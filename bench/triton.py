"""The real Triton Inference Server 2.51 (CPU) as the benchmark's main peer.

`make triton` installs it into build/triton; its `run REPOSITORY HTTP GRPC METRICS` launcher
serves the model repository unchanged on loopback. The load generator drives it exactly as it
drives rnnserve (ModelStreamInfer and ModelInfer), and its answers equal rnnserve's.

Readiness and the model's configuration are read over Triton's HTTP API, so the benchmark needs
no tritonclient. Triton is stopped with SIGKILL: on SIGTERM it waits its 30 s exit timeout for
the live sequences. It has died of SIGSEGV under heavy streaming in about a third of runs on the
2-core VM, so the runner restarts it (`restart`) and records the crash (`death`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rnnserve.threads import cpu_by_thread
from rnnserve_bench.procs import ChildServer, ProcessError, process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: the bench package is installed from its bench/ folder."""
DEFAULT_RUN = ROOT / "build" / "triton" / "run"
START_TIMEOUT_S = 60.0
"""It is ready in about a second here; a busy machine takes longer."""
START_ATTEMPTS = 3
"""Free ports are found by binding port 0 and closing it: another process may take one in
between, and then Triton exits at once; it is started again on other ports."""
VERSION = "2.51"


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


def find(run: Path = DEFAULT_RUN) -> Path | str:
    """The launcher, or why Triton is not measured."""
    if run.is_file() and run.stat().st_mode & 0o111:
        return run
    return f"{run} is missing: `make triton` installs Triton {VERSION} (CPU) there"


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (all held open together, so they are distinct)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class Triton(ChildServer):
    """`tritonserver` serving `repository` on 127.0.0.1, its output in `workdir/triton.log`
    (a restart keeps the earlier logs as triton.1.log, triton.2.log, ...)."""

    name = "triton"
    ports: Ports

    def __init__(self, run: Path, repository: Path, workdir: Path) -> None:
        self._run, self._repository = run, repository
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        self.log_path = workdir / "triton.log"
        self.starts = 0
        self._last_cpu = 0.0
        self._last_threads: dict[int, tuple[str, float]] = {}
        self._start()

    def _start(self) -> None:
        if self.starts:
            self.log_path.rename(self._workdir / f"triton.{self.starts}.log")
        self.starts += 1
        for attempt in range(1, START_ATTEMPTS + 1):
            self.ports = Ports(*free_ports(3))
            with self.log_path.open("w") as log:  # the child keeps its own descriptor
                self.process = subprocess.Popen(
                    [str(self._run), str(self._repository), *map(str, self._port_list())],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_ready() or attempt == START_ATTEMPTS:
                break
        if not self.alive():
            raise ProcessError(f"Triton {self.death()}:\n{self.log_tail()}")
        self._last_cpu, self._last_threads = 0.0, {}

    def _port_list(self) -> tuple[int, int, int]:
        return (self.ports.http, self.ports.grpc, self.ports.metrics)

    def _wait_until_ready(self) -> bool:
        """True once every model is ready; False if it exited early (e.g. a port was taken)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.alive():
            try:
                # Strict readiness (Triton's default): ready means every model is loaded.
                with urllib.request.urlopen(self._url("/v2/health/ready"), timeout=2) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or not ready (400)
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(
                    f"Triton was not ready in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return False

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports.http}{path}"

    def restart(self) -> None:
        """A fresh process on fresh ports, after a crash."""
        self.stop()
        self._start()

    def cpu_seconds(self) -> float:
        """The last reading stays once the process is gone, so a point it dies in still ends."""
        try:
            self._last_cpu = process_cpu_seconds(self.pid)
        except OSError:
            pass
        return self._last_cpu

    def cpu_by_thread(self) -> dict[int, tuple[str, float]]:
        """Triton's threads are all of the kind "other" (`rnnserve.threads.cpu_by_thread`)."""
        threads = cpu_by_thread(self.pid)
        if threads:
            self._last_threads = threads
        return self._last_threads

    def model_config(self, model: str) -> dict[str, Any]:
        """The configuration Triton serves the model with, its defaults filled in."""
        with urllib.request.urlopen(self._url(f"/v2/models/{model}/config"), timeout=10) as answer:
            config: dict[str, Any] = json.loads(answer.read())
        return config

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> Triton:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """What decides Triton's batching and parallelism, from its ModelConfig of the model."""
    batching = config.get("sequence_batching", {})
    strategy = batching.get("oldest") or batching.get("direct") or {}
    return {
        "instance_group": [
            {"kind": group.get("kind"), "count": group.get("count")}
            for group in config.get("instance_group", [])
        ],
        "max_batch_size": config.get("max_batch_size"),
        "scheduler": "oldest" if "oldest" in batching else "direct" if batching else "none",
        "max_candidate_sequences": strategy.get("max_candidate_sequences"),
        "preferred_batch_size": strategy.get("preferred_batch_size"),
        "max_queue_delay_microseconds": strategy.get("max_queue_delay_microseconds"),
    }
