"""An inference request and its outcome as the engine sees them: arrays, not protobuf.

Both are immutable values: a request goes down once, its outcome (an `InferenceResult` or a
`ServiceError`) comes back up once. The two made for every request are NamedTuples rather than
frozen dataclasses: a frozen dataclass sets each field through `object.__setattr__`, about 1 us
more per object on the event loop, which the A/B in docs/performance.md measured as 4% of the
steps per second at 64 sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rnnserve.errors import ServiceError
from rnnserve.sessions.sequence import SequenceId


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """Triton's sequence extension: which sequence, and whether this request begins or ends it.

    Request parameters `sequence_id`, `sequence_start` and `sequence_end` (Triton's sequence
    extension); `sequence_version` is rnnserve's own.
    """

    id: SequenceId | None = None
    start: bool = False
    end: bool = False
    expect_version: int | None = None
    """Apply the request only if the sequence is at this version (ABORTED otherwise)."""


NO_SEQUENCE = SequenceControl()


class InferenceRequest(NamedTuple):
    """One request: tensors by input name, each [B, T, ...] (batch rows, time steps, features)."""

    model: str
    inputs: Mapping[str, np.ndarray]
    version: str = ""
    """Empty: the latest ready version (or, for a live sequence, the one it started on)."""
    outputs: tuple[str, ...] = ()
    """Requested outputs; empty means every output of the model."""
    sequence: SequenceControl = NO_SEQUENCE
    id: str = ""
    """The client's request id, echoed in the response."""
    principal: str = ""
    """Who sent it, as authentication established ("" without authentication): its
    sequences are its own."""
    received: float = 0.0
    """When the transport received it, in `time.perf_counter()` seconds (0: when the engine
    first saw it): queueing counts from here, the native transport's queue included."""


class InferenceResult(NamedTuple):
    """What a request produced: output tensors by name, each [B, T, ...]."""

    model: str
    version: int
    outputs: Mapping[str, np.ndarray]
    queue_s: float = 0.0
    """Seconds the request waited for its batch."""
    compute_s: float = 0.0
    """Seconds its batch took: state gather, store round trips, model call and scatter."""
    sequence_version: int | None = None
    """For a request in a sequence: how many requests its state has advanced through."""


Outcome = InferenceResult | ServiceError
OnOutcome = Callable[[Outcome], None]
"""Called once, on the event loop, with a submitted request's outcome."""
