"""Shared fixtures: the repository root, the project's version, a way to run the real `rnnserve`
command, and Redis."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.redis_server import RunningRedis, start_redis

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "repository"


def project_version(root: Path = ROOT) -> str:
    """pyproject's [project].version under `root`: the one place the version is defined."""
    with (root / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]["version"]


VERSION = project_version()

# The fuzz tests' profile (tests/api/fuzzing.py): no example database, so a run depends on the
# seed alone; no deadline, as a call to the real server takes what the shared machine gives it;
# and the large or slow examples the fuzz means to make are no reason for a health warning.
settings.register_profile(
    "rnnserve",
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rnnserve"))
# A server a test starts without --http-port takes a free port, never 8000.
os.environ["RNNSERVE_HTTP_PORT"] = "0"
FUZZ_SEED = int(os.environ.get("RNNSERVE_FUZZ_SEED", "0"))
"""The fuzz tests' seed: fixed, so that a failure reproduces; printed in the header."""


NATIVE_BUILT = importlib.util.find_spec("rnnserve_native") is not None
"""Whether the native transport is installed: wherever cargo is (`make test` builds it there,
and tests/test_native.py fails if it did not)."""
TRANSPORTS = ("native", "grpcio") if NATIVE_BUILT else ("grpcio",)
"""The transports a server is tested on; the first is what `rnnserve serve` picks by default."""
BOTH_TRANSPORTS = frozenset(
    {
        "tests.api.test_auth",
        "tests.api.test_cancellation",
        "tests.api.test_client_outcomes",
        "tests.api.test_errors",
        "tests.api.test_golden",
        "tests.api.test_listeners",
        "tests.api.test_ownership",
        "tests.api.test_principal_limits",
        "tests.api.test_store_faults",
        "tests.api.test_tls",
        "tests.api.test_version_replacement",
    }
)
"""The suites that define behaviour (sequences, errors, security, cancellation) run on every
transport; the others on the default one. (tests/conformance compares each with Triton.)"""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`serving_transport`: the transport a test's server serves through (--transport), each
    of TRANSPORTS for the modules of BOTH_TRANSPORTS, else the default."""
    if "serving_transport" in metafunc.fixturenames:
        both = metafunc.module.__name__ in BOTH_TRANSPORTS
        metafunc.parametrize(
            "serving_transport", TRANSPORTS if both else TRANSPORTS[:1], scope="session"
        )


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "rnnserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRedis]:
    """One redis-server for the whole run; tests keep apart by their keys (or FLUSHDB)."""
    running = start_redis(tmp_path_factory.mktemp("redis"))
    yield running
    running.stop()


def pytest_report_header() -> str:
    return f"fuzz seed: {FUZZ_SEED} (set RNNSERVE_FUZZ_SEED to change it)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures tests record (`record_property("figures", ...)`: the stress and chaos runs'
    requests, errors by kind and memory), printed at the end of every run, passed or not."""
    lines = [
        f"{report.nodeid}: {value}"
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        for name, value in getattr(report, "user_properties", ())
        if name == "figures" and report.when == "call"
    ]
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
