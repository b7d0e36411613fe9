"""The real Triton Inference Server (2.51, CPU) in a subprocess on free loopback ports.

The conformance suite's peer: `make triton` installs it into build/triton (from the project's
shared peers folder); without it the tests that need it skip and say how to get it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve_bench.triton import free_ports
from tests.child import ChildServer
from tests.conftest import BUNDLED, ROOT

TRITON_RUN = Path(os.environ.get("RNNSERVE_TRITON_RUN", ROOT / "build" / "triton" / "run"))
"""The launcher `make triton` writes: `run REPOSITORY HTTP GRPC METRICS`."""

MISSING = f"{TRITON_RUN} is missing: `make triton` installs Triton 2.51 (CPU) there"

START_TIMEOUT_S = 60.0
"""It is ready in about a second here; a busy machine takes longer."""

START_ATTEMPTS = 3
"""Free ports are found by binding port 0 and closing it: another process may take one in
between, and then Triton exits at once; it is started again on other ports."""


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


class RunningTriton(ChildServer):
    """`tritonserver` serving `repository` on 127.0.0.1, its output in `workdir/triton.log`."""

    def __init__(self, workdir: Path, repository: Path = BUNDLED) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "triton.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            self.ports = Ports(*free_ports(3))
            with self.log_path.open("w") as log:  # the child keeps its own descriptor
                self.process = subprocess.Popen(
                    [str(TRITON_RUN), str(repository), *map(str, self._port_list())],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_ready() or attempt == START_ATTEMPTS:
                break
        if not self.alive():
            raise RuntimeError(f"Triton {self.death()}:\n{self.log_text()}")

    def _port_list(self) -> tuple[int, int, int]:
        return (self.ports.http, self.ports.grpc, self.ports.metrics)

    def _wait_until_ready(self) -> bool:
        """True once every model is ready; False if it exited early (e.g. a port was taken)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        with triton.InferenceServerClient(self.target) as client:
            while True:
                if not self.alive():
                    return False
                try:
                    # Strict readiness (Triton's default): ready means every model is loaded.
                    if client.is_server_ready(client_timeout=2):
                        return True
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Triton was not ready in {START_TIMEOUT_S:.0f} s:\n{self.log_text()}"
                    )
                time.sleep(0.05)

    def death(self) -> str:
        """How the process ended, in words ("" while it runs)."""
        code = self.process.poll()
        if code is None:
            return ""
        if code < 0:
            return f"(pid {self.pid}) died of {signal.Signals(-code).name}"
        return f"(pid {self.pid}) exited with {code}"

    def stop(self) -> None:
        """SIGKILL: on SIGTERM Triton waits its 30 s exit timeout for the live sequences."""
        if self.alive():
            self.process.kill()
        self.process.wait()


def triton_installed() -> bool:
    return os.access(TRITON_RUN, os.X_OK)


@contextmanager
def triton_serving(workdir: Path, repository: Path = BUNDLED) -> Iterator[RunningTriton]:
    """Triton for the duration of a `with`; its log stays in `workdir`."""
    running = RunningTriton(workdir, repository)
    try:
        yield running
    finally:
        running.stop()
