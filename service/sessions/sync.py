"""Keep the arena and a state store in step, one batch at a time, on the batch worker thread.

The batcher calls `prepare` before a batch runs and `commit` after the model call, before any
new state is scattered into the arena. Each is at most one round trip to the store.

Durability `step` (the store is the truth, the arena a cache of it):
- prepare: a sequence held here is *validated*: the store answers UNCHANGED while its record
  still carries the stamp the slot matches, else the newer record, which is loaded (another
  replica advanced the sequence: requests may alternate between replicas and stay exact). A
  sequence not held here is loaded. A START reads nothing.
- commit: each new state is written with compare-and-set from the stamp it was computed from
  (a START writes unconditionally, an END leaves an ENDED tombstone). A step whose record
  changed in between lost a race to another replica: it fails with ABORTED and its state is not
  applied anywhere, so two replicas never fork a sequence. Only then is the arena updated, so a
  step that fails here leaves this replica's copy as it was.

Durability `end` and `none`: a sequence held here runs from memory with no store traffic. A
sequence not held here is *taken* from the store: read (GET) before the model call, and after
it replaced by a TAKEN tombstone, by compare-and-set from the stamp read, before the step is
answered; so a state handed over at shutdown is continued by exactly one replica, and a round
trip sent twice takes nothing twice. A START deletes any stale record of the same id. At
`end`, `write_all` writes every held state when the replica shuts down.

Outcomes that are unknown (a write round trip whose reply was lost: StoreOutcomeUnknown) are
settled by the sequence's next request from the stored stamp, never assumed not to have
happened. At `step`, the next validation finds either the old stamp (not applied) or the new
record (applied), and a client that sends `sequence_version` learns which (ABORTED "is at
version v+1" for a step that was applied); an END sent again from the same stamp finds its own
tombstone and is answered. At `end`, a take not confirmed keeps the stamp it read, and the
sequence's next step (or the hand-over) confirms it with the same, repeatable, compare-and-set.

With the memory store nothing is read or written; only the checks on the sequence remain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.errors import (
    Aborted,
    SequenceNotFound,
    ServiceError,
    ShuttingDown,
    StateMismatch,
    StoreOutcomeUnknown,
    StoreUnavailable,
)
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.sequence import LiveSequence
from rnnserve.sessions.store import (
    MOVING,
    STAMP_OFFSET,
    STAMP_SIZE,
    UNCHANGED,
    Durability,
    Ending,
    Read,
    ReadResult,
    StateKey,
    StateStore,
    Tombstone,
    Write,
    WriteResult,
    decode_state,
    decode_tombstone,
    encode_state,
    epoch_of,
    new_tag,
)

logger = logging.getLogger(__name__)

_WRITE_CHUNK = 1000
"""Records per round trip when writing every state, so one pipeline never grows without bound."""


@dataclass(eq=False, slots=True)
class Advance:
    """One step of a server-held sequence, as the store sees it."""

    sequence: LiveSequence
    start: bool = False
    end: bool = False
    expect: int | None = None
    """The version the client says the sequence is at (request parameter sequence_version)."""


Errors = dict[int, ServiceError]
"""Failed steps, by their position in the list given."""

EVENTS = ("loaded", "written", "aborted", "refused", "unavailable")
"""What `StateSync.events` counts: states read into the arena, states written (not tombstones),
steps that lost a race (or a sequence_version check, or met states a failover lost), stored
states refused (other shapes, unreadable) and store operations that failed (or whose outcome
is unknown)."""


class StateSync:
    """Keeps one model version's arena and the state store in step (see the module docstring).

    Used on the batch worker only. With a store that is not shared, durability is `none`;
    `ttl_s` is the seconds a record lives unwritten (the model's idle timeout).
    """

    def __init__(
        self,
        store: StateStore,
        durability: Durability,
        model: str,
        version: int,
        arena: StateArena,
        ttl_s: float,
    ) -> None:
        self.store = store
        self.durability = durability if store.shared else Durability.NONE
        self.model = model
        self.version = version
        self.arena = arena
        self.ttl_s = ttl_s
        self.shapes = [t.shape[1:] for t in arena.tensors]
        self._label = f"{model} (version {version})"
        self._token = new_tag() | 1
        """This replica's own, non-zero: what makes its TAKEN tombstones its own."""
        self.events = dict.fromkeys(EVENTS, 0)
        """Counts by event; written by the batch worker, read by metrics scrapes."""

    def key(self, sequence: LiveSequence) -> str:
        """The store key of `sequence`'s record."""
        return str(StateKey(self.model, self.version, sequence.id, sequence.owner))

    # ------------------------------------------------------------------ before the model call
    def prepare(self, advances: Sequence[Advance]) -> Errors:
        """Bring each slot up to the stored state where durability asks; check expectations."""
        errors: Errors = {}
        reads: list[Read] = []
        readers: list[int] = []
        for j, advance in enumerate(advances):
            read = self._read_for(advance)
            if isinstance(read, Read):
                reads.append(read)
                readers.append(j)
            elif read is not None:
                errors[j] = read
        if reads:
            try:
                results: list[ReadResult] = self.store.read(reads)
            except StoreUnavailable as unavailable:
                results = [unavailable] * len(reads)
            for j, result in zip(readers, results, strict=True):
                failure = self._load(advances[j], result)
                if failure is not None:
                    errors[j] = failure
        for j, advance in enumerate(advances):
            if j not in errors and (mismatch := self._unexpected(advance)) is not None:
                errors[j] = mismatch
                self.events["aborted"] += 1
        return errors

    def _read_for(self, advance: Advance) -> Read | ServiceError | None:
        """What to read for this step: a validation, a load, a take, nothing, or an error."""
        sequence, state = advance.sequence, advance.sequence.state
        if advance.start:
            return None
        if self.store.shared and self.durability is Durability.STEP:
            return Read(self.key(sequence), unless=state.stamp if state.held else b"")
        if state.held:
            return None
        if self.store.shared:
            return Read(self.key(sequence))  # taken at commit, from the stamp read
        return SequenceNotFound(
            f"sequence {sequence.id!r} of model {self._label} is not live (its first request "
            f"failed); send sequence_start=true to begin it"
        )

    def _unexpected(self, advance: Advance) -> Aborted | None:
        expect, sequence = advance.expect, advance.sequence
        version = sequence.state.version
        if expect is None or advance.start or expect == version:
            return None
        return Aborted(
            f"sequence {sequence.id!r} of model {self._label} is at version {version}, "
            f"not {expect} as the request expects (sequence_version); it was not applied"
        )

    def _load(self, advance: Advance, result: ReadResult) -> ServiceError | None:
        sequence = advance.sequence
        if isinstance(result, Exception):
            self.events["unavailable"] += 1
            if isinstance(result, ServiceError):
                return result
            return StoreUnavailable(f"state store {self.store.name}: {result}")
        if result is None:
            sequence.state.held = False
            return SequenceNotFound(
                f"sequence {sequence.id!r} of model {self._label} is not live: neither this "
                f"replica nor the state store {self.store.name} holds it (never started, ended, "
                f"or idle for over {self.ttl_s:g} s); send sequence_start=true to begin it"
            )
        if result == UNCHANGED:
            return None
        tombstone = decode_tombstone(result)
        if tombstone is not None:
            return self._load_tombstone(advance, tombstone)
        if result == MOVING:
            sequence.state.held = False
            return ShuttingDown(
                f"sequence {sequence.id!r} of model {self._label} is being handed over by a "
                f"replica that is shutting down; send the request again in a moment"
            )
        try:
            stored = decode_state(result)
        except ValueError as error:
            sequence.state.held = False
            self.events["refused"] += 1
            return StateMismatch(
                f"sequence {sequence.id!r} of model {self._label}: the state store holds an "
                f"unreadable record ({error}); send sequence_start=true to begin it again"
            )
        shapes = [t.shape for t in stored.tensors]
        dtypes = {t.dtype for t in stored.tensors}
        if shapes != self.shapes or dtypes - {np.dtype("<f4")}:
            sequence.state.held = False
            self.events["refused"] += 1
            return StateMismatch(
                f"sequence {sequence.id!r} of model {self._label}: its stored state has shapes "
                f"{_shapes(shapes)} {', '.join(sorted(map(str, dtypes)))}, but this model "
                f"version's states are {_shapes(self.shapes)} float32 (the model was replaced "
                f"by one with a different state); it cannot be continued, send "
                f"sequence_start=true to begin it again"
            )
        lost = self._lost_writes(advance, stored.version, stored.stamp)
        slot = np.asarray([sequence.slot], dtype=np.intp)
        self.arena.put(slot, [t[np.newaxis] for t in stored.tensors])
        sequence.state.held = True
        sequence.state.version = stored.version
        # At `end`: the stamp the take's compare-and-set at commit replaces.
        sequence.state.stamp = stored.stamp
        self.events["loaded"] += 1
        return lost

    def _lost_writes(self, advance: Advance, version: int, stamp: bytes) -> Aborted | None:
        """The refusal of a step whose sequence the store holds at an older `version` than this
        replica answered, in the same epoch: not a restart elsewhere, but states the store lost
        (a failover without --state-min-replicas). Refused once, so that its client hears of
        it; the sequence then goes on from what the store holds."""
        state = advance.sequence.state
        if (
            not state.held
            or not state.stamp
            or version >= state.version
            or epoch_of(stamp) != epoch_of(state.stamp)
        ):
            return None
        self.events["aborted"] += 1
        return Aborted(
            f"sequence {advance.sequence.id!r} of model {self._label} is at version {version} "
            f"in the state store {self.store.name}, but this replica had answered up to version "
            f"{state.version}: the store lost the states of the later steps (a failover "
            f"without --state-min-replicas?); this request was not applied. The sequence goes "
            f"on from version {version}: send the steps after it again (sequence_version="
            f"{version}), or begin it again with sequence_start=true"
        )

    def _load_tombstone(self, advance: Advance, tombstone: Tombstone) -> ServiceError | None:
        """What a tombstone found instead of a record means for this step."""
        sequence = advance.sequence
        state = sequence.state
        if (
            advance.end
            and state.held
            and state.stamp
            and tombstone == Tombstone.after(Ending.ENDED, state.stamp)
        ):
            # This very END, from the state held here, was applied by an attempt whose answer
            # was lost: run it again from that state; its commit finds its own tombstone.
            return None
        state.held = False
        if tombstone.kind is Ending.ENDED:
            return SequenceNotFound(
                f"sequence {sequence.id!r} of model {self._label} is not live: it ended (at "
                f"version {tombstone.version}); send sequence_start=true to begin it again"
            )
        return SequenceNotFound(
            f"sequence {sequence.id!r} of model {self._label} is not live here: another "
            f"replica took it over from the state store {self.store.name} and holds it (at "
            f"--state-durability end, send every request of a sequence to the replica that "
            f"holds it: route on the sequence id)"
        )

    # ------------------------------------------------------------------ after the model call
    def commit(self, advances: Sequence[Advance], states: Sequence[np.ndarray]) -> Errors:
        """Store the new states as durability asks; the steps whose state may not be kept.

        `states` holds one array per state tensor, with the advances on axis 0.
        """
        writes: dict[int, Write] = {}
        if self.store.shared:
            for j, advance in enumerate(advances):
                write = self._write_for(advance, [s[j] for s in states])
                if write is not None:
                    writes[j] = write
        errors = self._write(advances, writes) if writes else {}
        for j, advance in enumerate(advances):
            if j not in errors:
                state = advance.sequence.state
                state.version = 1 if advance.start else state.version + 1
                state.held = True
                record = writes[j].record if j in writes else None
                stored = record if self.durability is Durability.STEP else None
                state.stamp = stored[STAMP_OFFSET : STAMP_OFFSET + STAMP_SIZE] if stored else b""
        return errors

    def _write(self, advances: Sequence[Advance], writes: dict[int, Write]) -> Errors:
        """One round trip for the batch's writes; the steps whose write did not apply."""
        errors: Errors = {}
        try:
            results: list[WriteResult] = self.store.write(list(writes.values()))
        except StoreUnavailable as error:
            results = [error] * len(writes)
        for j, result in zip(writes, results, strict=True):
            if result is not True:
                errors[j] = self._write_failure(advances[j], result)
            elif (record := writes[j].record) is not None and decode_tombstone(record) is None:
                self.events["written"] += 1
        return errors

    def _write_for(self, advance: Advance, state: list[np.ndarray]) -> Write | None:
        sequence = advance.sequence
        key = self.key(sequence)
        stamp = sequence.state.stamp
        if self.durability is not Durability.STEP:
            if advance.start:
                # No stale record of an earlier sequence with its id is left to be taken.
                return Write(key, None)
            if not stamp:
                return None  # held here, and no take to confirm
            return self._tombstone(key, Ending.ENDED if advance.end else Ending.TAKEN, stamp)
        if advance.end:
            # A START that is also the END leaves nothing of the sequence, as before it.
            return Write(key, None) if advance.start else self._tombstone(key, Ending.ENDED, stamp)
        if advance.start:
            return Write(key, encode_state(1, new_tag(), state), None, self.ttl_s)
        tag = new_tag(epoch_of(stamp))
        record = encode_state(sequence.state.version + 1, tag, state)
        return Write(key, record, stamp, self.ttl_s)

    def _tombstone(self, key: str, kind: Ending, stamp: bytes) -> Write:
        """The compare-and-set that replaces the record stamped `stamp` by a tombstone: the
        same bytes each time it is sent, so a repeat counts as applied."""
        tombstone = Tombstone.after(kind, stamp, self._token).encode()
        return Write(key, tombstone, expect=stamp, ttl_s=self.ttl_s)

    def _write_failure(self, advance: Advance, result: WriteResult) -> ServiceError:
        sequence = advance.sequence
        if isinstance(result, StoreOutcomeUnknown):
            self.events["unavailable"] += 1
            return self._outcome_unknown(advance, result)
        if isinstance(result, Exception):
            self.events["unavailable"] += 1
            if isinstance(result, ServiceError):
                return result
            return StoreUnavailable(f"state store {self.store.name}: {result}")
        self.events["aborted"] += 1
        if self.durability is not Durability.STEP:
            sequence.state.held = False  # the copy taken here is another replica's now
            return Aborted(
                f"sequence {sequence.id!r} of model {self._label} was taken over by another "
                f"replica while this request ran; it was not applied (send the sequence's "
                f"requests to the replica that holds it)"
            )
        return Aborted(
            f"sequence {sequence.id!r} of model {self._label} was advanced or ended by another "
            f"replica while this request ran; it was not applied (the next request continues "
            f"from the stored state)"
        )

    def _outcome_unknown(self, advance: Advance, error: StoreOutcomeUnknown) -> ServiceError:
        """A step whose state write lost its reply: what its client must be told to settle it."""
        if self.durability is not Durability.STEP:
            # The step itself was not applied; whether the take was is settled by the next
            # request here (its compare-and-set is sent again from the same stamp).
            return StoreUnavailable(
                f"{error}; this request was not applied: send it again (to this replica)"
            )
        if advance.start:
            return StoreUnavailable(
                f"{error}; whether the START was applied is not known: send it again, a START "
                f"begins the sequence afresh either way"
            )
        version = advance.sequence.state.version
        step = "its END" if advance.end else "this step"
        return StoreUnavailable(
            f"{error}: {step} of sequence {advance.sequence.id!r} of model {self._label} may "
            f"or may not have been applied; send it again with sequence_version={version} "
            f"(the version before it): ABORTED 'is at version {version + 1}' then means it "
            f"was applied (its output is not sent again); without sequence_version a step "
            f"sent again may be applied twice"
        )

    # ------------------------------------------------------------------ handing over
    def mark_moving(self, sequences: Sequence[LiveSequence], ttl_s: float) -> int:
        """Mark where the states of `sequences` will be written, before refusing their requests.

        A request refused here and sent to another replica before `write_all` is done then finds
        the mark, and is told to retry (UNAVAILABLE), not that the sequence is unknown.
        """
        if not self.store.shared or self.durability is not Durability.END:
            return 0
        held = self._settle_takes(sequences)
        for first in range(0, len(held), _WRITE_CHUNK):
            chunk = held[first : first + _WRITE_CHUNK]
            self.store.write([Write(self.key(s), MOVING, ttl_s=ttl_s) for s in chunk])
        return len(held)

    def write_all(self, sequences: Sequence[LiveSequence]) -> int:
        """Write every held state (graceful shutdown at durability `end`); how many were."""
        if not self.store.shared or self.durability is not Durability.END:
            return 0
        held = self._settle_takes(sequences)
        for first in range(0, len(held), _WRITE_CHUNK):
            chunk = held[first : first + _WRITE_CHUNK]
            slots = np.asarray([s.slot for s in chunk], dtype=np.intp)
            tensors = self.arena.take(slots)
            writes = [
                Write(
                    self.key(s),
                    encode_state(s.state.version, new_tag(), [t[k] for t in tensors]),
                    ttl_s=self.ttl_s,
                )
                for k, s in enumerate(chunk)
            ]
            failed = [r for r in self._write_twice(writes) if r is not True]
            self.events["written"] += len(writes) - len(failed)
            if failed:
                raise StoreUnavailable(
                    f"{len(failed)} states of model {self._label} were not confirmed written "
                    f"to {self.store.name}: {failed[0]}"
                )
        return len(held)

    def _write_twice(self, writes: list[Write]) -> list[WriteResult]:
        """`writes`, and once more those whose reply was lost: a replica handing over has no
        next request to settle them by, and writing the same record again is safe."""
        results = _write_or_unknown(self.store, writes)
        again = [k for k, r in enumerate(results) if isinstance(r, StoreOutcomeUnknown)]
        if again:
            retried = _write_or_unknown(self.store, [writes[k] for k in again])
            for k, result in zip(again, retried, strict=True):
                results[k] = result
        return results

    def _settle_takes(self, sequences: Sequence[LiveSequence]) -> list[LiveSequence]:
        """The sequences held here once every take not yet confirmed is settled: confirmed
        (the record, or this replica's own tombstone, is still there) or given up (another
        replica took it: not held here any more, and never written back over its copy).

        Raises StoreUnavailable when a take cannot be settled."""
        held = [s for s in sequences if s.state.held]
        unsettled = [s for s in held if s.state.stamp]
        for first in range(0, len(unsettled), _WRITE_CHUNK):
            chunk = unsettled[first : first + _WRITE_CHUNK]
            writes = [self._tombstone(self.key(s), Ending.TAKEN, s.state.stamp) for s in chunk]
            for sequence, result in zip(chunk, self._write_twice(writes), strict=True):
                if isinstance(result, Exception):
                    raise StoreUnavailable(
                        f"sequence {sequence.id!r} of model {self._label}: whether this replica "
                        f"holds it could not be settled with {self.store.name}: {result}"
                    )
                sequence.state.stamp = b""
                sequence.state.held = result
        return [s for s in held if s.state.held]


def _write_or_unknown(store: StateStore, writes: list[Write]) -> list[WriteResult]:
    """`store.write(writes)`, with a round trip that lost its reply as each write's result."""
    try:
        return store.write(writes)
    except StoreOutcomeUnknown as unknown:
        return [unknown] * len(writes)


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(str(list(s)) for s in shapes)
