"""A live sequence: one stream of requests whose recurrent state the server holds.

`SequenceId` is Triton's correlation id: a non-zero unsigned integer or a non-empty string
(Triton's sequence extension, `sequence_id`). An integer and a string are different sequences.
A sequence belongs to the principal that started it: another principal naming the same id
names a different sequence (`SequenceKey`), and so never reaches its state.
"""

from __future__ import annotations

from dataclasses import dataclass

SequenceId = int | str
SequenceKey = int | str | tuple[str, int | str]
"""How a replica tells its live sequences apart: the id alone for the principal "" (no
authentication), else (owner, id), so that one principal's id never finds another's sequence."""


def sequence_key(owner: str, sequence_id: SequenceId) -> SequenceKey:
    """The key of `owner`'s sequence `sequence_id` (see `SequenceKey`)."""
    return (owner, sequence_id) if owner else sequence_id


@dataclass(eq=False, slots=True)
class LiveSequence:
    """A sequence this replica holds: its id, its slot in the state arena and its bookkeeping.

    The sequence manager (event loop) owns `last_used` and `pending`; the batch worker owns
    `held`, `version` and `stamp` (a sequence is in at most one batch at a time).
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
    held: bool = False
    """The slot holds the sequence's state (set once its first step or its load succeeded)."""
    version: int = 0
    """Requests the state has advanced through (the store record's version counter)."""
    stamp: bytes = b""
    """Stamp of the store record the slot matches; empty when none was written or read."""

    def __post_init__(self) -> None:
        self.key = sequence_key(self.owner, self.id)
