"""A preallocated block of state rows, one slot per live sequence.

A batch of sequences is then one gather (`take`) and one scatter (`put`) per state tensor, with
no Python loop over sessions. Rows are allocated with np.zeros, so memory is committed only as
slots are first used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StateArena:
    """The states of one model version's live sequences: per state, one float32 array
    [capacity, *shape] ([capacity, layers*directions, H] for an RNN), a row (slot) per sequence.

    The sequence manager allocates and releases slots on the event loop; the batch worker takes
    and puts rows. Raises ValueError for a capacity below 1.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.tensors = [np.zeros((capacity, *shape), dtype=np.float32) for shape in shapes]
        # Hand out low slots first, so memory in use stays compact.
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def used(self) -> int:
        """Slots in use."""
        return self.capacity - len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of state one slot holds, every state together."""
        return sum(t[0].nbytes for t in self.tensors)

    def allocate(self) -> int | None:
        """A free slot, or None when the arena is full."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        """Free `slot`; its rows keep their values until the next sequence overwrites them."""
        self._free.append(slot)

    def take(self, slots: np.ndarray) -> list[np.ndarray]:
        """The rows of `slots` (an index array [B]): per state, a copy [B, *shape]."""
        return [t[slots] for t in self.tensors]

    def put(self, slots: np.ndarray, values: Sequence[np.ndarray]) -> None:
        """Write `values` (per state, [B, *shape]) into the rows of `slots` (an index array [B])."""
        for tensor, value in zip(self.tensors, values, strict=True):
            tensor[slots] = value
