"""Start the real server in a subprocess on free loopback ports, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def start_server(workdir: Path, *flags: str, env: dict[str, str] | None = None) -> RunningServer:
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "ports.json"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    with log_path.open("w") as log:  # the child keeps its own descriptor
        process = _spawn(port_file, log, flags, env)
    deadline = time.monotonic() + 90
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return RunningServer(process, ports["grpc"], ports["metrics"], log_path)


def _spawn(port_file: Path, log, flags: tuple[str, ...], env: dict[str, str] | None):
    return subprocess.Popen(
        [
            sys.executable, "-m", "service", "serve",
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--port-file", str(port_file), *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
