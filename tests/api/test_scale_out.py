"""Sequences that outlive a replica and move between replicas, through a real Redis.

Every server here is the real one in a subprocess; outputs are checked against the committed
graph run in-process over each whole sequence (to 1e-5), as in test_golden.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.sessions.store import Ending, decode_tombstone
from tests.api.conftest import OUTPUTS, Reference, infer_input, sequence_data
from tests.redis_server import RunningRedis, start_redis
from tests.server import RunningServer, start_server

MODEL = "charlm_lstm"
BIG_STEPS = 32_768
"""A request long enough (~0.7 s of compute) that two replicas surely read before either writes."""


def store_flags(redis: RunningRedis, durability: str = "step") -> tuple[str, ...]:
    return ("--state-store", redis.url, "--state-durability", durability)


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def event_count(server: RunningServer, model: str, event: str) -> float:
    series = f'rnnserve_state_store_events_total{{event="{event}",model="{model}",version="1"}}'
    rows = [r for r in server.scrape().splitlines() if r.startswith(series)]
    return float(rows[0].rsplit(" ", 1)[1]) if rows else 0.0


def stored_version(error: InferenceServerException) -> int:
    """The version an ABORTED sequence_version mismatch says the sequence is at."""
    found = re.search(r"is at version (\d+)", error.message())
    assert found, error.message()
    return int(found.group(1))


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory) -> Iterator[tuple[RunningServer, RunningServer]]:
    root = tmp_path_factory.mktemp("replicas")
    flags = (*store_flags(redis_server), "--max-steps-per-request", str(BIG_STEPS))
    pair = (start_server(root / "a", *flags), start_server(root / "b", *flags))
    yield pair
    for server in pair:
        assert server.stop() == 0, server.log_text()


class Workload:
    """Sequences of one model, the reference outputs, and what the servers answered."""

    def __init__(self, reference: Reference, count: int, steps: int, first_id: int) -> None:
        rng = np.random.default_rng(first_id)
        self.ids = list(range(first_id, first_id + count))
        self.steps = steps
        self.inputs = {sid: sequence_data(MODEL, steps, rng) for sid in self.ids}
        self.expected = {sid: reference.run(MODEL, x) for sid, x in self.inputs.items()}
        self.answered: dict[int, dict[int, np.ndarray]] = {sid: {} for sid in self.ids}
        self.lock = threading.Lock()

    def step_input(self, sid: int, t: int) -> list[triton.InferInput]:
        return [infer_input(MODEL, self.inputs[sid][:, t : t + 1])]

    def infer(
        self, client: triton.InferenceServerClient, sid: int, t: int, **options: object
    ) -> triton.InferResult:
        """Step `t` of sequence `sid` (ModelInfer), saying the version it expects (t)."""
        return client.infer(
            MODEL,
            self.step_input(sid, t),
            sequence_id=sid,
            sequence_start=t == 0,
            parameters={"sequence_version": t} if t else None,
            **options,
        )

    def acknowledged(self, sid: int) -> int:
        """How many steps of `sid` were answered, checking they are the first ones."""
        done = sorted(self.answered[sid])
        assert done == list(range(len(done))), (sid, done)
        return len(done)

    def check(self) -> None:
        for sid in self.ids:
            for t, output in self.answered[sid].items():
                close(output, self.expected[sid][:, t : t + 1])


def stream_until_signal(
    server: RunningServer, work: Workload, answers: int, signum: int, window: int = 2
) -> list[str]:
    """Stream the sequences step by step, `window` steps of each in flight at most; after
    `answers` answers, signal the server (and send the rest regardless).

    Returns the errors the stream reported (answers refused by a draining server, or the
    stream breaking as the server dies).
    """
    errors: list[str] = []
    count = 0
    progress = threading.Condition()
    signalled = threading.Event()

    def callback(result, error) -> None:
        nonlocal count
        if error is not None:
            errors.append(str(error))
            return
        response = result.get_response()
        sid, t = map(int, response.id.split("/"))
        assert response.parameters["sequence_version"].int64_param == t + 1
        with progress:
            work.answered[sid][t] = result.as_numpy(OUTPUTS[MODEL])
            count += 1
            if count == answers:
                os.kill(server.process.pid, signum)
                signalled.set()
            progress.notify_all()

    with triton.InferenceServerClient(server.target) as client:
        client.start_stream(callback=callback)
        try:
            for t in range(work.steps):
                with progress:
                    needed = (t - window + 1) * len(work.ids)
                    progress.wait_for(lambda n=needed: count >= n or signalled.is_set(), timeout=30)
                if signalled.is_set():
                    # The rest goes to a server that has begun to stop (not one still serving
                    # everything while its stop starts: a race the test is not about).
                    wait_until_not_ready(client)
                for sid in work.ids:
                    client.async_stream_infer(
                        MODEL,
                        work.step_input(sid, t),
                        request_id=f"{sid}/{t}",
                        sequence_id=sid,
                        sequence_start=t == 0,
                        parameters={"sequence_version": t} if t else None,
                    )
        except InferenceServerException as error:
            errors.append(str(error))  # the stream is gone: the rest is not sent
        server.process.wait(30)
        client.stop_stream(cancel_requests=True)
    return errors


def wait_until_not_ready(client: triton.InferenceServerClient, timeout_s: float = 10) -> None:
    """Until the server says it is not ready, or cannot be asked (it is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not client.is_server_ready():
                return
        except InferenceServerException:
            return
        time.sleep(0.005)
    raise AssertionError(f"the server still said it was ready {timeout_s}s after the signal")


def continue_elsewhere(server: RunningServer, work: Workload) -> dict[int, int]:
    """Continue every sequence on `server` from its first unanswered step; per sequence, how
    many steps had been applied without an answer reaching the client."""
    unanswered: dict[int, int] = {}
    with triton.InferenceServerClient(server.target) as client:
        for sid in work.ids:
            t = acknowledged = work.acknowledged(sid)
            while t < work.steps:
                try:
                    result = work.infer(client, sid, t)
                except InferenceServerException as error:
                    assert error.status() == "StatusCode.ABORTED", error
                    version = stored_version(error)
                    # An acknowledged step is never lost: the store is never behind the client.
                    assert version > t >= acknowledged, (sid, t, version)
                    unanswered[sid] = version - t
                    t = version
                    continue
                work.answered[sid][t] = result.as_numpy(OUTPUTS[MODEL])
                t += 1
    return unanswered


@pytest.mark.parametrize(
    ("durability", "signum"),
    [("step", signal.SIGKILL), ("end", signal.SIGTERM)],
    ids=["crash-at-durability-step", "rolling-restart-at-durability-end"],
)
def test_another_replica_continues_after_a_crash_or_a_rolling_restart(
    durability, signum, redis_server, reference, tmp_path
) -> None:
    work = Workload(reference, count=40, steps=24, first_id=10_000 + 1000 * signum)
    flags = store_flags(redis_server, durability)
    first = start_server(tmp_path / "a", *flags, "--shutdown-grace-s", "10")
    errors = stream_until_signal(first, work, answers=400, signum=signum)
    if signum == signal.SIGTERM:
        assert first.process.returncode == 0, first.log_text()
        assert "handed over to redis://127.0.0.1" in first.log_text()
        assert "40 sequence states written" in first.log_text()
        refused = [e for e in errors if "hands its sequences over" in e]
        assert refused, errors
    else:
        assert first.process.returncode == -signal.SIGKILL
    assert 400 <= sum(map(work.acknowledged, work.ids)) < 40 * 24

    second = start_server(tmp_path / "b", *flags)
    try:
        unanswered = continue_elsewhere(second, work)
    finally:
        assert second.stop() == 0, second.log_text()
    work.check()
    if signum == signal.SIGTERM:
        # A graceful hand-over answers every step it applied: nothing is applied unanswered.
        assert unanswered == {}
    for sid in work.ids:
        assert len(work.answered[sid]) + unanswered.get(sid, 0) == work.steps


def test_requests_alternating_between_replicas_match_one_server(
    replicas, reference, redis_server
) -> None:
    rng = np.random.default_rng(7)
    sequences = {20_000 + k: sequence_data(MODEL, 30, rng) for k in range(12)}
    clients = [triton.InferenceServerClient(r.target) for r in replicas]

    def run(sid: int) -> np.ndarray:
        x = sequences[sid]
        cuts = [0, *sorted(rng_cut.choice(np.arange(1, 30), 9, replace=False)), 30]
        outputs = []
        for r, (begin, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
            result = clients[(sid + r) % 2].infer(
                MODEL,
                [infer_input(MODEL, x[:, begin:end])],
                sequence_id=sid,
                sequence_start=r == 0,
                sequence_end=bool(end == 30),
            )
            assert result.get_response().parameters["sequence_version"].int64_param == r + 1
            outputs.append(result.as_numpy(OUTPUTS[MODEL]))
        return np.concatenate(outputs, axis=1)

    rng_cut = np.random.default_rng(8)
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(sequences, pool.map(run, sequences), strict=True))
    for client in clients:
        client.close()
    for sid, x in sequences.items():
        close(results[sid], reference.run(MODEL, x))
    # Ended sequences leave only a tombstone behind (an END sent again must find it), 24 bytes
    # that expire with the idle timeout.
    with redis_server.client() as store:
        for sid in sequences:
            key = f"rnnserve:{MODEL}:1:-:i{sid}"
            tombstone = decode_tombstone(store.get(key))
            assert tombstone is not None and tombstone.kind is Ending.ENDED, sid
            assert tombstone.version == 10 and 0 < store.pttl(key) <= 300_000


def test_a_race_between_two_replicas_has_one_winner_and_one_aborted(replicas, reference) -> None:
    sid = 30_000
    rng = np.random.default_rng(3)
    first = sequence_data(MODEL, 1, rng)
    contenders = [sequence_data(MODEL, BIG_STEPS, rng) for _ in replicas]
    last = sequence_data(MODEL, 1, rng)
    clients = [triton.InferenceServerClient(r.target) for r in replicas]
    clients[0].infer(MODEL, [infer_input(MODEL, first)], sequence_id=sid, sequence_start=True)
    barrier = threading.Barrier(2)

    def contend(k: int) -> str:
        barrier.wait()
        try:
            clients[k].infer(
                MODEL,
                [infer_input(MODEL, contenders[k])],
                sequence_id=sid,
                outputs=[triton.InferRequestedOutput("c_out")],
            )
        except InferenceServerException as error:
            assert "advanced or ended by another replica" in error.message()
            return error.status()
        return "OK"

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(contend, range(2)))
    assert sorted(outcomes) == ["OK", "StatusCode.ABORTED"], outcomes
    assert sum(event_count(r, MODEL, "aborted") for r in replicas) >= 1
    winner = contenders[outcomes.index("OK")]
    # The loser left no trace: either replica continues from the winner's state.
    result = clients[1].infer(MODEL, [infer_input(MODEL, last)], sequence_id=sid, sequence_end=True)
    assert result.get_response().parameters["sequence_version"].int64_param == 3
    whole = reference.run(MODEL, np.concatenate([first, winner, last], axis=1))
    close(result.as_numpy(OUTPUTS[MODEL]), whole[:, -1:])
    for client in clients:
        client.close()


def sensor_input(x: np.ndarray, name: str = "reading") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_redis_down_and_back(reference, tmp_path) -> None:
    # A Redis of its own, which keeps its data across the restart (append-only file).
    redis = start_redis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server = start_server(tmp_path / "server", *store_flags(redis), "--state-store-timeout-s", "1")
    x = (24 + np.random.default_rng(5).standard_normal((1, 4, 1))).astype(np.float32)
    expected = reference.run("sensor_gru", x)
    client = triton.InferenceServerClient(server.target)
    try:
        first = client.infer(
            "sensor_gru", [sensor_input(x[:, :2])], sequence_id=1, sequence_start=True
        )
        close(first.as_numpy("forecast"), expected[:, :2])
        redis.stop()

        for kwargs in ({"sequence_id": 1}, {"sequence_id": 2, "sequence_start": True}):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("sensor_gru", [sensor_input(x[:, 2:3])], **kwargs)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert f"state store {redis.url} is unavailable" in caught.value.message()
        # Requests that carry their own state need no store.
        h = np.zeros((1, 2, 64), np.float32)
        explicit = client.infer(
            "sensor_gru",
            [sensor_input(x), sensor_input(h, "h_in")],
            outputs=[triton.InferRequestedOutput("forecast")],
        )
        close(explicit.as_numpy("forecast"), expected)
        assert client.is_server_live() and server.alive()
        assert event_count(server, "sensor_gru", "unavailable") >= 2

        redis.start()
        # The failed step was not applied: sent again, it continues exactly.
        rest = client.infer(
            "sensor_gru", [sensor_input(x[:, 2:])], sequence_id=1, sequence_end=True
        )
        close(rest.as_numpy("forecast"), expected[:, 2:])
        again = client.infer(
            "sensor_gru", [sensor_input(x)], sequence_id=2, sequence_start=True, sequence_end=True
        )
        close(again.as_numpy("forecast"), expected)
    finally:
        client.close()
        assert server.stop() == 0, server.log_text()
        redis.stop()


def test_a_state_of_another_shape_is_refused_after_a_reload(redis_server, tmp_path) -> None:
    from rnnserve.models.architectures import RecurrentSpec
    from rnnserve.models.publish import publish
    from tests.factories import SIGNATURE, random_net

    def repository(hidden: int) -> Path:
        root = tmp_path / f"hidden{hidden}"
        spec = RecurrentSpec(cell="gru", input_size=3, hidden_size=hidden, output_size=2)
        publish(random_net(spec), SIGNATURE, root, "reshaped", idle_seconds=60)
        return root

    x = triton.InferInput("x", [1, 1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 1, 3), np.float32))
    flags = store_flags(redis_server)
    before = start_server(tmp_path / "a", "--model-repository", str(repository(8)), *flags)
    with triton.InferenceServerClient(before.target) as client:
        client.infer("reshaped", [x], sequence_id=40_000, sequence_start=True)
    assert before.stop() == 0
    # The same model name and version, now with a wider state.
    after = start_server(tmp_path / "b", "--model-repository", str(repository(16)), *flags)
    try:
        with triton.InferenceServerClient(after.target) as client:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("reshaped", [x], sequence_id=40_000)
            assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "stored state has shapes [1, 8]" in caught.value.message()
            assert "states are [1, 16] float32" in caught.value.message()
            client.infer(
                "reshaped", [x], sequence_id=40_000, sequence_start=True, sequence_end=True
            )
    finally:
        assert after.stop() == 0, after.log_text()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def test_soak_a_thousand_concurrent_sequences(redis_server, tmp_path) -> None:
    """1,000 live sequences stepped round after round for a bounded time: no error, and the
    server's memory stays flat once warm."""
    server = start_server(tmp_path / "soak", *store_flags(redis_server))
    streams, per_stream, seconds = 4, 250, 12.0
    errors: list[str] = []
    steps = 0

    def drive(k: int, rounds: int | None, until: float) -> None:
        nonlocal steps
        done = threading.Semaphore(0)
        ids = range(50_000 + k * per_stream, 50_000 + (k + 1) * per_stream)

        def callback(result, error) -> None:
            if error is not None:
                errors.append(str(error))
            done.release()

        reading = np.full((1, 1, 1), 24.0, np.float32)
        with triton.InferenceServerClient(server.target) as client:
            client.start_stream(callback=callback)
            r = 0
            while (rounds is None or r < rounds) and time.monotonic() < until:
                for sid in ids:
                    client.async_stream_infer(
                        "sensor_gru",
                        [sensor_input(reading)],
                        sequence_id=sid,
                        sequence_start=r == 0 and rounds is not None,
                    )
                for _ in ids:
                    assert done.acquire(timeout=30)
                steps += per_stream
                r += 1
            client.stop_stream()

    try:
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda k: drive(k, 3, time.monotonic() + 60), range(streams)))
            warm = rss_kib(server.process.pid)
            until = time.monotonic() + seconds
            list(pool.map(lambda k: drive(k, None, until), range(streams)))
        after = rss_kib(server.process.pid)
        assert errors == []
        assert steps > 10 * streams * per_stream, steps
        assert after - warm < 48 * 1024, (warm, after)
        assert len(redis_server.client().keys("rnnserve:sensor_gru:1:-:i5????")) == 1000
    finally:
        assert server.stop() == 0, server.log_text()


def test_sequence_version_without_a_shared_store(client) -> None:
    """The memory store counts versions too, and honours a request's expectation."""
    x = np.ones((1, 1, 1), np.float32)
    for version in (1, 2):
        result = client.infer(
            "sensor_gru", [sensor_input(x)], sequence_id=60_000, sequence_start=version == 1
        )
        assert result.get_response().parameters["sequence_version"].int64_param == version
    with pytest.raises(InferenceServerException) as caught:
        client.infer(
            "sensor_gru", [sensor_input(x)], sequence_id=60_000, parameters={"sequence_version": 1}
        )
    assert caught.value.status() == "StatusCode.ABORTED"
    assert "is at version 2, not 1" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("sensor_gru", [sensor_input(x)], parameters={"sequence_version": 1})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.infer(
        "sensor_gru",
        [sensor_input(x)],
        sequence_id=60_000,
        sequence_end=True,
        parameters={"sequence_version": 2},
    )
