"""Store round trips whose outcome is unknown: Redis busy past the store timeout, or a reply lost
after the command ran. Each sequence must go on exactly, on every transport.

The faults are real: `DEBUG SLEEP` on the real Redis, and a proxy (tests/redis_proxy.py) that
lets Redis run a command and then drops the connection before its reply. Outputs are checked
against the committed graph run in-process over each whole sequence (to 1e-5).

A sequence is handed over at durability `end` through the record a replica leaves in the store;
here a replica at durability `step` leaves it (the same record, written after each step), which
saves starting and stopping a replica per test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.sessions.redis_store import CAS_SHA
from tests.api.conftest import Reference, infer_input, sequence_data
from tests.redis_proxy import RedisProxy
from tests.redis_server import RunningRedis, start_redis
from tests.server import RunningServer, start_server

MODEL = "charlm_lstm"
TIMEOUT_S = 0.5
"""--state-store-timeout-s of the servers here."""
_ids = iter(range(7_000_000, 8_000_000))


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> Iterator[RunningRedis]:
    running = start_redis(tmp_path_factory.mktemp("redis"), "--enable-debug-command", "local")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def proxy(redis: RunningRedis) -> Iterator[RedisProxy]:
    running = RedisProxy(redis.port)
    yield running
    running.close()


def _server(root, name: str, proxy: RedisProxy, durability: str, transport: str) -> RunningServer:
    return start_server(
        root / name,
        "--state-store", proxy.url, "--state-durability", durability,
        "--state-store-timeout-s", str(TIMEOUT_S),
        transport=transport,
    )  # fmt: skip


@pytest.fixture(scope="module")
def replicas(
    proxy: RedisProxy, tmp_path_factory, serving_transport: str
) -> Iterator[tuple[RunningServer, RunningServer]]:
    """A replica at durability step and one at end, both through the proxy."""
    root = tmp_path_factory.mktemp(f"replicas-{serving_transport}")
    step = _server(root, "step", proxy, "step", serving_transport)
    end = _server(root, "end", proxy, "end", serving_transport)
    yield step, end
    for server in (step, end):
        assert server.stop() == 0, server.log_text()


class Sequence:
    """One sequence's inputs, its reference outputs, and steps sent one request each."""

    def __init__(self, reference: Reference, steps: int = 8) -> None:
        self.id = next(_ids)
        self.key = f"rnnserve:{MODEL}:1:-:i{self.id}".encode()
        self.inputs = sequence_data(MODEL, steps, np.random.default_rng(self.id))
        self.expected = reference.run(MODEL, self.inputs)
        self.steps = steps

    def step(
        self, server: RunningServer, t: int, version: int | None = None, end: bool = False
    ) -> triton.InferResult:
        """Step `t` (sequence_version `version` when given), its output checked."""
        with triton.InferenceServerClient(server.target) as client:
            result = client.infer(
                MODEL,
                [infer_input(MODEL, self.inputs[:, t : t + 1])],
                sequence_id=self.id,
                sequence_start=t == 0,
                sequence_end=end,
                parameters={"sequence_version": version} if version is not None else None,
            )
        np.testing.assert_allclose(
            result.as_numpy("logits"), self.expected[:, t : t + 1], rtol=1e-5, atol=1e-5
        )
        return result

    def refused(self, server: RunningServer, t: int, **options) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as caught:
            self.step(server, t, **options)
        return caught.value


def version_of(result: triton.InferResult) -> int:
    return result.get_response().parameters["sequence_version"].int64_param


def test_a_hand_over_whose_read_reply_is_lost_goes_on(replicas, proxy, reference) -> None:
    """The replica continuing a handed-over sequence loses the reply to its read of the record
    (redis-py sends it again on a fresh connection): the record must still be there."""
    step, end = replicas
    sequence = Sequence(reference)
    for t in range(3):
        sequence.step(step, t)
    proxy.lose_replies(lambda sent: sequence.key in sent)
    for t in range(3, sequence.steps):
        sequence.step(end, t)
    assert proxy.lost >= 1


def test_a_hand_over_while_redis_is_busy_goes_on(replicas, redis, reference) -> None:
    """Redis busy past the store timeout while the replica reads a handed-over record: the step
    fails UNAVAILABLE, and sent again it continues exactly."""
    step, end = replicas
    sequence = Sequence(reference)
    for t in range(3):
        sequence.step(step, t)
    busy = threading.Thread(target=_debug_sleep, args=(redis, 4 * TIMEOUT_S))
    busy.start()
    time.sleep(0.2)
    try:
        error = sequence.refused(end, 3)
    finally:
        busy.join()
    assert error.status() == "StatusCode.UNAVAILABLE", error
    for t in range(3, sequence.steps):
        sequence.step(end, t)


def test_an_end_whose_reply_is_lost_is_answered(replicas, proxy, reference) -> None:
    """An END's write ran, its reply was lost and redis-py sent it again: that is the same END,
    not a race with another replica. A later step hears that the sequence ended."""
    step, _ = replicas
    sequence = Sequence(reference, steps=4)
    for t in range(3):
        sequence.step(step, t)
    proxy.lose_replies(lambda sent: CAS_SHA.encode() in sent and sequence.key in sent)
    sequence.step(step, 3, end=True)
    error = sequence.refused(step, 3)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "it ended" in str(error), error


def test_an_end_whose_replies_are_lost_is_answered_when_sent_again(
    replicas, proxy, reference
) -> None:
    """An END's write ran but neither its reply nor the resend's came back: UNAVAILABLE, outcome
    unknown. Sent again, as told, the END is answered (with the outputs it had) and ends the
    sequence once."""
    step, _ = replicas
    sequence = Sequence(reference, steps=4)
    for t in range(3):
        sequence.step(step, t, version=t if t else None)
    proxy.lose_replies(lambda sent: CAS_SHA.encode() in sent and sequence.key in sent, times=2)
    error = sequence.refused(step, 3, version=3, end=True)
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "its END" in str(error) and "may or may not have been applied" in str(error), error
    assert version_of(sequence.step(step, 3, version=3, end=True)) == 4
    error = sequence.refused(step, 3)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "it ended" in str(error), error


def test_a_step_whose_write_reply_is_lost_says_how_to_settle_it(replicas, proxy, reference) -> None:
    """A step's write ran but no reply came back, twice (redis-py's resend too): the client is
    told the outcome is unknown and how to learn it; doing so, the sequence goes on exactly."""
    step, _ = replicas
    sequence = Sequence(reference)
    for t in range(3):
        assert version_of(sequence.step(step, t, version=t if t else None)) == t + 1
    proxy.lose_replies(lambda sent: CAS_SHA.encode() in sent and sequence.key in sent, times=2)
    error = sequence.refused(step, 3, version=3)
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "may or may not have been applied" in str(error), error
    assert "sequence_version=3" in str(error), error
    again = sequence.refused(step, 3, version=3)  # as told: it had been applied
    assert again.status() == "StatusCode.ABORTED" and "is at version 4" in str(again), again
    for t in range(4, sequence.steps):
        assert version_of(sequence.step(step, t, version=t)) == t + 1


def _debug_sleep(redis: RunningRedis, seconds: float) -> None:
    with redis.client() as client:  # its socket timeout, 5 s, outlasts the sleep
        client.execute_command("DEBUG", "SLEEP", seconds)
