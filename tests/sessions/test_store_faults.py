"""The Redis store when an outcome is unknown or the store misbehaves, against real Redis servers:
busy (`DEBUG SLEEP`), a reply lost after the command ran (tests/redis_proxy.py), a failover
that lost writes (a replica promoted, the proxy moved to it), a replica named as the primary,
an evicting memory policy."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from rnnserve.errors import Aborted, SequenceNotFound, StoreOutcomeUnknown, StoreUnavailable
from rnnserve.sessions.redis_store import CAS_SHA, OneServer, RedisStore
from rnnserve.sessions.store import Durability, Read, Write, encode_state
from tests.redis_proxy import RedisProxy
from tests.redis_server import RunningRedis, start_redis, wait_for_replicas
from tests.sessions.test_store import Replica


@pytest.fixture
def proxy(redis_server: RunningRedis) -> Iterator[RedisProxy]:
    running = RedisProxy(redis_server.port)
    yield running
    running.close()


def test_a_busy_redis_fails_a_round_trip_within_its_timeout(tmp_path) -> None:
    """A timeout is not retried: the round trip gives up after the store timeout, not twice it."""
    server = start_redis(tmp_path, "--enable-debug-command", "local")
    store = RedisStore(server.url, 1.0)
    try:
        store.read([Read("warm")])
        busy = threading.Thread(target=_debug_sleep, args=(server, 3.0))
        busy.start()
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.read([Read("k")])
        elapsed = time.monotonic() - started
        busy.join()
        assert elapsed < 1.6, f"{elapsed:.2f} s for a round trip with a 1 s timeout"
    finally:
        store.close()
        server.stop()


def test_a_take_whose_reply_is_lost_is_settled_by_the_next_step(proxy) -> None:
    """At durability end, the write that takes a handed-over sequence runs but its replies are
    lost: the step fails UNAVAILABLE, not applied. The replica's next step confirms the take
    with the same compare-and-set and goes on exactly; no other replica can take it meanwhile."""
    store = RedisStore(proxy.url, 2.0)
    _load_scripts(store)  # so that the replies lost are the compare-and-set's, not NOSCRIPT's
    a, b, c = (Replica(store, Durability.END) for _ in range(3))
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    a.step(sid, 2)
    a.sync.write_all(list(a.held.values()))  # a hands over
    proxy.lose_replies(lambda sent: CAS_SHA.encode() in sent and sid.encode() in sent, times=2)
    with pytest.raises(StoreUnavailable, match="not applied: send it again"):
        b.step(sid, 4)
    with pytest.raises(SequenceNotFound, match="another replica took it over"):
        c.prepare(sid)
    b.step(sid, 4)
    assert b.state(sid) == 7
    assert b.held[sid].state.version == 3
    b.step(sid, 8)
    assert b.state(sid) == 15
    store.close()


def test_a_take_another_replica_won_is_given_up(redis_server) -> None:
    """Two replicas read a handed-over record at once: the first to confirm it continues it;
    the other's step is ABORTED and its copy dropped, never written back at its hand-over."""
    store = RedisStore(redis_server.url, 2.0)
    a, b, c = (Replica(store, Durability.END) for _ in range(3))
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    a.sync.write_all(list(a.held.values()))
    first, second = b.prepare(sid), c.prepare(sid)
    b.commit(first, 10)
    with pytest.raises(Aborted, match="taken over by another replica"):
        c.commit(second, 20)
    assert not c.held[sid].state.held
    assert c.sync.write_all(list(c.held.values())) == 0
    assert b.sync.write_all(list(b.held.values())) == 1
    d = Replica(store, Durability.END)
    d.step(sid, 100)
    assert d.state(sid) == 111
    store.close()


def test_states_a_failover_lost_are_refused_once(tmp_path) -> None:
    """Without --state-min-replicas a failover can lose acknowledged writes. A replica that
    answered a later version than the store now holds, in the same epoch, refuses the step
    once (ABORTED, naming both versions), then goes on from what the store holds; a sequence
    started again elsewhere (a new epoch) is no loss and is simply continued."""
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    proxy = RedisProxy(primary.port)  # where the store's address points: moved at failover
    store = RedisStore(proxy.url, 2.0)
    try:
        wait_for_replicas(primary, 1)
        a = Replica(store)
        sid = uuid.uuid4().hex
        a.step(sid, 1, start=True)
        a.step(sid, 2)
        with primary.client() as client:
            assert client.wait(1, 5000) == 1  # versions 1 and 2 reached the replica
        with replica.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")  # promoted, and cut off
        a.step(sid, 4)
        a.step(sid, 8)  # versions 3 and 4: on the old primary only
        proxy.retarget(replica.port)
        with pytest.raises(Aborted, match=r"is at version 2 .* had answered up to version 4"):
            a.prepare(sid)
        a.step(sid, 16)  # from version 2, as the store holds it
        assert (a.state(sid), a.held[sid].state.version) == (19, 3)
        b = Replica(store)
        b.step(sid, 100, start=True)  # started again elsewhere
        a.step(sid, 1000)
        assert (a.state(sid), a.held[sid].state.version) == (1100, 2)
    finally:
        store.close()
        proxy.close()
        replica.stop()
        primary.stop()


def test_a_write_that_reached_a_replica_is_known_not_applied(tmp_path) -> None:
    """A Sentinel that has not heard of a failover names a replica as the primary: the round
    trip's ROLE says so, its writes were refused there (READONLY), and the step is reported as
    not applied, not as an unknown outcome."""
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    client = redis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=2)
    store = RedisStore("redis://named-by-sentinel", 2.0, pipelines=OneServer(client, True))
    try:
        with pytest.raises(StoreUnavailable, match="not the primary") as caught:
            store.write([Write("rnnserve:test:1:-:sreplica", encode_state(1, 1, []))])
        assert not isinstance(caught.value, StoreOutcomeUnknown), caught.value
    finally:
        store.close()
        replica.stop()
        primary.stop()


def test_an_evicting_redis_is_warned_about(tmp_path, caplog, redis_server) -> None:
    """Every record has a TTL, so under any evicting policy Redis may drop live states."""
    evicting = start_redis(tmp_path, "--maxmemory-policy", "volatile-lru")
    try:
        with caplog.at_level(logging.WARNING, "rnnserve.sessions.redis_store"):
            for url in (evicting.url, redis_server.url):
                store = RedisStore(url, 2.0)
                store.ping()
                store.close()
        warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"volatile-lru on 127.0.0.1:{evicting.port}" in warnings[0]
        assert "noeviction" in warnings[0]
    finally:
        evicting.stop()


def _load_scripts(store: RedisStore) -> None:
    """Have Redis load the store's scripts (a compare-and-set that does not apply)."""
    write = Write(f"rnnserve:test:1:-:s{uuid.uuid4().hex}", encode_state(1, 1, []), b"y" * 16)
    assert store.write([write]) == [False]


def _debug_sleep(server: RunningRedis, seconds: float) -> None:
    with server.client() as client:  # its socket timeout, 5 s, outlasts the sleep
        client.execute_command("DEBUG", "SLEEP", seconds)
