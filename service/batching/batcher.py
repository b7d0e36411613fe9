"""When, and with whom, a unit of work runs: scheduling only.

The batcher knows nothing of models, states or stores. It is given `execute`, which runs one
batch of work items and returns one outcome per item, and `complete`, which it calls on the
event loop with the batch, the outcomes and their timings. Everything else is its own:

- Which items form a batch: items with the same number of time steps T (their inputs stack
  into [B, T, ...]), at most `max_batch_size` rows, and at most one item of any sequence, so
  the items of one sequence run strictly in the order they were submitted.
- When a batch runs: the items submitted in one event-loop turn are handed to the worker thread
  together, once the turn is over (or after `max_queue_delay_s`, when items may wait for
  company). One batch runs at a time. A worker that finishes a batch takes the next from the
  items handed over meanwhile, without waiting for the event loop, which completes the finished
  batch in parallel: `complete` is called once per batch, with no future or task per item.
- The inline rule: an item that `may_run_inline` accepts, submitted while the batcher is idle,
  runs on the event loop right after the callback that submitted it (never inside `submit`:
  no caller hears its outcome from inside its own submission), through the `Turn` the
  batchers share. Handing a batch to the worker thread and back costs two thread wake-ups,
  about as much as a tiny model call (docs/performance.md measures it), and a lone sequence
  would pay them on every request.
- Cancellation: an item cancelled before a worker takes it never runs; it is completed with
  `Cancelled` as its outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from rnnserve.threads import BATCH_THREAD, name_this_thread

logger = logging.getLogger(__name__)


class Schedulable(Protocol):
    """What the batcher reads of a work item."""

    @property
    def rows(self) -> int:
        """Batch rows the item adds (B of its [B, T, ...] inputs)."""
        ...

    @property
    def time_steps(self) -> int:
        """T of its [B, T, ...] inputs: only items with the same T share a batch."""
        ...

    @property
    def sequence(self) -> object | None:
        """The sequence it advances (at most one item of a sequence per batch), or None."""
        ...


class Turn:
    """Callbacks that run once the event-loop callback that queued them is over.

    The callback may run them itself when it is done submitting (`run`): a transport that
    takes what arrived, submits it, runs the inline item and hands back the answers in one
    wake-up saves two turns of the event loop per lone request (each an epoll_wait and a
    handle). Otherwise they run on the loop's next turn, as `call_soon` would run them. One
    instance is shared by every batcher of a server; event loop only.
    """

    __slots__ = ("_callbacks", "_handle")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._handle: asyncio.Handle | None = None

    def soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` when this callback is over (never inside this call)."""
        self._callbacks.append(callback)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        """Run what was queued, and what that queues, now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._callbacks:
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one callback's failure must not drop the others
                    logger.exception("a deferred batcher callback failed")


class Cancelled(Exception):
    """The outcome of an item cancelled before it ran: it never will."""


W = TypeVar("W", bound=Schedulable)
R = TypeVar("R")
T = TypeVar("T")

Execute = Callable[[Sequence[W]], Sequence[R]]
"""Runs one batch (on the worker thread, or inline on the event loop); one outcome per item.
An exception it raises becomes the outcome of every item of the batch."""
Complete = Callable[[Sequence[W], Sequence[R | Exception], Sequence[float], float], None]
"""Called on the event loop once per batch that ran or was dropped, as
`complete(batch, outcomes, queue_s, compute_s)`: `outcomes[k]` and `queue_s[k]` (seconds it
waited for its batch) are those of `batch[k]`; `compute_s` is the seconds `execute` took."""


class Ticket(Generic[W]):
    """One submitted item, as the batcher keeps it until it completes."""

    __slots__ = ("item", "submitted", "cancelled")

    def __init__(self, item: W) -> None:
        self.item = item
        self.submitted = time.perf_counter()
        """`time.perf_counter()` at submission, in seconds."""
        self.cancelled = False

    def cancel(self) -> None:
        """Run the item only if a worker has already taken it; otherwise it never runs."""
        self.cancelled = True


class SequenceBatcher(Generic[W, R]):
    """Schedules the work items of one model version into batches (see the module docstring).

    `submit`, `start` and `stop` are called on the event loop; `execute` runs on the worker
    thread, or on the event loop for an inline item.
    """

    def __init__(
        self,
        name: str,
        execute: Execute[W, R],
        complete: Complete[W, R],
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        may_run_inline: Callable[[W], bool] | None = None,
        turn: Turn | None = None,
    ) -> None:
        self.name = name
        self.turn = turn if turn is not None else Turn()
        """Where inline items wait for the end of the callback that submitted them."""
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._execute = execute
        self._complete = complete
        self._may_run_inline = may_run_inline
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"batch-{name}",
            initializer=name_this_thread,
            initargs=(BATCH_THREAD,),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker_jobs = 0
        self._running_inline = False
        # Event loop only: items submitted since the last hand-off, and items not yet completed.
        self._pending: list[Ticket[W]] = []
        self._pending_rows = 0
        self._hand_off_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._unanswered = 0
        # Shared with the worker thread, under the lock.
        self._lock = threading.Lock()
        self._ready: deque[Ticket[W]] = deque()
        self._working = False
        self._stopped = False

    @property
    def busy(self) -> bool:
        """Items are waiting or a batch is running."""
        return self._unanswered > 0 or self._running_inline

    def start(self) -> None:
        """Bind the batcher to the running event loop."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Run what is waiting, then stop the worker thread."""
        while self.busy or self._worker_jobs:  # never block the loop in shutdown() below
            await asyncio.sleep(0.001)
        self._stopped = True
        self._executor.shutdown(wait=True)

    async def on_worker(self, function: Callable[[], T]) -> T:
        """Run `function` on the worker thread, between two batches; its result."""
        self._worker_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function)
        finally:
            self._worker_jobs -= 1

    def submit(self, item: W) -> Ticket[W]:
        """Queue `item`; `complete` hears of it once it ran, failed or was cancelled, never
        inside this call.

        Synchronous on purpose: the items of one sequence are queued in the order they are
        submitted, whatever callers await in between. Raises RuntimeError after `stop`.
        """
        if self._stopped:
            raise RuntimeError(f"the batcher of model {self.name} is stopped")
        ticket = Ticket(item)
        idle = self._unanswered == 0 and not self._running_inline and self._worker_jobs == 0
        if idle and self._may_run_inline is not None and self._may_run_inline(item):
            # Items submitted meanwhile find the batcher busy, and queue behind this one.
            self._running_inline = True
            self._unanswered += 1
            assert self._loop is not None, "start() the batcher on the event loop first"
            self.turn.soon(functools.partial(self._run_inline, ticket))
            return ticket
        self._unanswered += 1
        self._pending.append(ticket)
        self._pending_rows += item.rows
        self._schedule_hand_off()
        return ticket

    def _schedule_hand_off(self) -> None:
        loop, handle = self._loop, self._hand_off_handle
        assert loop is not None, "start() the batcher on the event loop first"
        full = self._pending_rows >= self.max_batch_size
        if handle is None and self.max_queue_delay_s > 0 and not full:
            self._hand_off_handle = loop.call_later(self.max_queue_delay_s, self._hand_off)
        elif handle is None or (full and isinstance(handle, asyncio.TimerHandle)):
            if handle is not None:
                handle.cancel()
            # Once this loop turn is over: every request read in it joins the batch.
            self._hand_off_handle = loop.call_soon(self._hand_off)

    def _hand_off(self) -> None:
        """Hand this turn's items to the worker; start it if it is idle.

        A busy worker takes them when its batch is done, without waiting for the event loop,
        so it runs the next batch while the loop completes the last one.
        """
        self._hand_off_handle = None
        with self._lock:
            self._ready.extend(self._pending)
            start = not self._working
            self._working = True
        self._pending = []
        self._pending_rows = 0
        if start:
            self._executor.submit(self._work, asyncio.get_running_loop())

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: run the next ready batch, then go on while items are ready.

        Each batch is its own executor job, so a job from `on_worker` queued meanwhile runs
        between two batches rather than after the load stops.
        """
        try:
            with self._lock:
                batch, dropped = self._take()
            if dropped:
                nothing = [0.0] * len(dropped)
                loop.call_soon_threadsafe(
                    self._finish, dropped, [Cancelled()] * len(dropped), nothing, 0.0
                )
            if batch:
                started = time.perf_counter()
                queue_s = [started - ticket.submitted for ticket in batch]
                outcomes = self._run(batch)
                compute_s = time.perf_counter() - started
                loop.call_soon_threadsafe(self._finish, batch, outcomes, queue_s, compute_s)
        except Exception:  # a closed event loop, or a bug: never leave `_working` stuck
            logger.exception("the batch worker of model %s failed", self.name)
        finally:
            with self._lock:
                self._working = bool(self._ready)
                again = self._working
            if again:
                self._executor.submit(self._work, loop)

    def _run(self, batch: Sequence[Ticket[W]]) -> Sequence[R | Exception]:
        """`execute` on the batch; its failure becomes every item's outcome."""
        try:
            outcomes: Sequence[R | Exception] = self._execute([t.item for t in batch])
        except Exception as failure:  # every waiting request must hear of it
            logger.error("batch of %d on model %s failed", len(batch), self.name, exc_info=failure)
            return [failure] * len(batch)
        if len(outcomes) != len(batch):
            mismatch = RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
            logger.error("batch on model %s: %s", self.name, mismatch)
            return [mismatch] * len(batch)
        return outcomes

    def _finish(
        self,
        batch: Sequence[Ticket[W]],
        outcomes: Sequence[R | Exception],
        queue_s: Sequence[float],
        compute_s: float,
    ) -> None:
        """On the event loop: complete a batch that ran (on the worker or inline) or was
        dropped."""
        self._unanswered -= len(batch)
        try:
            self._complete([t.item for t in batch], outcomes, queue_s, compute_s)
        except Exception:  # one caller's failure must not stop the batcher
            logger.exception("completing a batch of model %s failed", self.name)

    def _run_inline(self, ticket: Ticket[W]) -> None:
        """On the event loop: run an inline item (unless cancelled meanwhile) and complete it."""
        try:
            started = time.perf_counter()
            outcomes: Sequence[R | Exception] = (
                [Cancelled()] if ticket.cancelled else self._run([ticket])
            )
            compute_s = time.perf_counter() - started
        finally:
            self._running_inline = False
        self._finish([ticket], outcomes, [started - ticket.submitted], compute_s)

    def _take(self) -> tuple[list[Ticket[W]], list[Ticket[W]]]:
        """The next batch from the ready items (under the lock), and the cancelled ones."""
        batch: list[Ticket[W]] = []
        deferred: list[Ticket[W]] = []
        dropped: list[Ticket[W]] = []
        seen: set[int] = set()
        rows = 0
        time_steps = None
        ready = self._ready
        while ready and rows < self.max_batch_size:
            ticket = ready.popleft()
            if ticket.cancelled:
                dropped.append(ticket)  # the client gave up before it ran: it never will
                continue
            item = ticket.item
            key = id(item.sequence) if item.sequence is not None else None
            # An item wider than a batch runs alone rather than never (callers should not
            # submit one, but a stuck worker would spin and hold the GIL).
            fits = not batch or (
                item.time_steps == time_steps and rows + item.rows <= self.max_batch_size
            )
            if key in seen or not fits:
                deferred.append(ticket)
            else:
                batch.append(ticket)
                rows += item.rows
                time_steps = item.time_steps
            if key is not None:
                seen.add(key)
        ready.extendleft(reversed(deferred))
        return batch, dropped
