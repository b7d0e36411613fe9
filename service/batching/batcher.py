"""Gather steps that arrive close together into one ONNX Runtime call.

Steps wait at most `max_queue_delay_s` for company. A batch holds steps with the same number of
time steps T (their inputs stack into [B, T, ...]) and at most one step of any sequence, so the
steps of one sequence run strictly in the order they were submitted. States are gathered from
the arena, stacked on the batch axis, and the new states scattered back in one operation each.
One batch per model runs at a time, on a worker thread. When it is done, each step's `on_done`
is called on the event loop, in one pass over the batch: no future or task per step.

The exception is a lone sequence's tiny batch (`inline_max_steps` rows x time steps, by
default one step): it runs on the event loop itself. Handing a batch to the worker thread and
back takes two thread wake-ups, which cost about as much as such a model call (on the 2-core VM
the benchmark runs on, about 150 us of CPU against 200 us for a step of the bundled LSTM), and
a lone sequence would pay them on every request. Never when other sequences are live (the steps
that arrive while a batch runs on the worker make the next batch), with a shared state store
(its round trips must not block the loop), or while the worker thread runs a job on the arena.

With a state store, the worker also brings the batch's slots up to date before the model call
and stores the new states after it (`service.sessions.sync`), before the arena is updated and
before any response is released. A step that fails there fails alone; the rest of the batch
runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service.errors import ServiceError
from service.repository.signature import StateSpec
from service.runtime.base import Runtime
from service.sessions.arena import StateArena
from service.sessions.manager import Sequence as LiveSequence
from service.sessions.sync import Advance, StateSync

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Step:
    """One request's worth of work: `rows` batch rows of `steps` time steps."""

    inputs: dict[str, np.ndarray]
    rows: int
    steps: int
    outputs: tuple[str, ...]
    sequence: LiveSequence | None = None
    """Server-held state: read from and written back to this sequence's arena slot."""
    start: bool = False
    """Begin from the zero state instead of the slot's contents."""
    end: bool = False
    """The sequence's last step: its stored state is deleted."""
    expect: int | None = None
    """Run only if the sequence is at this version (the request's sequence_version)."""
    version: int = 0
    """Set by the worker: the sequence's version after this step."""
    states: Sequence[np.ndarray] | None = None
    """Client-held state (explicit-state mode), one array per state, [rows, ...]."""
    on_done: Callable[[Step], None] | None = None
    """Called on the event loop once the step ran (`result` set) or failed (`error` set)."""
    result: Outputs | None = None
    error: BaseException | None = None
    abandoned: bool = False
    """The caller stopped waiting: a step that has not run yet never will."""
    enqueued: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    compute_s: float = 0.0


BatchObserver = Callable[[Sequence[Step], float], None]


class SequenceBatcher:
    def __init__(
        self,
        name: str,
        runtime: Runtime,
        states: Sequence[StateSpec],
        arena: StateArena | None,
        max_batch_size: int,
        max_queue_delay_s: float,
        observer: BatchObserver | None = None,
        sync: StateSync | None = None,
        inline_max_steps: int = 0,
        lone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.states = tuple(states)
        self.arena = arena
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.observer = observer
        self.sync = sync
        self.inline_max_steps = 0 if sync is not None and sync.store.shared else inline_max_steps
        self._lone = lone
        self._queue: deque[Step] = deque()
        self._worker_jobs = 0
        self._running = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Steps are queued or a batch is running."""
        return bool(self._queue) or self._running

    async def on_worker(self, function: Callable[[], T]) -> T:
        """Run `function` on the worker thread, between batches (it may touch the arena)."""
        self._worker_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function)
        finally:
            self._worker_jobs -= 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{self.name}"
        )

    async def stop(self) -> None:
        """Run what is queued, then stop."""
        while self._queue or self._running:
            await asyncio.sleep(0.001)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def submit(self, step: Step) -> None:
        idle = not self._queue and not self._running and self._worker_jobs == 0
        if idle and self._inline([step]):
            # A lone sequence's step runs as it is submitted: no batcher wake-up, no loop turn.
            self._running = True
            try:
                self._run_batch([step])
            finally:
                self._running = False
            return
        self._queue.append(step)
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._running = True
            try:
                if self._worker_jobs == 0 and self._inline(batch):
                    self._run_batch(batch)
                else:
                    started = time.perf_counter()
                    try:
                        results = await loop.run_in_executor(
                            self._executor, self._execute, self._started(batch, started)
                        )
                    except Exception as error:  # noqa: BLE001 - every request must hear of it
                        self._fail(batch, error)
                    else:
                        self._answer(batch, results, started)
            finally:
                self._running = False

    def _run_batch(self, batch: Sequence[Step]) -> None:
        """Run a batch here, on the event loop, and answer its steps."""
        started = time.perf_counter()
        try:
            results = self._execute(self._started(batch, started))
        except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
            self._fail(batch, error)
        else:
            self._answer(batch, results, started)

    @staticmethod
    def _started(batch: Sequence[Step], started: float) -> Sequence[Step]:
        for step in batch:
            step.queue_s = started - step.enqueued
        return batch

    def _fail(self, batch: Sequence[Step], error: Exception) -> None:
        logger.error("batch of %d on model %s failed", len(batch), self.name, exc_info=error)
        for step in batch:
            step.error = error
        self._complete(batch)

    def _answer(
        self, batch: Sequence[Step], results: Sequence[Outputs | ServiceError], started: float
    ) -> None:
        compute_s = time.perf_counter() - started
        for step, outputs in zip(batch, results, strict=True):
            step.compute_s = compute_s
            if isinstance(outputs, ServiceError):
                step.error = outputs
            else:
                step.result = outputs
        if self.observer is not None:
            self.observer(batch, compute_s)
        self._complete(batch)

    def _inline(self, batch: Sequence[Step]) -> bool:
        # Only for a lone sequence: with company, the steps that arrive while a batch runs on
        # the worker thread make the next batch, and running singles inline would starve that.
        return (
            sum(s.rows for s in batch) * batch[0].steps <= self.inline_max_steps
            and all(s.sequence is not None for s in batch)
            and self._lone()
        )

    def _complete(self, batch: Sequence[Step]) -> None:
        for step in batch:
            if step.on_done is None:
                continue
            try:
                step.on_done(step)
            except Exception:  # noqa: BLE001 - one caller's failure must not stop the batcher
                logger.exception("completing a step of model %s failed", self.name)

    async def _next_batch(self) -> list[Step]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        if sum(s.rows for s in self._queue) < self.max_batch_size:
            # Give concurrent sequences a moment to join; 0 still lets this loop turn finish.
            await asyncio.sleep(self.max_queue_delay_s)
        return self._take()

    def _take(self) -> list[Step]:
        batch: list[Step] = []
        deferred: list[Step] = []
        seen: set[int] = set()
        rows = 0
        steps = None
        while self._queue and rows < self.max_batch_size:
            step = self._queue.popleft()
            if step.abandoned:
                continue  # the client gave up before it ran: its state does not advance
            key = id(step.sequence) if step.sequence is not None else None
            fits = (
                steps is None or step.steps == steps
            ) and rows + step.rows <= self.max_batch_size
            if key in seen or not fits:
                deferred.append(step)
            else:
                batch.append(step)
                rows += step.rows
                steps = step.steps
            if key is not None:
                seen.add(key)
        self._queue.extendleft(reversed(deferred))
        return batch

    def _execute(self, batch: Sequence[Step]) -> list[Outputs | ServiceError]:
        """On the worker thread: prepare, then run the steps that may run; one answer each."""
        advances = {
            k: Advance(step.sequence, step.start, step.end, step.expect)
            for k, step in enumerate(batch)
            if step.sequence is not None
        }
        answers: list[Outputs | ServiceError] = [{} for _ in batch]
        if self.sync is not None and advances:
            keys = list(advances)
            for j, error in self.sync.prepare(list(advances.values())).items():
                answers[keys[j]] = error
                del advances[keys[j]]
        steps = [(k, s) for k, s in enumerate(batch) if not isinstance(answers[k], ServiceError)]
        if steps:
            self._run_steps(steps, advances, answers)
        return answers

    def _run_steps(
        self,
        steps: list[tuple[int, Step]],
        advances: dict[int, Advance],
        answers: list[Outputs | ServiceError],
    ) -> None:
        """Stack, gather, run, commit, scatter, split; answers[k] for each step k."""
        if len(steps) == 1:
            feeds = dict(steps[0][1].inputs)
        else:
            feeds = {n: np.concatenate([s.inputs[n] for _, s in steps]) for n in steps[0][1].inputs}
        offsets = [0]
        for _, step in steps:
            offsets.append(offsets[-1] + step.rows)
        held = [(k, offsets[i]) for i, (k, _) in enumerate(steps) if k in advances]
        # The usual batch: one row per held sequence, nothing else. Its rows are then the
        # gathered slots in order, and the new states need no picking out.
        every_row_held = len(held) == offsets[-1]
        row_index = np.asarray([row for _, row in held], dtype=np.intp)
        slot_index = np.asarray([advances[k].sequence.slot for k, _ in held], dtype=np.intp)
        zero_rows = [row for k, row in held if advances[k].start]
        if self.states:
            feeds.update(
                self._stack_states(
                    [s for _, s in steps], offsets, row_index, slot_index, zero_rows, every_row_held
                )
            )
        results = self.runtime.run(feeds)
        if held:
            states = [
                results[s.output_name] if every_row_held else results[s.output_name][row_index]
                for s in self.states
            ]
            self._keep_states(held, advances, states, slot_index, answers)
        for (k, step), row in zip(steps, offsets, strict=False):
            if isinstance(answers[k], ServiceError):
                continue
            if step.sequence is not None:
                step.version = step.sequence.version
            answers[k] = {name: results[name][row : row + step.rows] for name in step.outputs}

    def _keep_states(
        self,
        held: list[tuple[int, int]],
        advances: dict[int, Advance],
        states: list[np.ndarray],
        slot_index: np.ndarray,
        answers: list[Outputs | ServiceError],
    ) -> None:
        """Store the new states (where durability asks), then scatter those that were kept."""
        errors = {}
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

    def _stack_states(
        self,
        batch: Sequence[Step],
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
            for step, row in zip(batch, offsets, strict=False):
                if step.states is not None:
                    rows[row : row + step.rows] = step.states[k]
            stacked[state.input_name] = rows
        return stacked
