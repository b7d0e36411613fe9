"""Which sequences are live, where their state is, and when they are evicted.

Runs on the event loop only. The rules:
- START allocates a slot (or reuses the slot of a live sequence with the same id: a restart).
- A continuation needs a live sequence; otherwise SequenceNotFound names the id and why. With a
  shared state store, a continuation for an id this replica does not hold *adopts* it instead:
  a slot is allocated and the batch worker loads the state from the store (or fails the step).
- A sequence whose state never reached its slot (its first step failed, or loading it did) is
  forgotten once that step has finished, so no slot is held for it.
- END removes the id at once (later continuations fail); its slot is freed when the END step
  has run, so a queued step never reads a slot that was handed to someone else.
- A sequence with no request for `idle_timeout_s` and no step pending is evicted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from rnnserve.errors import CapacityExhausted, SequenceNotFound
from rnnserve.sessions.arena import StateArena

SequenceId = int | str
_REMEMBERED_ENDINGS = 10_000


@dataclass(eq=False)
class Sequence:
    id: SequenceId
    slot: int
    last_used: float
    pending: int = 0
    """Steps submitted and not yet run."""
    steps: int = 0
    # The fields below are the batch worker's: it alone reads and writes them, one batch at a
    # time, and a sequence is in at most one batch.
    held: bool = False
    """The slot holds the sequence's state (set once its first step or its load succeeded)."""
    version: int = 0
    """Requests the state has advanced through (the store record's version counter)."""
    stamp: bytes = b""
    """Stamp of the store record the slot matches; empty when none was written or read."""


@dataclass
class Counters:
    started: int = 0
    ended: int = 0
    evicted: dict[str, int] = field(default_factory=dict)


class SequenceManager:
    def __init__(
        self, model: str, arena: StateArena, idle_timeout_s: float, adopt: bool = False
    ) -> None:
        self.model = model
        self.arena = arena
        self.idle_timeout_s = idle_timeout_s
        self.adopt = adopt
        """Continuations for ids not held here load from a shared store (else they fail)."""
        self.live: dict[SequenceId, Sequence] = {}
        self.counters = Counters()
        # Why recently gone ids went, for error messages a person can act on.
        self._gone: OrderedDict[SequenceId, str] = OrderedDict()

    def start(self, sequence_id: SequenceId) -> tuple[Sequence, bool]:
        """The sequence to run a START step on, and whether it was a restart of a live one."""
        now = time.monotonic()
        sequence = self.live.get(sequence_id)
        if sequence is not None:
            sequence.last_used = now
            self.counters.started += 1
            return sequence, True
        sequence = self._allocate(sequence_id, now)
        self.counters.started += 1
        return sequence, False

    def _allocate(self, sequence_id: SequenceId, now: float) -> Sequence:
        slot = self.arena.allocate()
        if slot is None:
            raise CapacityExhausted(
                f"model {self.model} already holds its maximum of {self.arena.capacity} live "
                f"sequences; end finished sequences (sequence_end=true) or retry later"
            )
        sequence = Sequence(sequence_id, slot, now)
        self.live[sequence_id] = sequence
        self._gone.pop(sequence_id, None)
        return sequence

    def resume(self, sequence_id: SequenceId) -> Sequence:
        sequence = self.live.get(sequence_id)
        if sequence is None and self.adopt:
            return self._allocate(sequence_id, time.monotonic())
        if sequence is None:
            why = self._gone.get(sequence_id, "it was never started")
            raise SequenceNotFound(
                f"sequence {sequence_id!r} of model {self.model} is not live ({why}); "
                f"send sequence_start=true to begin it"
            )
        sequence.last_used = time.monotonic()
        return sequence

    def end(self, sequence: Sequence) -> None:
        """Remove the id now; free the slot once no step of it is pending."""
        if self.live.get(sequence.id) is sequence:
            del self.live[sequence.id]
            self._remember(sequence.id, "it ended")
            self.counters.ended += 1

    def forget(self, sequence: Sequence, why: str) -> None:
        """Drop a sequence whose state never reached its slot; the slot frees once idle."""
        if self.live.get(sequence.id) is sequence:
            del self.live[sequence.id]
            self._remember(sequence.id, why)
            if sequence.pending == 0:
                self.arena.release(sequence.slot)

    def step_finished(self, sequence: Sequence) -> None:
        """A submitted step ran (or failed); free the slot of an ended sequence once idle."""
        sequence.pending -= 1
        sequence.steps += 1
        if sequence.pending == 0 and self.live.get(sequence.id) is not sequence:
            self.arena.release(sequence.slot)

    def evict_idle(self, now: float | None = None) -> list[SequenceId]:
        now = time.monotonic() if now is None else now
        deadline = now - self.idle_timeout_s
        idle = [s for s in self.live.values() if s.last_used < deadline and s.pending == 0]
        for sequence in idle:
            self.evict(sequence, f"evicted after {self.idle_timeout_s:g} s without a request")
        return [s.id for s in idle]

    def evict(self, sequence: Sequence, why: str, reason: str = "idle") -> None:
        del self.live[sequence.id]
        self._remember(sequence.id, why)
        self.counters.evicted[reason] = self.counters.evicted.get(reason, 0) + 1
        if sequence.pending == 0:
            self.arena.release(sequence.slot)

    def _remember(self, sequence_id: SequenceId, why: str) -> None:
        self._gone[sequence_id] = why
        self._gone.move_to_end(sequence_id)
        while len(self._gone) > _REMEMBERED_ENDINGS:
            self._gone.popitem(last=False)
