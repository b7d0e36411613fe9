"""rnnserve.client when a step's answer is not the one it waited for, on both transports.

Abandoned steps: a step whose caller stops waiting (its deadline passes, its `await` is
cancelled, Ctrl-C stops `rnnserve generate`) is applied by the server all the same. The
session settles it with its next step, goes on from what the server holds, and ends its
sequence when it closes. The server is made slow by a real means: every step waits
--max-queue-delay-us for company and none runs inline, so an answer takes SLOW_S while the
client waits a quarter of it.

Rate refusals: a step refused RESOURCE_EXHAUSTED "retry in X s" by a request-rate limit was
never read, and the session sends it again after the wait the server names.

Outputs are checked against the committed graph run in-process over each whole sequence.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.client import (
    Client,
    ClientError,
    DeadlineExceeded,
    ResourceExhausted,
    RetryPolicy,
)
from tests.api.conftest import TOKENS, Reference, infer_input, sequence_data
from tests.conftest import ROOT
from tests.server import RunningServer, serving

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
SLOW_S = 0.4
"""How long each step waits on the slow server for others to batch with."""
PATIENT_S = 30.0
"""A deadline no step of these tests should reach."""


@pytest.fixture(scope="module")
def slow_server(
    tmp_path_factory: pytest.TempPathFactory, serving_transport: str
) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp(f"slow-{serving_transport}")
    flags = ("--max-queue-delay-us", str(int(SLOW_S * 1e6)), "--inline-max-work", "0")
    with serving(workdir, *flags, transport=serving_transport) as running:
        yield running


def assert_ended(server: RunningServer, model: str, sequence_id: int | str | None) -> None:
    """The server ended the sequence at its client's END (not idle, not still live)."""
    assert sequence_id is not None
    x = sequence_data(model, 1, np.random.default_rng(0))
    with triton.InferenceServerClient(server.target) as other:
        with pytest.raises(InferenceServerException, match="it ended") as gone:
            other.infer(model, [infer_input(model, x)], sequence_id=sequence_id)
    assert gone.value.status() == "StatusCode.INVALID_ARGUMENT"


async def test_steps_past_their_deadline_are_settled_by_the_next(
    slow_server: RunningServer, reference: Reference
) -> None:
    x = sequence_data("sensor_gru", 10, np.random.default_rng(21))
    async with Client(slow_server.target, timeout_s=PATIENT_S) as client:
        async with client.session("sensor_gru") as s:
            outputs = {0: await s.step(x[:, 0:2])}
            client.timeout_s = SLOW_S / 4
            with pytest.raises(DeadlineExceeded, match="may still be applied"):
                await s.step(x[:, 2:4])
            client.timeout_s = PATIENT_S
            # Sent before that answer came: refused ABORTED "is at version 2", then sent again.
            outputs[4] = await s.step(x[:, 4:6])
            assert s.sequence_version == 3
            client.timeout_s = SLOW_S / 4
            with pytest.raises(DeadlineExceeded):
                await s.step(x[:, 6:8])
            client.timeout_s = PATIENT_S
            await asyncio.sleep(2 * SLOW_S)  # the late answer arrives, and says it was applied
            outputs[8] = await s.step(x[:, 8:10])
            assert s.sequence_version == 5
            sequence_id = s.sequence_id
    expected = reference.run("sensor_gru", x)
    for t, output in outputs.items():
        np.testing.assert_allclose(output, expected[:, t : t + 2], **TOLERANCE)
    assert_ended(slow_server, "sensor_gru", sequence_id)


async def test_a_cancelled_step_is_settled_by_the_next(
    slow_server: RunningServer, reference: Reference
) -> None:
    x = sequence_data("charlm_lstm", 6, np.random.default_rng(22))
    async with Client(slow_server.target, timeout_s=PATIENT_S) as client:
        async with client.session("charlm_lstm") as s:
            first = await s.step(x[:, 0:2])
            waiting = asyncio.create_task(s.step(x[:, 2:4]))
            await asyncio.sleep(SLOW_S / 4)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            third = await s.step(x[:, 4:6])
            assert s.sequence_version == 3
            sequence_id = s.sequence_id
    expected = reference.run("charlm_lstm", x)
    np.testing.assert_allclose(first, expected[:, 0:2], **TOLERANCE)
    np.testing.assert_allclose(third, expected[:, 4:6], **TOLERANCE)
    assert_ended(slow_server, "charlm_lstm", sequence_id)


async def test_an_abandoned_start_is_continued_and_an_abandoned_end_closes(
    slow_server: RunningServer, reference: Reference
) -> None:
    x = sequence_data("digits_lstm", 6, np.random.default_rng(23))
    async with Client(slow_server.target, timeout_s=SLOW_S / 4) as client:
        s = await client.session("digits_lstm").open()
        with pytest.raises(DeadlineExceeded):
            await s.step(x[:, 0:2])  # the START, applied all the same
        client.timeout_s = PATIENT_S
        second = await s.step(x[:, 2:4])  # continues it, rather than starting again
        assert s.sequence_version == 2
        client.timeout_s = SLOW_S / 4
        with pytest.raises(DeadlineExceeded):
            await s.step(x[:, 4:6], end=True)
        client.timeout_s = PATIENT_S
        await s.close()  # finds the END applied: nothing left to end, and no error
        with pytest.raises(ClientError, match="has ended"):
            await s.step(x[:, 4:6])
    np.testing.assert_allclose(second, reference.run("digits_lstm", x)[:, 2:4], **TOLERANCE)
    assert_ended(slow_server, "digits_lstm", s.sequence_id)


def counter(server: RunningServer, name: str, model: str) -> float:
    """A sample of `name` (a counter or gauge with model and version labels) for `model`."""
    prefix = f'{name}{{model="{model}"'
    rows = [row for row in server.scrape().splitlines() if row.startswith(prefix)]
    return sum(float(row.split()[-1]) for row in rows)


def _as_at_a_terminal() -> None:
    """SIGINT delivered and handled as at a terminal. A child inherits an ignored or blocked
    SIGINT, and the test runner's may be either (the whole suite once ran this command with it
    ignored: Python then installs no KeyboardInterrupt, and Ctrl-C did nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_in_generate_ends_its_sequence(slow_server: RunningServer) -> None:
    ends = counter(slow_server, "rnnserve_sequence_ends_total", "charlm_lstm")
    command = [sys.executable, "-P", "-m", "rnnserve", "generate", "def ", "--length", "40"]
    generate = subprocess.Popen(
        [*command, "--url", slow_server.target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        preexec_fn=_as_at_a_terminal,
    )
    assert generate.stdout is not None
    printed = b""
    while len(printed) < len("def ") + 2:  # the prompt and two characters: mid-stream
        chunk = os.read(generate.stdout.fileno(), 64)
        assert chunk, generate.communicate(timeout=30)
        printed += chunk
    generate.send_signal(signal.SIGINT)  # Ctrl-C, while a step waits on the server
    _, stderr = generate.communicate(timeout=30)
    assert generate.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert stderr.decode().endswith("rnnserve generate: error: interrupted\n"), stderr.decode()
    # Its END was settled against the step Ctrl-C abandoned, and ended the sequence.
    deadline = time.monotonic() + 10
    while counter(slow_server, "rnnserve_live_sequences", "charlm_lstm") and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert counter(slow_server, "rnnserve_live_sequences", "charlm_lstm") == 0
    assert counter(slow_server, "rnnserve_sequence_ends_total", "charlm_lstm") == ends + 1


# ---------------------------------------------------------------------- rate refusals
@pytest.fixture(scope="module")
def rate_limited(
    token_file: Path, tmp_path_factory: pytest.TempPathFactory, serving_transport: str
) -> Iterator[RunningServer]:
    """The Security section's limits: 200 requests a second per principal, bursts of 50."""
    flags = (
        "--auth-tokens", str(token_file),
        "--principal-requests-per-s", "200", "--principal-burst", "50",
    )  # fmt: skip
    workdir = tmp_path_factory.mktemp(f"rate-{serving_transport}")
    with serving(workdir, *flags, transport=serving_transport) as running:
        yield running


async def test_rate_refusals_are_sent_again_after_the_wait_named(
    rate_limited: RunningServer, reference: Reference
) -> None:
    rng = np.random.default_rng(24)
    inputs = [sequence_data("sensor_gru", 2, rng) for _ in range(120)]

    async def run(client: Client, x: np.ndarray) -> np.ndarray:
        async with client.session("sensor_gru") as s:
            return np.concatenate([await s.step(x[:, :1]), await s.step(x[:, 1:])], axis=1)

    # 120 sequences at once, 360 requests with their ENDs: far past a burst of 50.
    async with Client(rate_limited.target, token=TOKENS["alice"]) as client:
        outputs = await asyncio.gather(*(run(client, x) for x in inputs))
    for x, output in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(output, reference.run("sensor_gru", x), **TOLERANCE)
    never = RetryPolicy(rate_limited=False)
    async with Client(rate_limited.target, token=TOKENS["bob"], retry=never) as client:
        results = await asyncio.gather(*(run(client, x) for x in inputs), return_exceptions=True)
    refusals = [r for r in results if isinstance(r, ResourceExhausted)]
    assert refusals, "the burst was not refused: nothing was waited out above"
    assert all(r.retry_after_s is not None for r in refusals), refusals[0]


def test_the_commands_wait_out_rate_refusals(rate_limited: RunningServer, cli) -> None:
    token = TOKENS["root"]
    done = cli(
        "generate", "def ", "--length", "120", "--url", rate_limited.target, "--token", token
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == len("def ") + 120 + 1
    series = ROOT / "examples" / "sst.csv"
    done = cli(
        "forecast", "sensor_gru", "--csv", str(series), "--column", "sst", "--json",
        "--url", rate_limited.target, "--token", token,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
