"""The state store behind Redis Sentinel: a primary, its replica and three Sentinels, all real
(Debian's redis-server, the Sentinels as `redis-server --sentinel`), on loopback.

A step acknowledged at durability `step` with `--state-min-replicas 1` is on a replica before
its answer leaves, so the replica Sentinel promotes when the primary is killed has it: every
sequence goes on exactly, and no acknowledged step is lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.errors import StoreUnavailable
from rnnserve.sessions.redis_store import RedisStore, sentinel_client
from rnnserve.sessions.store import Write
from tests.api.conftest import OUTPUTS
from tests.api.test_scale_out import MODEL, Workload, stored_version
from tests.redis_server import (
    RunningRedis,
    RunningSentinel,
    start_redis,
    start_sentinel,
    wait_for_replicas,
)
from tests.server import start_server

PRIMARY = "states"
"""The name the Sentinels know the primary by."""
FAILOVER_TIMEOUT_S = 30.0


@dataclass
class SentinelSet:
    primary: RunningRedis
    replica: RunningRedis
    sentinels: list[RunningSentinel]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{PRIMARY}/0"

    def current_primary(self) -> int | None:
        """The primary's port, as the first Sentinel that answers says."""
        for sentinel in self.sentinels:
            try:
                found = sentinel.primary(PRIMARY)
            except Exception:  # noqa: BLE001 - ask the next one
                continue
            if found is not None:
                return found[1]
        return None


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    started = SentinelSet(primary, replica, [])
    try:
        wait_for_replicas(primary, 1)
        for k in range(3):
            started.sentinels.append(start_sentinel(tmp_path / f"sentinel{k}", primary, PRIMARY, 2))
        yield started
    finally:
        for sentinel in started.sentinels:
            sentinel.stop()
        replica.stop()
        primary.stop()


def test_a_write_counts_once_enough_replicas_have_it(sentinel_set: SentinelSet) -> None:
    waited = RedisStore(sentinel_set.url, 1.0, min_replicas=1)
    assert waited.write([Write("rnnserve:test:1:-:s1", b"one")]) == [True]
    with sentinel_set.replica.client() as replica:
        assert replica.get("rnnserve:test:1:-:s1") == b"one"  # WAIT returned: it is there

    greedy = RedisStore(sentinel_set.url, 0.2, min_replicas=2)  # there is only one
    [result] = greedy.write([Write("rnnserve:test:1:-:s2", b"two")])
    assert isinstance(result, StoreUnavailable)
    assert "only 1 of 2 replicas acknowledged it within 200 ms" in str(result)
    assert "ABORTED then means this step did take effect" in str(result)
    # What the message says: the primary did apply it.
    with sentinel_set.primary.client() as primary:
        assert primary.get("rnnserve:test:1:-:s2") == b"two"
    statistics = greedy.statistics()
    assert statistics.replication_failures == 1 and sum(statistics.round_trips) == 1
    assert waited.statistics().replication_failures == 0
    for store in (waited, greedy):
        store.close()


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["wait-off", "wait-on"])
def test_what_a_failover_loses_without_the_replica_wait(
    sentinel_set: SentinelSet, min_replicas: int, record_property
) -> None:
    """The loss the wait prevents, made certain: the replica is frozen (SIGSTOP) while the
    primary takes writes, far more than loopback's socket buffers hold, so most never leave
    the primary's memory; then the primary dies and the Sentinels promote the replica."""
    store = RedisStore(sentinel_set.url, 0.5, min_replicas=min_replicas)
    record = os.urandom(512 * 1024)
    keys = [f"rnnserve:loss:1:-:i{k}" for k in range(40 if not min_replicas else 2)]
    replica = sentinel_set.replica
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        acknowledged = [key for key in keys if store.write([Write(key, record)]) == [True]]
        sentinel_set.primary.stop(signal.SIGKILL)
    finally:
        replica.process.send_signal(signal.SIGCONT)
    moved = time.monotonic() + FAILOVER_TIMEOUT_S
    while sentinel_set.current_primary() != replica.port:
        assert time.monotonic() < moved, "the Sentinels did not fail over"
        time.sleep(0.1)
    with replica.client() as promoted:
        kept = {key for key in keys if promoted.exists(key)}
    lost = [key for key in acknowledged if key not in kept]
    store.close()
    record_property(
        "figures",
        f"{len(acknowledged)} of {len(keys)} writes of 512 KiB acknowledged, {len(lost)} of "
        f"them lost in the failover",
    )
    if min_replicas:
        # No replica could acknowledge: no step was answered, so none can be lost.
        assert acknowledged == [] and lost == []
    else:
        # Every write was acknowledged by the primary alone, and the promoted replica lacks
        # those that had not reached it: steps a client was told were stored are gone.
        assert acknowledged == keys
        assert lost, "every acknowledged write survived: the replica was not behind"


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://127.0.0.1:1", "redis+sentinel:///states", "redis+sentinel://h:x/states"],
)
def test_a_sentinel_url_without_sentinels_or_primary_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://|is not host:port"):
        sentinel_client(url, 1.0)


class Driver:
    """Steps every sequence of `work` one request at a time, each on a thread of its own.

    UNAVAILABLE (a failover under way, or a write no replica acknowledged yet) is retried with
    the same sequence_version: a normal answer then means the step was applied once, ABORTED
    at version t+1 that it had taken effect before (its output is lost, its state is not).
    """

    def __init__(self, targets: list[str], work: Workload) -> None:
        self.targets, self.work = targets, work
        self.stop = threading.Event()
        """Set: each sequence stops after its current step (the test checks what ran)."""
        self.reached: dict[int, int] = {}
        """Per sequence, the steps it went through (answered or applied)."""
        self.answers = 0
        self.unavailable = 0
        self.applied_unanswered = 0
        self.lock = threading.Lock()
        self.failures: list[BaseException] = []

    def run(self, deadline: float) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._guarded, args=(sid, deadline)) for sid in self.work.ids
        ]
        for thread in threads:
            thread.start()
        return threads

    def _guarded(self, sid: int, deadline: float) -> None:
        try:
            self._sequence(sid, deadline)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.failures.append(error)

    def _sequence(self, sid: int, deadline: float) -> None:
        work = self.work
        clients = [triton.InferenceServerClient(target) for target in self.targets]
        try:
            t = 0
            while t < work.steps and not self.stop.is_set():
                assert time.monotonic() < deadline, f"sequence {sid} stuck at step {t}"
                client = clients[t % len(clients)]  # several servers: each step on the next
                try:
                    result = work.infer(client, sid, t, client_timeout=10)
                except InferenceServerException as error:
                    status = error.status()
                    if status == "StatusCode.UNAVAILABLE":
                        with self.lock:
                            self.unavailable += 1
                        time.sleep(0.05)
                        continue
                    assert status == "StatusCode.ABORTED", (sid, t, error.message())
                    # Never behind the client: an acknowledged step is never lost.
                    assert stored_version(error) == t + 1, (sid, t, error.message())
                    with self.lock:
                        self.applied_unanswered += 1
                    t += 1
                    continue
                assert result.get_response().parameters["sequence_version"].int64_param == t + 1
                with work.lock:
                    work.answered[sid][t] = result.as_numpy(OUTPUTS[MODEL])
                with self.lock:
                    self.answers += 1
                t += 1
            self.reached[sid] = t
        finally:
            for client in clients:
                client.close()


def test_sequences_go_on_exactly_across_a_failover(
    sentinel_set: SentinelSet, reference, tmp_path: Path, record_property
) -> None:
    work = Workload(reference, count=12, steps=40, first_id=70_000)
    server = start_server(
        tmp_path / "server",
        "--state-store", sentinel_set.url, "--state-min-replicas", "1",
        "--state-store-timeout-s", "1",
    )  # fmt: skip
    try:
        driver = Driver([server.target], work)
        deadline = time.monotonic() + 120
        threads = driver.run(deadline)
        while driver.answers < len(work.ids) * work.steps // 3:
            assert time.monotonic() < deadline and not driver.failures, driver.failures
            time.sleep(0.01)
        killed = sentinel_set.primary
        old_port = killed.port
        killed.stop(signal.SIGKILL)  # mid-stream, acknowledged steps and all
        moved = time.monotonic() + FAILOVER_TIMEOUT_S
        while sentinel_set.current_primary() in (old_port, None):
            assert time.monotonic() < moved, "the Sentinels did not fail over"
            time.sleep(0.1)
        assert sentinel_set.current_primary() == sentinel_set.replica.port
        failover_s = time.monotonic() - (moved - FAILOVER_TIMEOUT_S)
        # The old primary comes back, empty, as the new primary's replica, as a Sentinel-aware
        # deployment starts it (never as a primary: a Sentinel that has not yet heard of the
        # failover would send clients to it), and not to be promoted until it has synced: a
        # busy primary once looked down for a second here, and the Sentinels failed over again,
        # to this node while it was still empty, and every state was gone (README, "Operating
        # it"). Writes can reach a replica again once it has synced.
        killed.flags = (
            "--replicaof", "127.0.0.1", str(sentinel_set.replica.port), "--replica-priority", "0"
        )  # fmt: skip
        killed.start()
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 1))
        assert not driver.failures, driver.failures
        assert not any(thread.is_alive() for thread in threads)
        # Every step of every sequence applied once: answered, or applied before a failure.
        assert driver.answers + driver.applied_unanswered == len(work.ids) * work.steps
        work.check()  # every acknowledged output, exactly as an uninterrupted run
        record_property(
            "figures",
            f"failover {failover_s:.1f} s after the SIGKILL; {driver.answers} steps answered, "
            f"{driver.unavailable} UNAVAILABLE answers retried, {driver.applied_unanswered} "
            f"steps applied whose answer was UNAVAILABLE",
        )
        assert driver.unavailable > 0  # the failover was seen, and waited out
        metrics = server.scrape()
        assert "rnnserve_state_store_failovers_total 1.0" in metrics, metrics
        replicated = [r for r in metrics.splitlines() if r.startswith("rnnserve_state_store_rep")]
        assert replicated and float(replicated[-1].split()[-1]) >= 1.0
    finally:
        assert server.stop() == 0, server.log_text()
