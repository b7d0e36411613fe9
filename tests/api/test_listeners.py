"""A server that cannot listen says where, and what moves it, in one line: each listener (the gRPC
port, the metrics endpoint), on each transport, with a real socket of this process holding the
port on 127.0.0.1; in a terminal and as the container logs (JSON lines)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rnnserve.api.front import Transport
from rnnserve.config import Settings
from rnnserve.errors import CannotListen
from rnnserve.server import Server
from tests.conftest import run_cli
from tests.redis_server import free_port


@contextmanager
def occupied() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket of this process holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def serve(transport: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_cli("serve", "--host", "127.0.0.1", "--transport", transport, *flags, timeout=180)


def one_line(done: subprocess.CompletedProcess[str], alone: bool = True) -> str:
    """The line the server stopped with, checked: exit code 1, no traceback, and (`alone`)
    nothing else on stderr: a busy port is found before the models load and log."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and (len(lines) == 1 or not alone), done.stderr
    return lines[-1]


def test_a_busy_grpc_port_is_named_with_its_flag(serving_transport: str) -> None:
    with occupied() as port:
        done = serve(serving_transport, "--grpc-port", str(port), "--metrics-port", "off")
    line = one_line(done)
    assert line.startswith("rnnserve serve: error: cannot listen for gRPC on "), line
    for part in (f"127.0.0.1:{port}", "in use", "--grpc-port", "RNNSERVE_GRPC_PORT"):
        assert part in line, line


def test_a_busy_metrics_port_is_named_with_its_flag(serving_transport: str) -> None:
    with occupied() as port:
        done = serve(serving_transport, "--grpc-port", "0", "--metrics-port", str(port))
    line = one_line(done)
    for part in (
        f"metrics (/metrics) on 127.0.0.1:{port}",
        "in use",
        "--metrics-port",
        "RNNSERVE_METRICS_PORT",
        "off turns metrics off",
    ):
        assert part in line, line


def test_metrics_refused_after_grpc_bound_closes_what_was_bound(serving_transport: str) -> None:
    """Both ports free when checked, the same port: gRPC binds it, and the metrics endpoint's
    own bind is refused. The line names metrics, and the process exits (nothing left serving)."""
    port = free_port()
    done = serve(serving_transport, "--grpc-port", str(port), "--metrics-port", str(port))
    line = one_line(done, alone=False)  # the models loaded (and logged) first
    assert f"metrics (/metrics) on 127.0.0.1:{port}" in line and "--metrics-port" in line, line
    with socket.socket() as again:  # the gRPC port was closed again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_in_the_container_the_reason_is_one_json_line(serving_transport: str) -> None:
    """Configured as the image configures it, through RNNSERVE_ variables (JSON logs)."""
    with occupied() as port:
        environment = {
            **os.environ,
            "RNNSERVE_HOST": "127.0.0.1",
            "RNNSERVE_GRPC_PORT": str(port),
            "RNNSERVE_METRICS_PORT": "off",
            "RNNSERVE_LOG_FORMAT": "json",
            "RNNSERVE_TRANSPORT": serving_transport,
        }
        done = subprocess.run(
            [sys.executable, "-P", "-m", "rnnserve", "serve"],
            capture_output=True,
            text=True,
            timeout=180,
            env=environment,
        )
    event = json.loads(one_line(done))
    assert event["level"] == "ERROR", event
    for part in (f"127.0.0.1:{port}", "in use", "--grpc-port", "RNNSERVE_GRPC_PORT"):
        assert part in event["message"], event


@pytest.mark.parametrize("which", ["grpc", "metrics"])
async def test_the_transports_own_refusal_is_told_alike(which: str, serving_transport: str) -> None:
    """A port taken between the check and the bind: the refusal of the transport itself (Rust's
    or grpc.aio's) or of the metrics endpoint's HTTP server, told as the check tells it."""
    with occupied() as port:
        settings = Settings(
            host="127.0.0.1",
            grpc_port=port if which == "grpc" else 0,
            metrics_port=port if which == "metrics" else None,
            transport=Transport(serving_transport),
        )
        server = Server(settings)
        try:
            with pytest.raises(CannotListen) as refused:
                await server.listen()
        finally:
            await server.abandon()
    message = str(refused.value)
    flag = "--grpc-port" if which == "grpc" else "--metrics-port"
    assert f"127.0.0.1:{port}" in message and "in use" in message and flag in message, message
