"""Gather steps that arrive close together into one ONNX Runtime call.

Steps wait at most `max_queue_delay_s` for company. A batch holds steps with the same number of
time steps T (their inputs stack into [B, T, ...]) and at most one step of any sequence, so the
steps of one sequence run strictly in the order they were submitted. States are gathered from
the arena, stacked on the batch axis, and the new states scattered back in one operation each.

One batch per model runs at a time, on a worker thread. The steps submitted in one event-loop
turn are handed to it together, once the turn is over. A worker that finishes a batch takes the
next from the steps handed over meanwhile, without waiting for the event loop, which answers
the finished batch in parallel: each step's `on_done` is called there, in one pass over the
batch, with no future or task per step.

The exception is a lone sequence's tiny batch (`inline_max_steps` rows x time steps, by
default one step): it runs on the event loop itself. Handing a batch to the worker thread and
back takes two thread wake-ups, which cost about as much as such a model call (on the 2-core VM
the benchmark runs on, about 150 us of CPU against 200 us for a step of the bundled LSTM), and
a lone sequence would pay them on every request. Never when other sequences are live (the steps
that arrive while a batch runs on the worker make the next batch), with a shared state store
(its round trips must not block the loop), or while the worker thread runs a job on the arena.

With a state store, the worker also brings the batch's slots up to date before the model call
and stores the new states after it (`rnnserve.sessions.sync`), before the arena is updated and
before any response is released. A step that fails there fails alone; the rest of the batch
runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from rnnserve.errors import ServiceError
from rnnserve.repository.signature import StateSpec
from rnnserve.runtime.base import Runtime
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.manager import Sequence as LiveSequence
from rnnserve.sessions.sync import Advance, StateSync
from rnnserve.threads import BATCH_THREAD, name_this_thread

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
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"batch-{name}",
            initializer=name_this_thread,
            initargs=(BATCH_THREAD,),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker_jobs = 0
        self._running_inline = False
        # Event loop only: steps submitted since the last flush, and steps not yet answered.
        self._pending: list[Step] = []
        self._pending_rows = 0
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._unanswered = 0
        # Shared with the worker thread, under the lock.
        self._lock = threading.Lock()
        self._ready: deque[Step] = deque()
        self._draining = False
        self._stopped = False

    @property
    def busy(self) -> bool:
        """Steps are waiting or a batch is running."""
        return self._unanswered > 0 or self._running_inline

    async def on_worker(self, function: Callable[[], T]) -> T:
        """Run `function` on the worker thread, between batches (it may touch the arena)."""
        self._worker_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function)
        finally:
            self._worker_jobs -= 1

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Run what is waiting, then stop."""
        while self.busy:
            await asyncio.sleep(0.001)
        self._stopped = True
        self._executor.shutdown(wait=True)

    def submit(self, step: Step) -> None:
        if self._stopped:
            raise RuntimeError(f"the batcher of model {self.name} is stopped")
        idle = self._unanswered == 0 and not self._running_inline and self._worker_jobs == 0
        if idle and self._inline([step]):
            # A lone sequence's step runs as it is submitted: no thread hand-off, no loop turn.
            self._running_inline = True
            try:
                self._run_batch([step])
            finally:
                self._running_inline = False
            return
        self._unanswered += 1
        self._pending.append(step)
        self._pending_rows += step.rows
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        loop, handle = self._loop, self._flush_handle
        assert loop is not None, "start() the batcher on the event loop first"
        full = self._pending_rows >= self.max_batch_size
        if handle is None and self.max_queue_delay_s > 0 and not full:
            self._flush_handle = loop.call_later(self.max_queue_delay_s, self._flush)
        elif handle is None or (full and isinstance(handle, asyncio.TimerHandle)):
            if handle is not None:
                handle.cancel()
            # Once this loop turn is over: every request read in it joins the batch.
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand this turn's steps to the worker; start it if it is idle.

        A busy worker takes them when its batch is done, without waiting for the event loop,
        so it runs the next batch while the loop answers the last one.
        """
        self._flush_handle = None
        with self._lock:
            self._ready.extend(self._pending)
            start = not self._draining
            self._draining = True
        self._pending = []
        self._pending_rows = 0
        if start:
            self._executor.submit(self._drain, asyncio.get_running_loop())

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: run the next ready batch, then go on while steps are ready.

        Each batch is its own executor job, so a job from `on_worker` queued meanwhile runs
        between two batches rather than after the load stops.
        """
        try:
            with self._lock:
                batch, dropped = self._take()
            if batch or dropped:
                started = time.perf_counter()
                error: Exception | None = None
                results: list[Outputs | ServiceError] = []
                try:
                    if batch:
                        results = self._execute(self._started(batch, started))
                except Exception as failure:  # noqa: BLE001 - every request must hear of it
                    error = failure
                compute_s = time.perf_counter() - started
                loop.call_soon_threadsafe(self._finish, batch, dropped, results, error, compute_s)
        except Exception:  # a closed event loop, or a bug: never leave `_draining` stuck
            logger.exception("the batch worker of model %s failed", self.name)
        finally:
            with self._lock:
                self._draining = bool(self._ready)
                again = self._draining
            if again:
                self._executor.submit(self._drain, loop)

    def _finish(
        self,
        batch: Sequence[Step],
        dropped: int,
        results: Sequence[Outputs | ServiceError],
        error: Exception | None,
        compute_s: float,
    ) -> None:
        """On the event loop: answer a batch the worker ran."""
        self._unanswered -= len(batch) + dropped
        if error is not None:
            self._fail(batch, error)
        elif batch:
            self._answer(batch, results, compute_s)

    def _run_batch(self, batch: Sequence[Step]) -> None:
        """Run a batch here, on the event loop, and answer its steps."""
        started = time.perf_counter()
        try:
            results = self._execute(self._started(batch, started))
        except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
            self._fail(batch, error)
        else:
            self._answer(batch, results, time.perf_counter() - started)

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
        self, batch: Sequence[Step], results: Sequence[Outputs | ServiceError], compute_s: float
    ) -> None:
        for step, outputs in zip(batch, results, strict=True):
            step.compute_s = compute_s
            if isinstance(outputs, ServiceError):
                step.error = outputs
            else:
                step.result = outputs
        if self.observer is not None:
            try:
                self.observer(batch, compute_s)
            except Exception:  # noqa: BLE001 - metrics must not keep answers back
                logger.exception("observing a batch of model %s failed", self.name)
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

    def _take(self) -> tuple[list[Step], int]:
        """The next batch from the ready steps (under the lock), and how many were dropped."""
        batch: list[Step] = []
        deferred: list[Step] = []
        seen: set[int] = set()
        rows = dropped = 0
        steps = None
        ready = self._ready
        while ready and rows < self.max_batch_size:
            step = ready.popleft()
            if step.abandoned:
                dropped += 1  # the client gave up before it ran: its state does not advance
                continue
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
        ready.extendleft(reversed(deferred))
        return batch, dropped

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
        results = self.runtime.run(feeds, offsets[-1] * steps[0][1].steps)
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
