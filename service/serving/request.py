"""An inference request as the domain sees it: arrays, not protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SequenceId = int | str


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """Triton's sequence extension: which sequence, and whether this step begins or ends it."""

    id: SequenceId | None = None
    start: bool = False
    end: bool = False
    expect_version: int | None = None
    """Apply the request only if the sequence is at this version (ABORTED otherwise)."""


NO_SEQUENCE = SequenceControl()


@dataclass(slots=True)
class InferenceRequest:
    model: str
    inputs: dict[str, np.ndarray]
    version: str = ""
    """Empty: the latest ready version (or, for a live sequence, the one it started on)."""
    outputs: tuple[str, ...] = ()
    """Requested outputs; empty means every output of the model."""
    sequence: SequenceControl = NO_SEQUENCE
    id: str = ""


@dataclass(slots=True)
class InferenceResult:
    model: str
    version: int
    outputs: dict[str, np.ndarray]
    queue_s: float = 0.0
    compute_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
