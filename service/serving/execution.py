"""Running one batch of work: state gather, store prepare, model call, store commit, scatter.

`BatchExecution` is what the batcher is given as its `execute`: it runs on the batch worker
thread (or inline on the event loop for a lone sequence) and returns one outcome per item, a
`Ran` or a `ServiceError`. A request that fails in the store round trips fails alone, and so
does one whose values the model call fails on (the batch is run again request by request to
find it: a failed call applies nothing); the rest of the batch runs. With a state store, the
worker brings the batch's slots up to date before the model call and stores the new states
after it (`rnnserve.sessions.sync`), before the arena is updated and before any response is
released.

NaN and infinity: a float input holding one is refused (unless the model's config allows
them), found by one vectorized pass over each input of the whole batch rather than one per
request; and a new state holding one is never kept, whatever the inputs (a model can overflow
on finite ones): its request fails alone and its sequence stays where it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rnnserve.errors import InternalError, InvalidArgument, ServiceError
from rnnserve.repository.signature import StateSpec
from rnnserve.runtime.base import InvalidInput, Runtime
from rnnserve.serving.request import OnOutcome
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.sequence import LiveSequence
from rnnserve.sessions.sync import Advance, StateSync

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


class Work(NamedTuple):
    """One checked request's work: `rows` batch rows of `time_steps` time steps.

    Made by the served model, scheduled by the batcher, run by `BatchExecution`; never
    changed on the way (immutable; a NamedTuple for speed, see `rnnserve.serving.request`).
    Inputs are [rows, time_steps, ...] (token ids: [rows, time_steps]).
    """

    inputs: Mapping[str, np.ndarray]
    rows: int
    time_steps: int
    outputs: tuple[str, ...]
    """The output names to return."""
    on_outcome: OnOutcome
    """Whom the outcome goes to, once the work ran (see `ServedModel.submit`)."""
    received: float
    """`time.perf_counter()` when the request was submitted, in seconds."""
    sequence: LiveSequence | None = None
    """Server-held state: read from and written back to this sequence's arena slot."""
    start: bool = False
    """Begin from the zero state instead of the slot's contents."""
    end: bool = False
    """The sequence's last request: its stored state is deleted."""
    expect: int | None = None
    """Run only if the sequence is at this version (the request's sequence_version)."""
    states: tuple[np.ndarray, ...] | None = None
    """Client-held state (explicit-state mode), one array per state, [rows, ...]."""


class Ran(NamedTuple):
    """The outcome of work that ran: its outputs, and its sequence's version after it."""

    outputs: Outputs
    sequence_version: int | None = None


Result = Ran | ServiceError


class Executed(NamedTuple):
    """What executing one work item gave: its result, and for a sequence's item whether the
    slot held the sequence's state after it (its standing, read by the execution that wrote
    it; None for work of no sequence). The event loop learns the standing only from this."""

    result: Result
    held: bool | None


@dataclass(frozen=True)
class BatchExecution:
    """Runs batches of one model version: `self(batch)` -> one `Ran` or ServiceError per item.

    `arena` and `sync` are the model's sequence support (None for a whole-sequence model).
    Raises whatever the runtime raises for a failed model call (the batcher then fails the
    whole batch).
    """

    runtime: Runtime
    states: tuple[StateSpec, ...]
    arena: StateArena | None = None
    sync: StateSync | None = None
    model: str = ""
    """The model's name, for error messages."""
    finite_inputs: tuple[str, ...] = ()
    """Inputs that may hold no NaN and no infinity: the float ones, unless the config allows
    them (parameter allow_non_finite_inputs)."""
    lone: Callable[[], bool] | None = None
    """Whether this model's one live sequence is the server's only one: its one-item batches
    are then run as calls nothing else waits for (`Runtime.run`'s `alone`)."""

    def __call__(self, batch: Sequence[Work]) -> list[Executed]:
        """On the worker thread (or inline on the event loop): prepare, then run the items
        that may run; one `Executed` each."""
        advances = {
            k: Advance(work.sequence, work.start, work.end, work.expect)
            for k, work in enumerate(batch)
            if work.sequence is not None
        }
        answers: list[Result | None] = [None] * len(batch)
        if self.sync is not None and advances:
            keys = list(advances)
            for j, error in self.sync.prepare(list(advances.values())).items():
                answers[keys[j]] = error
                del advances[keys[j]]
        runnable = [(k, w) for k, w in enumerate(batch) if answers[k] is None]
        try:
            if runnable:
                self._run(runnable, advances, answers)
        except Exception as failure:  # noqa: BLE001 - charged to its culprits only, below
            if len(runnable) == 1:
                answers[runnable[0][0]] = _answer_to(failure)
            else:
                # Nothing was applied: find the culprits by running each request alone, so a
                # client's bad input fails its own request and no batch-mate's.
                for item in runnable:
                    try:
                        self._run([item], advances, answers)
                    except Exception as alone:  # noqa: BLE001 - this request's own failure
                        answers[item[0]] = _answer_to(alone)
        return [
            Executed(
                a if a is not None else Ran({}),
                w.sequence.state.held if w.sequence is not None else None,
            )
            for a, w in zip(answers, batch, strict=True)
        ]

    def _run(
        self,
        items: list[tuple[int, Work]],
        advances: dict[int, Advance],
        answers: list[Result | None],
    ) -> None:
        """Stack, gather, run, commit, scatter, split; answers[k] for each item k."""
        if len(items) == 1:
            feeds = dict(items[0][1].inputs)
        else:
            feeds = {n: np.concatenate([w.inputs[n] for _, w in items]) for n in items[0][1].inputs}
        offsets = [0]
        for _, work in items:
            offsets.append(offsets[-1] + work.rows)
        if self.finite_inputs and self._refuse_non_finite_inputs(items, feeds, offsets, answers):
            rest = [item for item in items if answers[item[0]] is None]
            if rest:
                self._run(rest, advances, answers)
            return
        held = [(k, offsets[i]) for i, (k, _) in enumerate(items) if k in advances]
        # The usual batch: one row per held sequence, nothing else. Its rows are then the
        # gathered slots in order, and the new states need no picking out.
        every_row_held = len(held) == offsets[-1]
        row_index = np.asarray([row for _, row in held], dtype=np.intp)
        slot_index = np.asarray([advances[k].sequence.slot for k, _ in held], dtype=np.intp)
        zero_rows = [row for k, row in held if advances[k].start]
        if self.states:
            feeds.update(
                self._stack_states(
                    [w for _, w in items], offsets, row_index, slot_index, zero_rows, every_row_held
                )
            )
        alone = len(items) == 1 and self.lone is not None and self.lone()
        results = self.runtime.run(feeds, offsets[-1] * items[0][1].time_steps, alone)
        if held:
            states = [
                results[s.output_name] if every_row_held else results[s.output_name][row_index]
                for s in self.states
            ]
            self._keep_states(held, advances, states, slot_index, answers)
        for (k, work), row in zip(items, offsets, strict=False):
            if answers[k] is not None:
                continue
            version = work.sequence.state.version if work.sequence is not None else None
            answers[k] = Ran({n: results[n][row : row + work.rows] for n in work.outputs}, version)

    def _keep_states(
        self,
        held: list[tuple[int, int]],
        advances: dict[int, Advance],
        states: list[np.ndarray],
        slot_index: np.ndarray,
        answers: list[Result | None],
    ) -> None:
        """Store the new states (where durability asks), then scatter those that were kept."""
        refused = self._non_finite_states(held, advances, states)
        if refused:
            kept = np.ones(len(held), dtype=bool)
            for j, error in refused.items():
                answers[held[j][0]] = error
                kept[j] = False
            held = [h for h, keep in zip(held, kept, strict=True) if keep]
            if not held:
                return
            states = [s[kept] for s in states]
            slot_index = slot_index[kept]
        errors: dict[int, ServiceError] = {}
        if self.sync is not None:
            errors = self.sync.commit([advances[k] for k, _ in held], states)
            for j, error in errors.items():
                answers[held[j][0]] = error
        if self.arena is None:
            return
        if not errors:
            self.arena.put(slot_index, states)
        elif len(errors) < len(held):
            kept = np.ones(len(held), dtype=bool)
            kept[list(errors)] = False
            self.arena.put(slot_index[kept], [s[kept] for s in states])

    def _refuse_non_finite_inputs(
        self,
        items: list[tuple[int, Work]],
        feeds: Mapping[str, np.ndarray],
        offsets: list[int],
        answers: list[Result | None],
    ) -> bool:
        """Answer the items whose checked inputs hold NaN or infinity; whether any did.

        One pass over each input of the whole batch; only when it finds something is it
        reduced per row to name the culprits.
        """
        refused = False
        for name in self.finite_inputs:
            rows = non_finite_rows(feeds[name])
            if not rows:
                continue
            culprits = np.unique(np.searchsorted(offsets, rows, side="right") - 1).tolist()
            for i in culprits:
                k = items[i][0]
                if answers[k] is None:
                    answers[k] = non_finite_error(
                        f"input {name} of model {self.model}", may_opt_in=True
                    )
                    refused = True
        return refused

    def _non_finite_states(
        self, held: list[tuple[int, int]], advances: dict[int, Advance], states: list[np.ndarray]
    ) -> dict[int, ServiceError]:
        """The held rows whose new states hold NaN or infinity, by position in `held`.

        An END's state is not kept, so it is not checked: its request is answered as it ran.
        """
        refused: dict[int, ServiceError] = {}
        for spec, array in zip(self.states, states, strict=True):
            for j in non_finite_rows(array):
                advance = advances[held[j][0]]
                if not advance.end and j not in refused:
                    refused[j] = _state_not_finite(self.model, spec.output_name, advance)
        return refused

    def _stack_states(
        self,
        batch: Sequence[Work],
        offsets: list[int],
        row_index: np.ndarray,
        slot_index: np.ndarray,
        zero_rows: list[int],
        every_row_held: bool,
    ) -> dict[str, np.ndarray]:
        """The batch's input states: gathered from the arena, zeros, or the client's own."""
        gathered = (
            self.arena.take(slot_index) if self.arena is not None and len(slot_index) else None
        )
        stacked: dict[str, np.ndarray] = {}
        for k, state in enumerate(self.states):
            if gathered is not None and every_row_held:
                rows = gathered[k]  # a fresh array: `take` copies out of the arena
            else:
                rows = np.empty((offsets[-1], *state.dims), dtype=np.float32)
                if gathered is not None:
                    rows[row_index] = gathered[k]
            if zero_rows:
                rows[zero_rows] = 0.0
            for work, row in zip(batch, offsets, strict=False):
                if work.states is not None:
                    rows[row : row + work.rows] = work.states[k]
            stacked[state.input_name] = rows
        return stacked


def all_finite(array: np.ndarray) -> bool:
    """Whether `array` holds no NaN and no infinity."""
    if array.size == 1:  # a stream's usual step: a Python check is cheapest
        return math.isfinite(array.item())
    return bool(np.isfinite(array).all())


def non_finite_rows(array: np.ndarray) -> Sequence[int]:
    """The rows (first axis) of `array` holding NaN or infinity; none in the usual case, found
    by one pass over the whole array (`all_finite`), reduced per row only then."""
    if all_finite(array):
        return ()
    return np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1)).tolist()


def non_finite_error(what: str, may_opt_in: bool = False) -> InvalidArgument:
    """The error for a NaN or an infinity sent in `what`: a recurrent state would carry it into
    every later step of the sequence, which could then only be started again. `may_opt_in`:
    `what` is an input, where the model's config may allow them."""
    remedy = (
        ' (a model whose config sets parameter allow_non_finite_inputs to "true" takes them)'
        if may_opt_in
        else ""
    )
    return InvalidArgument(
        f"{what} holds NaN or infinity; a recurrent state would carry it into every later "
        f"step of the sequence{remedy}"
    )


def _state_not_finite(model: str, state: str, advance: Advance) -> InvalidArgument:
    sequence = advance.sequence
    if advance.start and not sequence.state.held:
        kept = "the sequence was not started"
    else:
        kept = f"its state was not advanced (it stays at version {sequence.state.version})"
    return InvalidArgument(
        f"model {model} produced NaN or infinity in state {state} for sequence {sequence.id!r} "
        f"on this request; {kept}; check the request's inputs"
    )


def _answer_to(failure: Exception) -> ServiceError:
    """The error that answers a request whose model call failed on its own."""
    if isinstance(failure, ServiceError):
        return failure
    if isinstance(failure, InvalidInput):
        return InvalidArgument(f"the model cannot run on this request's inputs: {failure}")
    logger.error("a model call failed", exc_info=failure)
    return InternalError()
