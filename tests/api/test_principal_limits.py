"""Per-principal and whole-server limits on the real server: live sequences, requests per
second, bytes per request, time steps per request.

Each breach has its own status and a message naming the setting, leaves every other
principal's work alone, and is counted in rnnserve_limit_refusals_total by reason (never by
principal). Rates are checked against bounds computed from the time the test really took, so
a slow machine admits more but never more than the bucket allows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.api.conftest import TOKENS, Stream, bearer, infer_input
from tests.server import RunningServer, serving

MODEL = "sensor_gru"
STEP = np.array([[[24.0]]], np.float32)


def infer(client, principal: str | None, x=STEP, **sequence) -> None:
    client.infer(
        MODEL,
        [infer_input(MODEL, x)],
        headers=bearer(principal) if principal else None,
        **sequence,
    )


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refusal:
        call()
    return refusal.value


# ---------------------------------------------------------------------- sequences and sizes
@pytest.fixture(scope="module")
def server(token_file: Path, tmp_path_factory, serving_transport: str) -> Iterator[RunningServer]:
    flags = (
        "--auth-tokens", str(token_file),
        "--principal-max-sequences", "2", "--max-live-sequences", "3",
        "--max-request-bytes", "2048", "--max-steps-per-request", "16",
    )  # fmt: skip
    with serving(tmp_path_factory.mktemp("limits"), *flags, transport=serving_transport) as running:
        yield running


def test_live_sequences_are_limited_per_principal_and_for_the_server(server) -> None:
    before = server.counts_by_reason("rnnserve_limit_refusals")
    with triton.InferenceServerClient(server.target) as client:
        infer(client, "alice", sequence_id=1, sequence_start=True)
        infer(client, "alice", sequence_id=2, sequence_start=True)
        infer(client, "alice", sequence_id=2, sequence_start=True)  # a restart: still two
        over = refused(lambda: infer(client, "alice", sequence_id=3, sequence_start=True))
        assert over.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "'alice'" in over.message() and "--principal-max-sequences" in over.message()
        infer(client, "bob", sequence_id=1, sequence_start=True)  # bob's own id 1
        full = refused(lambda: infer(client, "bob", sequence_id=2, sequence_start=True))
        assert full.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "--max-live-sequences" in full.message()
        infer(client, "alice", sequence_id=1, sequence_end=True)  # frees one of alice's, and
        infer(client, "bob", sequence_id=2, sequence_start=True)  # one of the server's
        # Every sequence still live goes on.
        for principal, sequence_id in (("alice", 2), ("bob", 1), ("bob", 2)):
            infer(client, principal, sequence_id=sequence_id, sequence_end=True)
    after = server.counts_by_reason("rnnserve_limit_refusals")
    assert after["principal_sequences"] == before.get("principal_sequences", 0) + 1
    assert after["server_sequences"] == before.get("server_sequences", 0) + 1


def test_bytes_and_time_steps_per_request_are_limited(server) -> None:
    before = server.counts_by_reason("rnnserve_limit_refusals")
    big = np.zeros((1, 600, 1), np.float32)  # 2,400 bytes of input
    long = np.zeros((1, 20, 1), np.float32)  # 80 bytes, but 20 time steps
    with triton.InferenceServerClient(server.target) as client:
        too_big = refused(lambda: infer(client, "alice", big))
        assert too_big.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "--max-request-bytes" in too_big.message()
        too_long = refused(lambda: infer(client, "alice", long))
        assert too_long.status() == "StatusCode.INVALID_ARGUMENT"
        assert "1..16 time steps" in too_long.message()
        # In a stream each is answered in-band, and the stream goes on.
        stream = Stream(client, headers=bearer("bob"))
        try:
            for n, x in enumerate((big, long, STEP)):
                client.async_stream_infer(
                    MODEL,
                    [infer_input(MODEL, x)],
                    request_id=str(n),
                    sequence_id=5,
                    sequence_start=True,
                    sequence_end=True,
                )
            answers = stream.collect(3)
        finally:
            stream.close()
    errors = [str(e) for r, e in answers.values() if e is not None]
    assert len(errors) == 2, errors
    assert any("[RESOURCE_EXHAUSTED]" in e and "--max-request-bytes" in e for e in errors)
    assert any("[INVALID_ARGUMENT]" in e and "1..16 time steps" in e for e in errors)
    assert answers["2"][1] is None  # the good request after them
    after = server.counts_by_reason("rnnserve_limit_refusals")
    assert after["request_bytes"] == before.get("request_bytes", 0) + 2
    assert after["time_steps"] == before.get("time_steps", 0) + 2


# ---------------------------------------------------------------------- request rates
def send(target: str, principal: str | None, count: int) -> tuple[int, int, float, set[str]]:
    """`count` requests as fast as one client sends them: admitted, refused, seconds taken,
    and the refusals' messages."""
    admitted = refusals = 0
    messages = set()
    with triton.InferenceServerClient(target) as client:
        started = time.monotonic()
        for _ in range(count):
            try:
                infer(client, principal, sequence_id=1, sequence_start=True, sequence_end=True)
                admitted += 1
            except InferenceServerException as error:
                assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
                refusals += 1
                messages.add(error.message().split(";")[0])
        return admitted, refusals, time.monotonic() - started, messages


def test_each_principal_has_its_own_request_rate(
    token_file: Path, tmp_path, serving_transport: str
) -> None:
    flags = (
        "--auth-tokens", str(token_file),
        "--principal-requests-per-s", "1", "--principal-burst", "5",
    )  # fmt: skip
    with serving(tmp_path, *flags, transport=serving_transport) as server:
        started = time.monotonic()
        alice = send(server.target, "alice", 15)
        bob = send(server.target, "bob", 15)
        elapsed = time.monotonic() - started
        counted = server.counts_by_reason("rnnserve_limit_refusals")
    for admitted, refusals, _, _ in (alice, bob):
        # The burst, then one a second: at least the burst, at most the burst and the time.
        assert 5 <= admitted <= 5 + 1 * elapsed + 1e-6, (alice, bob)
        assert refusals == 15 - admitted
    assert any("principal 'alice'" in m for m in alice[3])
    assert counted["principal_rate"] == alice[1] + bob[1]


def test_the_server_has_a_request_rate_for_all_callers(tmp_path, serving_transport: str) -> None:
    with serving(tmp_path, "--max-requests-per-s", "3", transport=serving_transport) as server:
        admitted, refusals, elapsed, messages = send(server.target, None, 15)
        counted = server.counts_by_reason("rnnserve_limit_refusals")
    assert 3 <= admitted <= 3 + 3 * elapsed + 1e-6, (admitted, elapsed)
    assert any("--max-requests-per-s" in m for m in messages)
    assert counted["server_rate"] == refusals


def test_an_end_refused_keeps_its_sequence_live_and_counted(server) -> None:
    with triton.InferenceServerClient(server.target) as client:
        infer(client, "alice", sequence_id=21, sequence_start=True)
        infer(client, "alice", sequence_id=22, sequence_start=True)
        aborted = refused(
            lambda: infer(
                client,
                "alice",
                sequence_id=22,
                sequence_end=True,
                parameters={"sequence_version": 9},
            )
        )
        assert aborted.status() == "StatusCode.ABORTED"
        # Not applied: the sequence is live, and still one of alice's two.
        over = refused(lambda: infer(client, "alice", sequence_id=23, sequence_start=True))
        assert "--principal-max-sequences" in over.message()
        infer(client, "alice", sequence_id=22, sequence_end=True)
        infer(client, "alice", sequence_id=23, sequence_start=True)
        for sequence_id in (21, 23):
            infer(client, "alice", sequence_id=sequence_id, sequence_end=True)


def test_the_client_library_names_each_refusal(server) -> None:
    from rnnserve.client import ResourceExhausted, SyncClient, Unauthenticated

    with SyncClient(server.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.model_info(MODEL)
    with SyncClient(server.target, token=TOKENS["bob"]) as client:
        sessions = [client.session(MODEL) for _ in range(2)]
        for session in sessions:
            session.step(STEP)
        with pytest.raises(ResourceExhausted, match="--principal-max-sequences") as over:
            client.session(MODEL).step(STEP)
        assert over.value.retry_after_s is None  # not a rate: waiting alone does not help
        for session in sessions:
            session.close()
