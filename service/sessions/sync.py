"""Keep the arena and a state store in step, one batch at a time, on the batch worker thread.

The batcher calls `prepare` before a batch runs and `commit` after the model call, before any
new state is scattered into the arena. Each is at most one round trip to the store.

Durability `step` (the store is the truth, the arena a cache of it):
- prepare: a sequence held here is *validated*: the store answers UNCHANGED while its record
  still carries the stamp the slot matches, else the newer record, which is loaded (another
  replica advanced the sequence: requests may alternate between replicas and stay exact). A
  sequence not held here is loaded. A START reads nothing.
- commit: each new state is written with compare-and-set from the stamp it was computed from
  (a START writes unconditionally, an END deletes). A step whose record changed in between
  lost a race to another replica: it fails with ABORTED and its state is not applied anywhere,
  so two replicas never fork a sequence. Only then is the arena updated, so a step that fails
  here (ABORTED, UNAVAILABLE) leaves the sequence as it was and can simply be sent again.

Durability `end` and `none`: a sequence held here runs from memory with no store traffic. A
sequence not held here is *taken* from the store (read and deleted in one operation), so a
state handed over at shutdown is continued by exactly one replica; a START deletes any stale
record of the same id. At `end`, `write_all` writes every held state when the replica shuts down.

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
    Read,
    ReadResult,
    StateKey,
    StateStore,
    Write,
    WriteResult,
    decode_state,
    encode_state,
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
"""What `StateSync.events` counts: states read into the arena, states written, steps that lost
a race (or a sequence_version check), stored states refused (other shapes, unreadable) and
store operations that failed."""


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
                failure = self._load(advances[j].sequence, result)
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
            return Read(self.key(sequence), take=True)
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

    def _load(self, sequence: LiveSequence, result: ReadResult) -> ServiceError | None:
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
        slot = np.asarray([sequence.slot], dtype=np.intp)
        self.arena.put(slot, [t[np.newaxis] for t in stored.tensors])
        sequence.state.held = True
        sequence.state.version = stored.version
        # A taken record is no longer in the store: nothing there to compare against.
        sequence.state.stamp = stored.stamp if self.durability is Durability.STEP else b""
        self.events["loaded"] += 1
        return None

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
                state.stamp = record[STAMP_OFFSET : STAMP_OFFSET + STAMP_SIZE] if record else b""
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
                errors[j] = self._write_failure(advances[j].sequence, result)
            elif writes[j].record is not None:
                self.events["written"] += 1
        return errors

    def _write_for(self, advance: Advance, state: list[np.ndarray]) -> Write | None:
        sequence = advance.sequence
        key = self.key(sequence)
        if self.durability is not Durability.STEP:
            # A START leaves no stale record of an earlier sequence with its id to be taken.
            return Write(key, None) if advance.start else None
        expect = None if advance.start else sequence.state.stamp
        if advance.end:
            return Write(key, None, expect)
        version = 1 if advance.start else sequence.state.version + 1
        return Write(key, encode_state(version, new_tag(), state), expect, self.ttl_s)

    def _write_failure(self, sequence: LiveSequence, result: WriteResult) -> ServiceError:
        if isinstance(result, Exception):
            self.events["unavailable"] += 1
            if isinstance(result, ServiceError):
                return result
            return StoreUnavailable(f"state store {self.store.name}: {result}")
        self.events["aborted"] += 1
        return Aborted(
            f"sequence {sequence.id!r} of model {self._label} was advanced or ended by another "
            f"replica while this request ran; it was not applied (the next request continues "
            f"from the stored state)"
        )

    # ------------------------------------------------------------------ handing over
    def mark_moving(self, sequences: Sequence[LiveSequence], ttl_s: float) -> int:
        """Mark where the states of `sequences` will be written, before refusing their requests.

        A request refused here and sent to another replica before `write_all` is done then finds
        the mark, and is told to retry (UNAVAILABLE), not that the sequence is unknown.
        """
        if not self.store.shared or self.durability is not Durability.END:
            return 0
        held = [s for s in sequences if s.state.held]
        for first in range(0, len(held), _WRITE_CHUNK):
            chunk = held[first : first + _WRITE_CHUNK]
            self.store.write([Write(self.key(s), MOVING, ttl_s=ttl_s) for s in chunk])
        return len(held)

    def write_all(self, sequences: Sequence[LiveSequence]) -> int:
        """Write every held state (graceful shutdown at durability `end`); how many were."""
        if not self.store.shared or self.durability is not Durability.END:
            return 0
        held = [s for s in sequences if s.state.held]
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
            failed = [r for r in self.store.write(writes) if r is not True]
            self.events["written"] += len(writes) - len(failed)
            if failed:
                raise StoreUnavailable(
                    f"{len(failed)} states of model {self._label} were not written to "
                    f"{self.store.name}: {failed[0]}"
                )
        return len(held)


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(str(list(s)) for s in shapes)
