"""The sequence manager and its state arena: which sequences are live, which slot each holds,
when a slot is free again, and what a client is told about a sequence that is not live.

No sleeping: idle eviction takes `now`, computed from the sequences' own `last_used`
(`time.monotonic()` seconds); a sequence whose last request was long ago is backdated.
The tests play the served model's part: a submitted request adds one to `pending`, and
`request_finished` says it ran.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.errors import CapacityExhausted, SequenceNotFound
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.manager import EvictionReason, SequenceManager
from rnnserve.sessions.sequence import LiveSequence

MODEL = "toy (version 1)"
SHAPES = [(2, 4), (3,)]  # two state tensors per slot: 8 + 3 floats
IDLE_S = 60.0


def manager(capacity: int = 4, adopt: bool = False) -> SequenceManager:
    return SequenceManager(MODEL, StateArena(SHAPES, capacity), IDLE_S, adopt=adopt)


def submitted(sequences: SequenceManager, sequence: LiveSequence, end: bool = False) -> None:
    """What the served model does as it queues a request of `sequence`."""
    sequence.pending += 1
    if end:
        sequences.end(sequence)


def not_live_message(sequences: SequenceManager, sequence_id: int | str) -> str:
    with pytest.raises(SequenceNotFound) as raised:
        sequences.resume(sequence_id)
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    message = str(raised.value)
    assert f"sequence {sequence_id!r} of model {MODEL} is not live" in message
    assert "sequence_start=true" in message  # what the client can do about it
    return message


# ---------------------------------------------------------------- start, resume, end


def test_start_allocates_a_slot_and_a_restart_keeps_it() -> None:
    sequences = manager()
    sequence, restarted = sequences.start("a")
    assert not restarted
    assert (sequence.id, sequence.slot, sequence.pending) == ("a", 0, 0)
    assert sequences.live == {"a": sequence}
    assert sequences.arena.used == 1

    started_at = sequence.last_used
    sequence.last_used -= 1000.0  # its last request was long ago
    again, restarted = sequences.start("a")
    assert restarted
    assert again is sequence and again.slot == 0
    assert sequences.evict_idle(now=started_at + IDLE_S - 1.0) == []  # the restart used it
    assert sequences.arena.used == 1
    assert sequences.counters.started == 2  # a restart counts as a START

    other, restarted = sequences.start(7)
    assert not restarted and other.slot == 1
    assert sequences.arena.used == 2


def test_resume_returns_the_live_sequence_and_marks_it_used() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    started_at = sequence.last_used
    sequence.last_used -= 1000.0  # its last request was long ago
    assert sequences.resume("a") is sequence
    assert sequences.evict_idle(now=started_at + IDLE_S - 1.0) == []  # the resume used it
    assert sequences.counters.started == 1  # a continuation is no START


def test_resume_of_an_id_never_started_names_it() -> None:
    sequences = manager()
    assert "(it was never started)" in not_live_message(sequences, "ghost")
    sequences.start(7)
    # An integer and a string are different sequences.
    assert "(it was never started)" in not_live_message(sequences, "7")
    assert sequences.arena.used == 1


def test_an_ended_sequence_is_gone_at_once_and_its_slot_frees_when_its_request_ran() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    submitted(sequences, sequence, end=True)
    assert "a" not in sequences.live
    assert sequences.counters.ended == 1
    assert "(it ended)" in not_live_message(sequences, "a")
    assert sequences.arena.used == 1  # the END request is still queued: it reads the slot
    sequences.request_finished(sequence)
    assert sequences.arena.used == 0
    assert sequences.start("b")[0].slot == sequence.slot  # reusable
    sequences.end(sequence)  # already ended: nothing more happens
    assert sequences.counters.ended == 1


def test_a_slot_frees_only_when_no_request_is_pending() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    submitted(sequences, sequence)
    submitted(sequences, sequence)
    sequences.request_finished(sequence)
    sequences.request_finished(sequence)
    assert sequences.arena.used == 1  # still live: a finished request frees nothing
    submitted(sequences, sequence)
    submitted(sequences, sequence, end=True)
    sequences.request_finished(sequence)
    assert sequences.arena.used == 1  # the END is still pending
    sequences.request_finished(sequence)
    assert sequence.pending == 0
    assert sequences.arena.used == 0


def test_a_new_sequence_with_an_ended_id_gets_its_own_slot() -> None:
    sequences = manager()
    old, _ = sequences.start("a")
    submitted(sequences, old, end=True)
    new, restarted = sequences.start("a")  # while the old END is still queued
    assert not restarted and new is not old
    assert new.slot != old.slot
    assert sequences.live == {"a": new}
    sequences.request_finished(old)  # frees the old slot, not the new one
    assert sequences.arena.used == 1
    assert sequences.resume("a") is new
    assert sequences.arena.allocate() == old.slot


def test_forget_drops_a_sequence_and_frees_its_slot_once_idle() -> None:
    sequences = manager()
    idle, _ = sequences.start("idle")
    sequences.forget(idle, "its first request failed")
    assert "idle" not in sequences.live
    assert sequences.arena.used == 0
    assert "(its first request failed)" in not_live_message(sequences, "idle")

    busy, _ = sequences.start("busy")
    submitted(sequences, busy)
    submitted(sequences, busy)
    sequences.forget(busy, "loading its state failed")
    assert sequences.arena.used == 1  # a queued request still reads the slot
    sequences.request_finished(busy)
    assert sequences.arena.used == 1
    sequences.request_finished(busy)
    assert sequences.arena.used == 0
    assert "(loading its state failed)" in not_live_message(sequences, "busy")
    assert sequences.counters.ended == 0  # forgetting is not ending


# ---------------------------------------------------------------- capacity


def test_a_full_arena_refuses_new_sequences_and_names_its_maximum() -> None:
    sequences = manager(capacity=2)
    a, _ = sequences.start("a")
    sequences.start("b")
    with pytest.raises(CapacityExhausted) as raised:
        sequences.start("c")
    assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"model {MODEL} already holds its maximum of 2 live sequences" in str(raised.value)
    assert "c" not in sequences.live
    assert sequences.counters.started == 2  # the refused START is not counted
    assert sequences.start("a")[1]  # a restart needs no new slot
    submitted(sequences, a, end=True)
    sequences.request_finished(a)
    c, _ = sequences.start("c")
    assert c.slot == a.slot


def test_the_limit_counts_live_sequences_not_slots_still_finishing() -> None:
    """Issue 12: a START is admitted while the live sequences, ENDs received counted out, are
    below the limit; an ended sequence's slot is headroom until its last request ran."""
    sequences = SequenceManager(MODEL, StateArena(SHAPES, 4), IDLE_S, limit=2)
    a, _ = sequences.start("a")
    b, _ = sequences.start("b")
    submitted(sequences, b, end=True)  # its END is queued, not yet run: its slot stays held
    c, _ = sequences.start("c")  # live: a and c
    assert len({a.slot, b.slot, c.slot}) == 3
    with pytest.raises(CapacityExhausted, match="maximum of 2 live sequences"):
        sequences.start("d")
    submitted(sequences, c, end=True)
    d, _ = sequences.start("d")  # live: a and d; b and c still finishing fill the arena
    submitted(sequences, d, end=True)
    with pytest.raises(CapacityExhausted, match="3 sequences that ended are still finishing"):
        sequences.start("e")
    sequences.request_finished(b)
    assert sequences.start("e")[0].slot == b.slot


# ---------------------------------------------------------------- eviction


def test_only_sequences_idle_past_the_timeout_and_with_nothing_pending_are_evicted() -> None:
    sequences = manager()
    stale, _ = sequences.start("stale")
    waiting, _ = sequences.start("waiting")
    fresh, _ = sequences.start("fresh")
    stale.last_used -= 2 * IDLE_S  # no request for two timeouts
    waiting.last_used -= 2 * IDLE_S
    submitted(sequences, waiting)  # but a request of it is queued
    now = fresh.last_used + IDLE_S - 1.0  # "fresh" is a second short of the timeout

    assert sequences.evict_idle(now=now) == ["stale"]
    assert set(sequences.live) == {"waiting", "fresh"}
    assert sequences.counters.evicted_idle == 1
    assert sequences.arena.used == 2
    assert f"(evicted after {IDLE_S:g} s without a request)" in not_live_message(sequences, "stale")

    sequences.request_finished(waiting)  # nothing pending now: it goes too
    assert sequences.evict_idle(now=now) == ["waiting"]
    assert sequences.evict_idle(now=now) == []  # each is evicted once
    assert sequences.counters.evicted_idle == 2
    assert sequences.counters.evicted_unloaded == 0
    assert sequences.arena.used == 1
    assert sequences.evict_idle(now=fresh.last_used + IDLE_S + 1.0) == ["fresh"]
    assert sequences.arena.used == 0
    sequences.start("new")
    assert sequences.evict_idle() == []  # at the current time, a new sequence is not idle


def test_a_sequence_exactly_at_the_timeout_is_kept() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    sequence.last_used = 1000.0  # a round time, so that `now - IDLE_S` is exact
    assert sequences.evict_idle(now=1000.0 + IDLE_S) == []
    assert sequences.evict_idle(now=1000.0 + IDLE_S + 0.5) == ["a"]


def test_an_unloaded_version_evicts_with_its_own_reason_and_count() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    submitted(sequences, sequence)
    why = "version 1 of model toy was unloaded"
    sequences.evict(sequence, why, EvictionReason.UNLOADED)
    assert "a" not in sequences.live
    assert (sequences.counters.evicted_unloaded, sequences.counters.evicted_idle) == (1, 0)
    assert sequences.counters.ended == 0
    assert f"({why})" in not_live_message(sequences, "a")
    assert sequences.arena.used == 1  # its queued request still reads the slot
    sequences.request_finished(sequence)
    assert sequences.arena.used == 0


def test_a_restart_after_eviction_forgets_why_it_went() -> None:
    sequences = manager()
    sequence, _ = sequences.start("a")
    assert sequences.evict_idle(now=sequence.last_used + 2 * IDLE_S) == ["a"]
    again, restarted = sequences.start("a")
    assert not restarted
    assert sequences.resume("a") is again


# ---------------------------------------------------------------- adoption (a shared store)


def test_adopt_allocates_a_slot_for_an_id_not_held_here() -> None:
    sequences = manager(capacity=1, adopt=True)
    adopted = sequences.resume("elsewhere")
    assert sequences.live == {"elsewhere": adopted}
    assert adopted.slot == 0 and not adopted.has_state and not adopted.state.held
    assert sequences.resume("elsewhere") is adopted  # the next continuation finds it
    assert sequences.counters.started == 0
    with pytest.raises(CapacityExhausted):
        sequences.resume("another")


def test_without_adopt_an_id_not_held_here_is_not_found() -> None:
    sequences = manager(adopt=False)
    not_live_message(sequences, "elsewhere")
    assert sequences.arena.used == 0


# ---------------------------------------------------------------- the arena


def test_the_arena_hands_out_low_slots_first_until_full() -> None:
    arena = StateArena(SHAPES, capacity=3)
    assert arena.used == 0
    assert [arena.allocate() for _ in range(3)] == [0, 1, 2]
    assert arena.used == 3
    assert arena.allocate() is None
    arena.release(1)
    assert arena.used == 2
    assert arena.allocate() == 1
    assert arena.allocate() is None


def test_the_arena_sizes_a_slot_by_its_state_tensors() -> None:
    arena = StateArena(SHAPES, capacity=5)
    assert arena.bytes_per_slot == (2 * 4 + 3) * 4  # float32
    assert [t.shape for t in arena.tensors] == [(5, 2, 4), (5, 3)]
    with pytest.raises(ValueError, match="capacity must be positive"):
        StateArena(SHAPES, capacity=0)


def test_the_arena_gathers_and_scatters_rows_by_slot() -> None:
    arena = StateArena(SHAPES, capacity=4)
    slots = np.asarray([2, 0], dtype=np.intp)
    h = np.arange(16, dtype=np.float32).reshape(2, 2, 4)
    c = -np.arange(6, dtype=np.float32).reshape(2, 3)
    arena.put(slots, [h, c])
    taken = arena.take(np.asarray([0, 1, 2], dtype=np.intp))
    np.testing.assert_array_equal(taken[0], [h[1], np.zeros((2, 4)), h[0]])
    np.testing.assert_array_equal(taken[1], [c[1], np.zeros(3), c[0]])
    # `take` copies: changing what it gave leaves the arena as it was.
    taken[0][:] = 99.0
    np.testing.assert_array_equal(arena.take(slots)[0], h)
    with pytest.raises(ValueError):
        arena.put(slots, [h])  # one array per state tensor
