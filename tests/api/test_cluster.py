"""The state store on a Redis Cluster: three shards of a primary and a replica each, real
(Debian's redis-server, made a cluster with `redis-cli --cluster create`), on loopback.

Two rnnserve replicas take turns stepping each sequence while slots are moved between shards
and a primary is killed; every answered output must equal the model run in-process over the
whole sequence, and every step must be applied exactly once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.errors import StoreOutcomeUnknown, StoreUnavailable
from rnnserve.sessions.connect import open_store
from rnnserve.sessions.store import Read, Write, encode_state
from tests.api.test_failover import Driver
from tests.api.test_scale_out import Workload
from tests.redis_server import RunningCluster, free_port, start_cluster
from tests.server import start_server

FAILOVER_TIMEOUT_S = 30.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningCluster]:
    running = start_cluster(tmp_path / "cluster")
    yield running
    running.stop()


def test_keys_spread_over_every_shard_and_writes_wait_on_each(cluster: RunningCluster) -> None:
    store = open_store(cluster.url, 1.0, min_replicas=1)
    keys = [f"rnnserve:m:1:-:i{k}" for k in range(60)]
    assert store.write([Write(key, key.encode()) for key in keys]) == [True] * len(keys)
    assert store.read([Read(key) for key in keys]) == [key.encode() for key in keys]
    # Every primary holds some of them; each shard's WAIT saw its replica take them.
    held = {}
    for port in cluster.primaries():
        node = next(n for n in cluster.nodes if n.port == port)
        with node.client() as client:
            held[port] = client.dbsize()
    assert len(held) == 3 and all(count > 0 for count in held.values()), held
    assert sum(held.values()) == len(keys)
    statistics = store.statistics()
    assert statistics is not None and statistics.replication_failures == 0
    assert sum(statistics.round_trips) >= 6  # a round trip per shard, each way
    # Compare-and-set through the script, on whichever shard holds the key.
    assert store.write([Write(keys[0], b"new", expect=b"wrong stamp")]) == [False]
    store.close()


def test_a_cluster_url_without_nodes_is_refused() -> None:
    with pytest.raises(ValueError, match="is not host:port|at least one node"):
        open_store("redis+cluster://localhost", 1.0)
    with pytest.raises(ValueError, match="at least one node"):
        open_store("redis+cluster:///", 1.0)


def test_a_cluster_that_cannot_be_reached_is_unavailable(tmp_path: Path) -> None:
    """redis-py says so with a RedisClusterException, which is not a RedisError: it must still
    be UNAVAILABLE (not applied), and a server must start and serve without the cluster."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    store = open_store(url, 0.5)
    for operation in (
        lambda: store.read([Read("rnnserve:m:1:-:s1")]),
        lambda: store.write([Write("rnnserve:m:1:-:s1", encode_state(1, 1, []))]),
        store.ping,
    ):
        with pytest.raises(StoreUnavailable, match="cannot be connected") as caught:
            operation()
        assert not isinstance(caught.value, StoreOutcomeUnknown)
    server = start_server(
        tmp_path / "server", "--state-store", url, "--state-store-timeout-s", "0.5"
    )
    try:
        with triton.InferenceServerClient(server.target) as client:
            tokens = triton.InferInput("tokens", [1, 1], "INT64")
            tokens.set_data_from_numpy(np.ones((1, 1), np.int64))
            with pytest.raises(InferenceServerException) as refused:
                client.infer("charlm_lstm", [tokens], sequence_id=1, sequence_start=True)
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    finally:
        assert server.stop() == 0, server.log_text()


def test_scripts_run_after_asking_on_a_migration_target_that_lacks_them(
    cluster: RunningCluster,
) -> None:
    """A slot migrates to a shard that never ran the store's scripts: a script command redirected
    there with ASK answers NOSCRIPT, and must run again after ASKING once the scripts are loaded
    (without it, the target answers MOVED back to the source and the step fails)."""
    store = open_store(cluster.url, 2.0)
    key = "rnnserve:m:1:-:smigrating"
    nodes = {n.port: n for n in cluster.live()}
    with nodes[cluster.primaries()[0]].client() as client:
        slot = client.execute_command("CLUSTER", "KEYSLOT", key)
        slots = client.execute_command("CLUSTER", "SLOTS")
    source = next(nodes[int(owner[1])] for a, b, owner, *_ in slots if a <= slot <= b)
    target = nodes[next(port for port in cluster.primaries() if port != source.port)]
    ids = cluster.node_ids()
    with target.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port][0])
        client.script_flush()
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port][0])
    first = encode_state(1, 11, [np.zeros((2, 4), np.float32)])
    second = encode_state(2, 22, [np.ones((2, 4), np.float32)])
    assert store.write([Write(key, first)]) == [True]  # not on the source: ASK, to the target
    assert store.read([Read(key, unless=b"x" * 16)]) == [first]
    assert store.write([Write(key, second, expect=first[8:24])]) == [True]
    with target.client() as client:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(key)
        assert pipe.execute()[1] == second
    store.close()


def test_two_replicas_take_turns_across_a_resharding_and_a_failover(
    cluster: RunningCluster, reference, tmp_path: Path, record_property
) -> None:
    work = Workload(reference, count=12, steps=3000, first_id=90_000)
    flags = (
        "--state-store", cluster.url, "--state-min-replicas", "1",
        "--state-store-timeout-s", "1",
    )  # fmt: skip
    servers = [start_server(tmp_path / name, *flags) for name in ("a", "b")]
    try:
        driver = Driver([s.target for s in servers], work)
        deadline = time.monotonic() + 150
        threads = driver.run(deadline)
        total = len(work.ids) * work.steps

        def after(answers: int) -> None:
            """Until `answers` more steps were answered (the sequences go on meanwhile)."""
            goal = driver.answers + answers
            while driver.answers < goal:
                assert time.monotonic() < deadline and not driver.failures, driver.failures
                assert driver.answers < total, "the sequences ended too soon"
                time.sleep(0.01)

        after(300)
        # Move 500 slots from the first primary to the second while the sequences run:
        # their keys answer ASK, then MOVED.
        ids = cluster.node_ids()
        source, target = cluster.primaries()[:2]
        moving = threading.Thread(
            target=cluster.cli,
            args=(
                "--cluster",
                "reshard",
                f"127.0.0.1:{target}",
                "--cluster-from",
                ids[source][0],
                "--cluster-to",
                ids[target][0],
                "--cluster-slots",
                "2000",
                "--cluster-yes",
            ),  # fmt: skip
        )
        moving.start()
        moving.join(120)
        assert not moving.is_alive()
        resharded_at = driver.answers

        after(300)
        # Kill the third primary; its replica takes over, and the node rejoins as a replica.
        victim_port = cluster.primaries()[-1]
        victim = next(n for n in cluster.nodes if n.port == victim_port)
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        while victim_port in cluster.primaries() or len(cluster.primaries()) < 3:
            assert time.monotonic() - killed_at < FAILOVER_TIMEOUT_S, cluster.node_ids()
            time.sleep(0.1)
        failover_s = time.monotonic() - killed_at
        failed_over_at = driver.answers
        # It rejoins empty as a replica; it must not be promoted before it has synced.
        victim.flags = (*victim.flags, "--cluster-replica-no-failover", "yes")
        victim.start()
        after(600)  # the steps that waited out the failover, and more
        driver.stop.set()
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 1))
        assert not driver.failures, driver.failures
        assert not any(thread.is_alive() for thread in threads)
        record_property(
            "figures",
            f"resharding done after {resharded_at} answers; failover {failover_s:.1f} s after "
            f"the SIGKILL, at {failed_over_at} answers; {driver.answers} steps answered, "
            f"{driver.unavailable} UNAVAILABLE answers retried, {driver.applied_unanswered} "
            f"steps applied whose answer was UNAVAILABLE",
        )
        # Every step of every sequence applied once: answered, or applied before a failure.
        assert driver.answers + driver.applied_unanswered == sum(driver.reached.values())
        assert min(driver.reached.values()) > 0
        work.check()  # every answered output, exactly as an uninterrupted run
        failovers = sum(
            float(row.split()[-1])
            for s in servers
            for row in s.scrape().splitlines()
            if row.startswith("rnnserve_state_store_failovers_total")
        )
        assert failovers >= 1
    finally:
        for server in servers:
            assert server.stop() == 0, server.log_text()
