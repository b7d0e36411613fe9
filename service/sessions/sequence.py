"""A live sequence: one stream of requests whose recurrent state the server holds.

`SequenceId` is Triton's correlation id: a non-zero unsigned integer or a non-empty string
(Triton's sequence extension, `sequence_id`). An integer and a string are different sequences.
A sequence belongs to the principal that started it: another principal naming the same id
names a different sequence (`SequenceKey`), and so never reaches its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SequenceId = int | str
SequenceKey = int | str | tuple[str, int | str]
"""How a replica tells its live sequences apart: the id alone for the principal "" (no
authentication), else (owner, id), so that one principal's id never finds another's sequence."""


def sequence_key(owner: str, sequence_id: SequenceId) -> SequenceKey:
    """The key of `owner`'s sequence `sequence_id` (see `SequenceKey`)."""
    return (owner, sequence_id) if owner else sequence_id


@dataclass(eq=False, slots=True)
class StateStanding:
    """Where a live sequence's state stands: written and read only by the execution of its
    requests (`StateSync`, in `BatchExecution`), on the batch worker thread or inline on the
    event loop, one request at a time: a sequence is in at most one batch at a time, and its
    batches run one after the other. The event loop hears of it only through each request's
    outcome."""

    held: bool = False
    """The slot holds the sequence's state (set once its first step or its load succeeded)."""
    version: int = 0
    """Requests the state has advanced through (the store record's version counter)."""
    stamp: bytes = b""
    """Stamp of the store record the slot matches; empty when none was written or read."""


@dataclass(eq=False, slots=True)
class LiveSequence:
    """A sequence this replica holds, in three parts with one owner each:

    - who and where (`id`, `owner`, `key`, `slot`): set at creation, never changed;
    - its bookkeeping (`last_used`, `pending`, `has_state`): the sequence manager's, on the
      event loop only;
    - its state's standing (`state`): the execution of its requests' (`StateStanding`).
    """

    id: SequenceId
    slot: int
    """Row of the state arena holding its state."""
    last_used: float
    """`time.monotonic()` of its latest request, for idle eviction (seconds)."""
    owner: str = ""
    """The principal that started it ("" without authentication)."""
    key: SequenceKey = ""
    """Its key among the replica's live sequences: `sequence_key(owner, id)`, set at creation."""
    pending: int = 0
    """Requests submitted and not yet finished."""
    has_state: bool = False
    """Whether its slot held its state after the latest of its requests the event loop heard
    finish (`state.held` then, as the execution reported it)."""
    state: StateStanding = field(default_factory=StateStanding)
    """Its state's standing: the execution's alone."""

    def __post_init__(self) -> None:
        self.key = sequence_key(self.owner, self.id)
