"""Which sequences are live, where their state is, and when they are evicted.

Runs on the event loop only. The rules:
- START allocates a slot (or reuses the slot of a live sequence with the same id: a restart).
- A continuation needs a live sequence; otherwise SequenceNotFound names the id and why. With a
  shared state store, a continuation for an id this replica does not hold *adopts* it instead:
  a slot is allocated and the batch worker loads the state from the store (or fails the step).
- A sequence whose state never reached its slot (its first step failed, or loading it did) is
  forgotten once that step has finished, so no slot is held for it.
- Each principal has its own ids: a START or continuation names the sequence (owner, id), so
  another principal's sequence of the same id is as unknown as one never started.
- END removes the id at once (later continuations fail); its slot is freed when the END step
  has run, so a queued step never reads a slot that was handed to someone else. An END that
  fails without being applied makes the sequence live again (`revive`), unless its id was
  started again meanwhile.
- A sequence with no request for `idle_timeout_s` and no step pending is evicted.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from rnnserve.errors import CapacityExhausted, SequenceNotFound
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.sequence import LiveSequence, SequenceId, SequenceKey, sequence_key

_REMEMBERED_ENDINGS = 10_000


class EvictionReason(enum.Enum):
    """Why the server ended a sequence its client had not ended."""

    IDLE = "idle"
    """No request for the idle timeout."""
    UNLOADED = "unloaded"
    """Its model version was unloaded and the unload grace ran out."""


@dataclass
class Counters:
    """Cumulative counts since the model version loaded; plain integers, so a metrics scrape
    from another thread reads them whole."""

    started: int = 0
    """STARTs, restarts of a live id included."""
    ended: int = 0
    """Sequences ended by their client (END)."""
    evicted_idle: int = 0
    evicted_unloaded: int = 0


class SequenceQuota(Protocol):
    """Counts live sequences by principal over every model (the server's policy)."""

    def acquire_sequence(self, principal: str, force: bool = False) -> None:
        """Count a new live sequence of `principal`; raise CapacityExhausted when over a limit
        (unless `force`: a sequence that was live again)."""
        ...

    def release_sequence(self, principal: str) -> None:
        """A live sequence of `principal` is no longer live."""
        ...


class SequenceManager:
    """The live sequences of one model version (event loop only).

    Raises CapacityExhausted when the arena is full and SequenceNotFound for a continuation
    of a sequence that is not live, each with a message a client can act on.
    """

    def __init__(
        self,
        model: str,
        arena: StateArena,
        idle_timeout_s: float,
        adopt: bool = False,
        limit: int | None = None,
        quota: SequenceQuota | None = None,
    ) -> None:
        self.model = model
        self.arena = arena
        self.limit = limit if limit is not None else arena.capacity
        """Most live sequences. The arena may have more slots than this: a sequence's slot is
        freed when its last request has run, and an ended sequence still finishing holds its
        slot as headroom the limit does not count."""
        self.idle_timeout_s = idle_timeout_s
        self.adopt = adopt
        """Continuations for ids not held here load from a shared store (else they fail)."""
        self.quota = quota
        """Where live sequences are also counted by principal (None: nowhere)."""
        self.live: dict[SequenceKey, LiveSequence] = {}
        self.counters = Counters()
        # Why recently gone sequences went, for error messages a person can act on.
        self._gone: OrderedDict[SequenceKey, str] = OrderedDict()

    def start(self, sequence_id: SequenceId, owner: str = "") -> tuple[LiveSequence, bool]:
        """The sequence `owner` runs a START step on, and whether it was a restart of a live
        one."""
        now = time.monotonic()
        key = sequence_key(owner, sequence_id)
        sequence = self.live.get(key)
        if sequence is not None:
            sequence.last_used = now
            self.counters.started += 1
            return sequence, True
        sequence = self._allocate(key, sequence_id, owner, now)
        self.counters.started += 1
        return sequence, False

    def _allocate(
        self, key: SequenceKey, sequence_id: SequenceId, owner: str, now: float
    ) -> LiveSequence:
        if len(self.live) >= self.limit:
            raise CapacityExhausted(
                f"model {self.model} already holds its maximum of {self.limit} live "
                f"sequences; end finished sequences (sequence_end=true) or retry later"
            )
        if self.quota is not None:
            self.quota.acquire_sequence(owner)
        slot = self.arena.allocate()
        if slot is None:
            if self.quota is not None:
                self.quota.release_sequence(owner)
            finishing = self.arena.used - len(self.live)
            raise CapacityExhausted(
                f"model {self.model} has no free state slot: {finishing} sequences that ended "
                f"are still finishing their last requests; retry in a moment"
            )
        sequence = LiveSequence(sequence_id, slot, now, owner)
        self.live[key] = sequence
        self._gone.pop(key, None)
        return sequence

    def resume(self, sequence_id: SequenceId, owner: str = "") -> LiveSequence:
        """The live sequence of `owner` a continuation runs on (adopted from a shared store if
        asked). Another owner's sequence of the same id is not found, as an unknown id is not."""
        key = sequence_key(owner, sequence_id)
        sequence = self.live.get(key)
        if sequence is None and self.adopt:
            return self._allocate(key, sequence_id, owner, time.monotonic())
        if sequence is None:
            why = self._gone.get(key, "it was never started")
            raise SequenceNotFound(
                f"sequence {sequence_id!r} of model {self.model} is not live ({why}); "
                f"send sequence_start=true to begin it"
            )
        sequence.last_used = time.monotonic()
        return sequence

    def ending(self, key: SequenceKey) -> str | None:
        """Why the sequence of `key` recently stopped being live here ("it ended", ...); None
        when it is live or unknown (never started, or ended long ago)."""
        return self._gone.get(key)

    def endings(self) -> list[tuple[SequenceKey, str]]:
        """Every remembered ending, as (key, why), oldest first."""
        return list(self._gone.items())

    def end(self, sequence: LiveSequence) -> None:
        """Remove the id now; free the slot once no step of it is pending."""
        if self.live.get(sequence.key) is sequence:
            self._remove(sequence, "it ended")
            self.counters.ended += 1

    def revive(self, sequence: LiveSequence) -> bool:
        """Make `sequence` live again after its END failed without being applied (refused
        ABORTED for its sequence_version, say, or cancelled before it ran), so its client can
        send the END again; not when its id was started again meanwhile. Whether it was."""
        if sequence.key in self.live:
            return False
        self.live[sequence.key] = sequence
        self._gone.pop(sequence.key, None)
        self.counters.ended -= 1
        if self.quota is not None:
            self.quota.acquire_sequence(sequence.owner, force=True)
        return True

    def forget(self, sequence: LiveSequence, why: str) -> None:
        """Drop a sequence whose state never reached its slot; the slot frees once idle."""
        if self.live.get(sequence.key) is sequence:
            self._remove(sequence, why)
            if sequence.pending == 0:
                self.arena.release(sequence.slot)

    def request_started(self, sequence: LiveSequence) -> None:
        """A request of `sequence` was submitted: it is pending until `request_finished`."""
        sequence.pending += 1

    def reported(self, sequence: LiveSequence, held: bool) -> None:
        """The execution of a request of `sequence` reported whether its slot held its state
        after it (requests complete in the order they ran)."""
        sequence.has_state = held

    def request_finished(self, sequence: LiveSequence) -> None:
        """A submitted request ran (or failed); free the slot of an ended sequence once idle."""
        sequence.pending -= 1
        if sequence.pending == 0 and self.live.get(sequence.key) is not sequence:
            self.arena.release(sequence.slot)

    def evict_idle(self, now: float | None = None) -> list[SequenceId]:
        """Evict the sequences idle for over the idle timeout at `now` (`time.monotonic()`
        seconds; the current time when None); their ids."""
        now = time.monotonic() if now is None else now
        deadline = now - self.idle_timeout_s
        idle = [s for s in self.live.values() if s.last_used < deadline and s.pending == 0]
        for sequence in idle:
            self.evict(
                sequence,
                f"evicted after {self.idle_timeout_s:g} s without a request",
                EvictionReason.IDLE,
            )
        return [s.id for s in idle]

    def evict(self, sequence: LiveSequence, why: str, reason: EvictionReason) -> None:
        """End a live sequence on the server's initiative; `why` is what its client is told."""
        self._remove(sequence, why)
        if reason is EvictionReason.IDLE:
            self.counters.evicted_idle += 1
        else:
            self.counters.evicted_unloaded += 1
        if sequence.pending == 0:
            self.arena.release(sequence.slot)

    def _remove(self, sequence: LiveSequence, why: str) -> None:
        del self.live[sequence.key]
        if self.quota is not None:
            self.quota.release_sequence(sequence.owner)
        self._gone[sequence.key] = why
        self._gone.move_to_end(sequence.key)
        while len(self._gone) > _REMEMBERED_ENDINGS:
            self._gone.popitem(last=False)
