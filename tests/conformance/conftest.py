"""Both servers on the bundled repository for the whole session, and their answers, kept.

Each (server, transport, case) runs once: the test of that server and the test comparing the
two servers read the same answers, in whichever order they run.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Protocol

import pytest

from tests.api.conftest import Reference
from tests.conformance.cases import CASES, Ids
from tests.conformance.protocol import Call, Outcome, run_http, run_stream, run_unary
from tests.conftest import BUNDLED, NATIVE_BUILT
from tests.server import RunningServer, serving
from tests.triton_server import MISSING, RunningTriton, triton_installed, triton_serving

RNNSERVES = {"rnnserve": "rnnserve_server"}
if NATIVE_BUILT:  # the default transport is then native: grpc.aio is tested beside it
    RNNSERVES["rnnserve-grpcio"] = "rnnserve_grpcio_server"
SERVERS = {**RNNSERVES, "triton": "triton_server"}
"""Each server's name in test ids, and its fixture: rnnserve on each transport, and Triton."""

TRANSPORTS = ("unary", "stream", "http")
"""gRPC ModelInfer, gRPC ModelStreamInfer, and POST /v2/models/{model}/infer (KServe v2 REST)."""

HTTP_SERVERS = frozenset({"rnnserve", "triton"} if NATIVE_BUILT else {"triton"})
"""The servers with an HTTP port: the native transport serves one, grpc.aio none."""


def transports(server: str) -> tuple[str, ...]:
    """The transports `server` is asked over."""
    return tuple(t for t in TRANSPORTS if t != "http" or server in HTTP_SERVERS)


class Server(Protocol):
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int: ...

    @property
    def target(self) -> str: ...

    @property
    def http_target(self) -> str: ...

    def alive(self) -> bool: ...

    def log_text(self) -> str: ...


@pytest.fixture(scope="session")
def rnnserve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """rnnserve on its default transport (native where it is built)."""
    workdir = tmp_path_factory.mktemp("rnnserve")
    with serving(workdir, "--model-repository", str(BUNDLED)) as running:
        yield running


@pytest.fixture(scope="session")
def rnnserve_grpcio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """rnnserve on grpc.aio."""
    workdir = tmp_path_factory.mktemp("rnnserve-grpcio")
    flags = ("--model-repository", str(BUNDLED))
    with serving(workdir, *flags, transport="grpcio") as running:
        yield running


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTriton]:
    if not triton_installed():
        pytest.skip(MISSING)
    with triton_serving(tmp_path_factory.mktemp("triton"), BUNDLED) as running:
        yield running


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


class Observations:
    """What each server answered to each case over each transport, run on first demand."""

    def __init__(self, reference: Reference) -> None:
        self._reference = reference
        self._calls: dict[tuple[str, str], list[Call]] = {}
        self._outcomes: dict[tuple[str, str, str], list[Outcome]] = {}

    def calls(self, case: str, transport: str) -> list[Call]:
        key = (case, transport)
        if key not in self._calls:
            number = list(CASES).index(case) * len(TRANSPORTS) + TRANSPORTS.index(transport)
            ids = Ids(base=1_000 * (number + 1), label=f"{case}/{transport}")
            self._calls[key] = CASES[case].calls(ids, self._reference)
        return self._calls[key]

    def outcomes(self, name: str, server: Server, case: str, transport: str) -> list[Outcome]:
        key = (name, case, transport)
        if key not in self._outcomes:
            calls = self.calls(case, transport)
            expect_alive(name, server)
            try:
                outcomes = run(server, transport, calls, CASES[case].pipelined)
            finally:
                expect_alive(name, server)  # a dead server's answers mislead: say it died
            self._outcomes[key] = outcomes
        return self._outcomes[key]


@pytest.fixture(scope="session")
def observations(reference: Reference) -> Observations:
    return Observations(reference)


def run(
    server: Server, transport: str, calls: list[Call], pipelined: bool = False
) -> list[Outcome]:
    """The calls over `transport`, in order (over a stream, all at once when `pipelined`)."""
    if transport == "unary":
        return run_unary(server.target, calls)
    if transport == "stream":
        return run_stream(server.target, calls, pipelined)
    return run_http(server.http_target, calls)


def expect_alive(name: str, server: Server) -> None:
    if server.alive():
        return
    code = server.process.returncode
    ended = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    log = server.log_text()[-6_000:]
    pytest.fail(f"{name} (pid {server.pid}) {ended}; its log ends:\n{log}", pytrace=False)
