"""Per-model limits: live sequences, idle eviction, steps per request."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.api.conftest import infer_input
from tests.server import RunningServer, serving

STEP = np.array([[[24.0]]], np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    # The `client` fixture of tests/api/conftest.py connects to this server.
    with serving(
        tmp_path_factory.mktemp("limits"),
        "--max-sequences", "3", "--idle-timeout-s", "1", "--max-steps-per-request", "16",
    ) as running:  # fmt: skip
        yield running


def step(client, sequence_id, **flags):
    return client.infer(
        "sensor_gru", [infer_input("sensor_gru", STEP)], sequence_id=sequence_id, **flags
    )


def test_a_full_model_answers_resource_exhausted(client) -> None:
    for sid in (1, 2, 3):
        step(client, sid, sequence_start=True)
    with pytest.raises(InferenceServerException) as caught:
        step(client, 4, sequence_start=True)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "maximum of 3 live sequences" in caught.value.message()
    # Other models have their own room, and the live sequences go on.
    step(client, 1)
    client.infer(
        "digits_lstm",
        [infer_input("digits_lstm", np.zeros((1, 1, 8), np.float32))],
        sequence_id=4,
        sequence_start=True,
        sequence_end=True,
    )
    step(client, 1, sequence_end=True)
    step(client, 4, sequence_start=True, sequence_end=True)
    step(client, 2, sequence_end=True)
    step(client, 3, sequence_end=True)


def idle_evictions(server) -> float:
    line = next(
        row for row in server.scrape().splitlines()
        if row.startswith("rnnserve_sequence_evictions_total{")
        and 'model="sensor_gru"' in row and 'reason="idle"' in row
    )  # fmt: skip
    return float(line.rsplit(" ", 1)[1])


def test_idle_sequences_are_evicted(client, server) -> None:
    before = idle_evictions(server)
    step(client, 10, sequence_start=True)
    # The server evicts on its own clock (the rule itself is tested with an injected clock in
    # tests/sessions); here, wait until it says it did, without touching the sequence.
    deadline = time.monotonic() + 30
    while idle_evictions(server) == before:
        assert time.monotonic() < deadline, "the idle sequence was never evicted"
        time.sleep(0.05)
    with pytest.raises(InferenceServerException) as caught:
        step(client, 10)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "evicted after 1 s without a request" in caught.value.message()


def test_too_many_steps_in_one_request(client) -> None:
    x = np.zeros((1, 17, 1), np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(
            "sensor_gru", [infer_input("sensor_gru", x)], sequence_id=20, sequence_start=True
        )
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "1..16 time steps, got 17" in caught.value.message()
