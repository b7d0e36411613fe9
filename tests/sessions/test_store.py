"""State records, the Redis store and the arena/store sync, against a real redis-server."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
import pytest

from rnnserve.errors import (
    Aborted,
    SequenceNotFound,
    ShuttingDown,
    StateMismatch,
    StoreUnavailable,
)
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.connect import open_store
from rnnserve.sessions.redis_store import RedisStore, redact
from rnnserve.sessions.sequence import LiveSequence
from rnnserve.sessions.store import (
    UNCHANGED,
    Durability,
    Ending,
    MemoryStore,
    Read,
    StateKey,
    Tombstone,
    Write,
    decode_state,
    decode_tombstone,
    encode_state,
)
from rnnserve.sessions.sync import Advance, StateSync
from tests.redis_server import free_port, start_redis

SHAPES = [(2, 4), (2, 4)]  # an LSTM's h and c: layers x hidden


def test_records_round_trip_as_compact_binary() -> None:
    h = np.arange(8, dtype=np.float32).reshape(2, 4)
    c = -h
    record = encode_state(7, 99, [h, c])
    assert record[:4] == b"RNNS"
    assert len(record) == 24 + 2 * (1 + 3 + 1 + 8) + 2 * h.nbytes
    state = decode_state(record)
    assert (state.version, state.tag) == (7, 99)
    np.testing.assert_array_equal(state.tensors[0], h)
    np.testing.assert_array_equal(state.tensors[1], c)
    assert state.stamp == record[8:24]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RNNS",
        pickle.dumps(np.zeros(3)),
        encode_state(1, 2, [np.zeros((2, 4), np.float32)])[:-1],
        encode_state(1, 2, [np.zeros((2, 4), np.float32)]) + b"\0",
    ],
)
def test_anything_but_a_whole_record_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_state(data)


def test_keys_name_model_version_owner_and_id() -> None:
    assert str(StateKey("charlm_lstm", 2, 42)) == "rnnserve:charlm_lstm:2:-:i42"
    assert str(StateKey("charlm_lstm", 2, "42")) == "rnnserve:charlm_lstm:2:-:s42"
    assert str(StateKey("m", 1, "a", owner="alice")) == "rnnserve:m:1:alice:sa"


def test_store_urls() -> None:
    assert isinstance(open_store("memory", 1.0), MemoryStore)
    assert redact("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("rediss://me:hunter2@db/1") == "rediss://me:***@db/1"
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("etcd://x", 1.0)


@pytest.fixture
def store(redis_server):
    opened = RedisStore(redis_server.url, 2.0)
    yield opened
    opened.close()


def fresh_key() -> str:
    return f"rnnserve:test:1:-:s{uuid.uuid4().hex}"


def test_compare_and_set(store, redis_server) -> None:
    key = fresh_key()
    first = encode_state(1, 11, [np.ones((2, 4), np.float32)])
    second = encode_state(2, 22, [np.full((2, 4), 2, np.float32)])
    assert store.write([Write(key, first, ttl_s=60)]) == [True]
    assert 0 < redis_server.client().pttl(key) <= 60_000
    stamp1, stamp2 = first[8:24], second[8:24]
    assert store.read([Read(key, unless=stamp1)]) == [UNCHANGED]
    assert store.read([Read(key)]) == [first]
    assert store.write([Write(key, second, expect=stamp2)]) == [False]  # not what is there
    assert store.write([Write(key, second, expect=stamp1, ttl_s=60)]) == [True]
    # The same write again (a retried round trip whose reply was lost) is not a conflict.
    assert store.write([Write(key, second, expect=stamp1, ttl_s=60)]) == [True]
    assert store.read([Read(key, unless=stamp1)]) == [second]
    # An END leaves a tombstone derived from the stamp it replaces: sent again, the same bytes.
    ended = Tombstone.after(Ending.ENDED, stamp2)
    assert (ended.version, decode_tombstone(ended.encode())) == (3, ended)
    assert store.write([Write(key, ended.encode(), expect=stamp1)]) == [False]
    assert store.write([Write(key, ended.encode(), expect=stamp2, ttl_s=60)]) == [True]
    assert store.write([Write(key, ended.encode(), expect=stamp2, ttl_s=60)]) == [True]
    assert store.read([Read(key, unless=stamp2)]) == [ended.encode()]
    with pytest.raises(ValueError, match="conditional write needs a record"):
        store.write([Write(key, None, expect=stamp2)])


def test_a_take_only_its_own_replica_can_repeat(store) -> None:
    key = fresh_key()
    record = encode_state(3, 1, [np.zeros((2, 4), np.float32)])
    stamp = record[8:24]
    store.write([Write(key, record, ttl_s=60)])
    mine, theirs = (Tombstone.after(Ending.TAKEN, stamp, token) for token in (5, 7))
    assert mine.version == 3 and mine.stamp != stamp != theirs.stamp
    assert store.write([Write(key, mine.encode(), expect=stamp)]) == [True]
    assert store.write([Write(key, mine.encode(), expect=stamp)]) == [True]
    assert store.write([Write(key, theirs.encode(), expect=stamp)]) == [False]


def test_scripts_are_loaded_again_after_redis_forgets_them(store, redis_server) -> None:
    key = fresh_key()
    record = encode_state(1, 5, [np.zeros((2, 4), np.float32)])
    store.write([Write(key, record, ttl_s=60)])
    redis_server.client().script_flush()
    other = fresh_key()
    results = store.read([Read(key, unless=b"x" * 16), Read(other)])
    assert results == [record, None]


def test_an_unreachable_store_is_unavailable_and_named() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    unreachable = RedisStore(url, 0.5)
    with pytest.raises(
        StoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1:\d+/0 is unavailable"
    ):
        unreachable.read([Read("k")])
    with pytest.raises(StoreUnavailable):
        unreachable.ping()


def test_a_password_in_the_url_is_used_and_never_shown(tmp_path) -> None:
    redis = start_redis(tmp_path, "--requirepass", "hunter2")
    try:
        url = f"redis://:hunter2@127.0.0.1:{redis.port}/0"
        with_password = RedisStore(url, 2.0)
        assert with_password.name == f"redis://:***@127.0.0.1:{redis.port}/0"
        assert with_password.write([Write(fresh_key(), b"x")]) == [True]
        wrong = RedisStore(url.replace("hunter2", "guess"), 2.0)
        with pytest.raises(StoreUnavailable) as caught:
            wrong.read([Read("k")])
        assert "hunter2" not in str(caught.value) and "guess" not in str(caught.value)
        with_password.close()
        wrong.close()
    finally:
        redis.stop()


class Replica:
    """A model's arena and sync as one replica holds them, without the rest of the server."""

    def __init__(self, store, durability=Durability.STEP, shapes=SHAPES, model="sync") -> None:
        self.arena = StateArena(shapes, 8)
        self.sync = StateSync(store, durability, model, 1, self.arena, 60.0)
        self.held: dict[str, LiveSequence] = {}

    def sequence(self, sid: str) -> LiveSequence:
        if sid not in self.held:
            self.held[sid] = LiveSequence(sid, self.arena.allocate(), 0.0)
        return self.held[sid]

    def prepare(self, sid: str, start=False, end=False, expect=None) -> Advance:
        advance = Advance(self.sequence(sid), start, end, expect)
        errors = self.sync.prepare([advance])
        if errors:
            raise errors[0]
        return advance

    def commit(self, advance: Advance, add: float) -> None:
        """The 'model': the new state is the old one (zeros at a start) plus `add`."""
        slot = np.asarray([advance.sequence.slot])
        old = [
            np.zeros((1, *s)) if advance.start else t[slot]
            for s, t in zip(SHAPES, self.arena.tensors, strict=True)
        ]
        new = [(o + add).astype(np.float32) for o in old]
        errors = self.sync.commit([advance], new)
        if errors:
            raise errors[0]
        self.arena.put(slot, new)

    def step(self, sid: str, add: float, **flags) -> None:
        self.commit(self.prepare(sid, **flags), add)

    def state(self, sid: str) -> float:
        return float(self.arena.tensors[0][self.held[sid].slot][0, 0])


def test_replicas_that_alternate_continue_each_other(store) -> None:
    a, b = Replica(store), Replica(store)
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    b.step(sid, 10)  # loads from the store
    a.step(sid, 100)  # validates, sees b's newer state, loads it
    b.step(sid, 1000, expect=3)
    assert b.state(sid) == 1111
    assert b.held[sid].state.version == 4
    with pytest.raises(Aborted, match="at version 4, not 3"):
        a.prepare(sid, expect=3)


def test_a_race_between_replicas_has_one_winner(store) -> None:
    a, b = Replica(store), Replica(store)
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    first, second = a.prepare(sid), b.prepare(sid)  # both read version 1
    a.commit(first, 10)
    with pytest.raises(Aborted, match="advanced or ended by another replica"):
        b.commit(second, 20)
    b.step(sid, 100)  # b's next step loads the winner's state
    assert b.state(sid) == 111


def test_state_of_another_shape_is_refused(store) -> None:
    sid = uuid.uuid4().hex
    Replica(store, model="reshaped").step(sid, 1, start=True)
    wider = Replica(store, shapes=[(2, 8), (2, 8)], model="reshaped")
    with pytest.raises(StateMismatch, match=r"\[2, 4\], \[2, 4\] float32.*\[2, 8\], \[2, 8\]"):
        wider.prepare(sid)


def test_durability_end_hands_over_through_write_all_and_take(store) -> None:
    a, b = Replica(store, Durability.END), Replica(store, Durability.END)
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    a.step(sid, 2)
    with pytest.raises(SequenceNotFound):
        b.prepare(sid)  # nothing written yet at `end`
    assert a.sync.write_all(list(a.held.values())) == 1
    b.held.clear()
    b.step(sid, 4)
    assert b.state(sid) == 7
    with pytest.raises(SequenceNotFound):
        Replica(store, Durability.END).prepare(sid)  # taken: one replica continues it


def test_a_request_that_overtakes_a_hand_over_is_told_to_retry(store) -> None:
    a, b = Replica(store, Durability.END), Replica(store, Durability.END)
    sid = uuid.uuid4().hex
    a.step(sid, 1, start=True)
    assert a.sync.mark_moving(list(a.held.values()), 10.0) == 1
    with pytest.raises(ShuttingDown, match="being handed over"):
        b.prepare(sid)
    a.sync.write_all(list(a.held.values()))
    b.held.clear()
    b.step(sid, 2)
    assert b.state(sid) == 3


def test_memory_store_checks_without_storing() -> None:
    replica = Replica(MemoryStore())
    replica.step("s", 1, start=True)
    replica.step("s", 1, expect=1)
    assert replica.held["s"].state.version == 2
    with pytest.raises(SequenceNotFound, match="first request failed"):
        replica.prepare("new")
