"""What the rest of the server needs from an execution engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as the runtime reports it; its shape leads with the batch axis."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int | str | None, ...]
    """Declared shape; a string or None is a dynamic axis."""


class InvalidInput(ValueError):
    """The model cannot run on the values it was given (an index outside its table, ...); the
    message is the runtime's own, for the client whose input it was."""


class Runtime(Protocol):
    """A loaded model graph. `run` is synchronous and thread-safe; call it off the event loop."""

    provider: str
    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]
    index_bounds: Mapping[str, int]
    """Integer inputs used as indices into a table of the graph (an embedding): the table's
    size, so valid values are 0..size-1. Inputs the runtime cannot bound are absent."""

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        """The named outputs. `work` (rows x time steps), when given, may choose how it runs;
        `alone` says nothing else waits for the CPU meanwhile (a lone sequence's call), so the
        call may take more CPU to end sooner.

        Raises InvalidInput when the values of `feeds` are what the model cannot run on.
        """
        ...
