"""The sequence batcher's scheduling on its own, with a fake `execute` and no model.

Which items share a batch, when a batch runs and on which thread, what `complete` hears, and
that nothing a caller does (cancel, fail, raise in `complete`) stops the batches after it. The
fake `execute` records each batch it gets and may hold one on the worker thread until the test
releases it, so each test decides what is queued while a batch runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from rnnserve.batching.batcher import Cancelled, SequenceBatcher

NAME = "toy-1"
WAIT_S = 30.0
"""Generous: these waits fail a test only when what they wait for never happens."""


@dataclass(frozen=True, eq=False)
class Stream:
    """A sequence as the batcher sees it: one object per sequence, as a LiveSequence is."""

    name: str


@dataclass(frozen=True)
class Item:
    """A work item: what the batcher reads of one, an id, and whether it may run inline."""

    id: str
    sequence: Stream | None = None
    rows: int = 1
    time_steps: int = 1
    inline: bool = False


class Boom(Exception):
    """What a failing fake raises."""


class FakeExecute:
    """Records each batch (its item ids, thread and start) and answers "ran <id>" per item.

    A batch holding an id in `hold` waits on the worker until `release` is set; a batch holding
    an id in `fail` raises Boom.
    """

    def __init__(self) -> None:
        self.hold: set[str] = set()
        self.fail: set[str] = set()
        self.batches: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.started_at: list[float] = []
        """`time.perf_counter()` as each batch reached the fake."""
        self.timeline: list[object] = []
        """Batches and worker jobs, in the order they ran."""
        self.held = threading.Event()
        self.release = threading.Event()
        self._returned = threading.Condition()
        self._count = 0

    def __call__(self, items: Sequence[Item]) -> list[str]:
        ids = [item.id for item in items]
        self.started_at.append(time.perf_counter())
        self.threads.append(threading.current_thread())
        self.batches.append(ids)
        self.timeline.append(ids)
        try:
            if self.hold.intersection(ids):
                self.held.set()
                assert self.release.wait(WAIT_S), "the test never released the held batch"
            if self.fail.intersection(ids):
                raise Boom(f"batch {ids} failed")
            return [f"ran {i}" for i in ids]
        finally:
            with self._returned:
                self._count += 1
                self._returned.notify_all()

    def wait_returned(self, batches: int) -> bool:
        """Block this thread (the event loop, say) until `batches` batches have returned."""
        with self._returned:
            return self._returned.wait_for(lambda: self._count >= batches, WAIT_S)


@dataclass(frozen=True)
class Completion:
    """One call of `complete`, as the batcher made it."""

    ids: list[str]
    outcomes: list[object]
    queue_s: list[float]
    compute_s: float
    thread: threading.Thread


@dataclass
class Completions:
    """A `complete` that records each call; the first `failures` calls raise after recording."""

    calls: list[Completion] = field(default_factory=list)
    failures: int = 0

    def __call__(
        self,
        batch: Sequence[Item],
        outcomes: Sequence[object],
        queue_s: Sequence[float],
        compute_s: float,
    ) -> None:
        ids = [item.id for item in batch]
        call = Completion(ids, list(outcomes), list(queue_s), compute_s, threading.current_thread())
        self.calls.append(call)
        if len(self.calls) <= self.failures:
            raise Boom("complete failed")

    @property
    def ids(self) -> list[str]:
        """Every completed id, in the order completed (an id twice if completed twice)."""
        return [i for call in self.calls for i in call.ids]

    def outcome(self, item_id: str) -> object:
        (outcome,) = [
            o for c in self.calls for i, o in zip(c.ids, c.outcomes, strict=True) if i == item_id
        ]
        return outcome

    def of(self, item_id: str) -> Completion:
        (call,) = [c for c in self.calls if item_id in c.ids]
        return call

    async def wait(self, *item_ids: str) -> None:
        await until(lambda: set(item_ids) <= set(self.ids))


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, failing the test after WAIT_S rather than hanging it."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited too long"
        await asyncio.sleep(0.001)


@dataclass
class Harness:
    """The fakes, and the batchers made over them (stopped by the fixture, whatever happens)."""

    execute: FakeExecute = field(default_factory=FakeExecute)
    complete: Completions = field(default_factory=Completions)
    gates: list[threading.Event] = field(default_factory=list)
    made: list[SequenceBatcher[Item, str]] = field(default_factory=list)

    def batcher(
        self,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.0,
        inline: bool = False,
    ) -> SequenceBatcher[Item, str]:
        """A started batcher; with `inline`, items whose `inline` is set may run inline."""
        batcher: SequenceBatcher[Item, str] = SequenceBatcher(
            NAME,
            self.execute,
            self.complete,
            max_batch_size,
            max_queue_delay_s,
            may_run_inline=(lambda item: item.inline) if inline else None,
        )
        batcher.start()
        self.made.append(batcher)
        return batcher

    def gate(self) -> threading.Event:
        """An event a worker job waits on; set at teardown if the test did not."""
        event = threading.Event()
        self.gates.append(event)
        return event


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.execute.release.set()
        for gate in harness.gates:
            gate.set()
        for batcher in harness.made:
            await asyncio.wait_for(batcher.stop(), WAIT_S)


async def hold_first(harness: Harness, batcher: SequenceBatcher[Item, str], item: Item) -> None:
    """Submit `item` and return once the worker runs it and is held there."""
    harness.execute.hold.add(item.id)
    batcher.submit(item)
    await until(harness.execute.held.is_set)


def worker_thread(thread: threading.Thread) -> bool:
    return thread.name.startswith(f"batch-{NAME}")


# ---------------------------------------------------------------- who shares a batch


async def test_one_loop_turn_is_one_batch_and_later_turns_form_the_next(harness: Harness) -> None:
    batcher = harness.batcher()
    for name in ("a", "b", "c"):
        batcher.submit(Item(name, Stream(name)))
    await harness.complete.wait("a", "b", "c")
    assert harness.execute.batches == [["a", "b", "c"]]

    await hold_first(harness, batcher, Item("x", Stream("x")))
    batcher.submit(Item("y", Stream("y")))
    await asyncio.sleep(0)  # "y" is handed over while the worker is busy
    batcher.submit(Item("z", Stream("z")))
    await asyncio.sleep(0)  # and "z", a turn later
    harness.execute.release.set()
    await harness.complete.wait("x", "y", "z")
    assert harness.execute.batches[1:] == [["x"], ["y", "z"]]
    # `complete` is called once per batch, in the order they ran.
    assert [call.ids for call in harness.complete.calls] == harness.execute.batches
    assert [call.outcomes for call in harness.complete.calls][-1] == ["ran y", "ran z"]


async def test_items_of_one_sequence_never_share_a_batch_and_run_in_order(
    harness: Harness,
) -> None:
    batcher = harness.batcher()
    a, b = Stream("a"), Stream("b")
    for item in [Item("a1", a), Item("b1", b), Item("a2", a), Item("a3", a), Item("b2", b)]:
        batcher.submit(item)
    # Items without a sequence share freely.
    batcher.submit(Item("n1"))
    batcher.submit(Item("n2"))
    await harness.complete.wait("a1", "a2", "a3", "b1", "b2", "n1", "n2")
    assert harness.execute.batches == [["a1", "b1", "n1", "n2"], ["a2", "b2"], ["a3"]]
    ran = [i for batch in harness.execute.batches for i in batch]
    assert [i for i in ran if i.startswith("a")] == ["a1", "a2", "a3"]
    assert [i for i in ran if i.startswith("b")] == ["b1", "b2"]


async def test_a_later_item_of_a_sequence_does_not_overtake_a_deferred_one(
    harness: Harness,
) -> None:
    # "a1" cannot join the batch of T=1 items; "a2" could, but must not run before "a1".
    batcher = harness.batcher()
    a = Stream("a")
    batcher.submit(Item("b1", Stream("b"), time_steps=1))
    batcher.submit(Item("a1", a, time_steps=3))
    batcher.submit(Item("a2", a, time_steps=1))
    await harness.complete.wait("b1", "a1", "a2")
    assert harness.execute.batches == [["b1"], ["a1"], ["a2"]]


async def test_a_deferred_item_keeps_its_place_when_a_batch_fills(harness: Harness) -> None:
    # The batch fills at "b1", before "a3" is looked at: "a2" must still run before "a3".
    batcher = harness.batcher(max_batch_size=2)
    a = Stream("a")
    for item in [Item("a1", a), Item("a2", a), Item("b1", Stream("b"))]:
        batcher.submit(item)
    batcher.submit(Item("c1", Stream("c")))
    batcher.submit(Item("a3", a))
    await harness.complete.wait("a1", "a2", "a3", "b1", "c1")
    assert harness.execute.batches == [["a1", "b1"], ["a2", "c1"], ["a3"]]


async def test_items_with_different_time_steps_do_not_share_a_batch(harness: Harness) -> None:
    batcher = harness.batcher()
    steps = {"p": 1, "q": 2, "r": 1, "s": 2, "t": 5}
    for name, time_steps in steps.items():
        batcher.submit(Item(name, Stream(name), time_steps=time_steps))
    await harness.complete.wait(*steps)
    assert harness.execute.batches == [["p", "r"], ["q", "s"], ["t"]]
    for batch in harness.execute.batches:
        assert len({steps[i] for i in batch}) == 1


async def test_a_batch_never_exceeds_the_maximum_rows_and_the_rest_follow(
    harness: Harness,
) -> None:
    batcher = harness.batcher(max_batch_size=4)
    names = [f"s{k}" for k in range(6)]
    for name in names:
        batcher.submit(Item(name, Stream(name)))
    await harness.complete.wait(*names)
    assert harness.execute.batches == [names[:4], names[4:]]

    rows = {"m0": 2, "m1": 1, "m2": 2, "m3": 3, "m4": 1, "m5": 4}
    for name, count in rows.items():
        batcher.submit(Item(name, rows=count))
    await harness.complete.wait(*rows)
    mixed = harness.execute.batches[2:]
    assert all(sum(rows[i] for i in batch) <= 4 for batch in mixed), mixed
    assert sorted(i for batch in mixed for i in batch) == sorted(rows)  # each ran, once
    assert sorted(harness.complete.ids) == sorted(names + list(rows))


# ---------------------------------------------------------------- when a batch runs


async def test_the_queue_delay_gathers_items_of_several_loop_turns(harness: Harness) -> None:
    delay_s = 0.3
    batcher = harness.batcher(max_queue_delay_s=delay_s)
    names = [f"d{k}" for k in range(4)]
    first = time.perf_counter()
    for name in names:
        batcher.submit(Item(name, Stream(name)))
        await asyncio.sleep(0)  # each in its own loop turn
    await harness.complete.wait(*names)
    assert harness.execute.batches == [names]
    # A timer may fire a clock tick early; the batch did wait for company.
    assert harness.execute.started_at[0] - first >= delay_s - 0.01


async def test_a_full_batch_does_not_wait_the_queue_delay(harness: Harness) -> None:
    batcher = harness.batcher(max_batch_size=2, max_queue_delay_s=600.0)
    batcher.submit(Item("f1", Stream("f1")))
    await asyncio.sleep(0)
    batcher.submit(Item("f2", Stream("f2")))  # the batch is full: no waiting for more
    await harness.complete.wait("f1", "f2")  # within WAIT_S, far below the delay
    assert harness.execute.batches == [["f1", "f2"]]


async def test_the_worker_runs_the_next_batch_without_the_event_loop(harness: Harness) -> None:
    batcher = harness.batcher()
    await hold_first(harness, batcher, Item("a", Stream("a")))
    for name in ("b", "c"):
        batcher.submit(Item(name, Stream(name)))
    await asyncio.sleep(0)  # "b" and "c" are handed over while the worker is busy
    harness.execute.release.set()
    # Block the event loop: the worker must still finish "a" and go on to "b" and "c".
    assert harness.execute.wait_returned(2), "the second batch waited for the event loop"
    assert harness.execute.batches == [["a"], ["b", "c"]]
    assert harness.complete.ids == []  # nothing could be completed while the loop was blocked
    await harness.complete.wait("a", "b", "c")


async def test_a_job_on_the_worker_runs_between_batches_under_load(harness: Harness) -> None:
    batcher = harness.batcher()
    await hold_first(harness, batcher, Item("x", Stream("x")))
    for name in ("y", "z"):
        batcher.submit(Item(name, Stream(name)))
    await asyncio.sleep(0)  # handed over: the next batch is ready behind the held one

    def job() -> str:
        harness.execute.timeline.append("job")
        return threading.current_thread().name

    running = asyncio.create_task(batcher.on_worker(job))
    await asyncio.sleep(0)  # the job is queued on the worker
    harness.execute.release.set()
    assert (await asyncio.wait_for(running, WAIT_S)).startswith(f"batch-{NAME}")
    await harness.complete.wait("x", "y", "z")
    assert harness.execute.timeline == [["x"], "job", ["y", "z"]]


# ---------------------------------------------------------------- the inline rule


async def test_an_accepted_item_runs_inline_when_the_batcher_is_idle(harness: Harness) -> None:
    batcher = harness.batcher(inline=True)
    loop_thread = threading.current_thread()
    batcher.submit(Item("i1", Stream("i"), inline=True))
    # Never inside submit: right after this callback, on the event loop.
    assert harness.complete.ids == []
    assert batcher.busy
    await asyncio.sleep(0)
    assert harness.complete.ids == ["i1"]
    assert harness.complete.outcome("i1") == "ran i1"
    assert harness.execute.threads == [loop_thread]
    assert harness.complete.calls[0].thread is loop_thread
    assert not batcher.busy

    batcher.submit(Item("w1", Stream("w")))  # refused by the rule: to the worker
    assert harness.complete.ids == ["i1"]
    await harness.complete.wait("w1")
    assert worker_thread(harness.execute.threads[1])
    assert harness.complete.of("w1").thread is loop_thread

    batcher.submit(Item("i2", Stream("i"), inline=True))  # idle again: inline again
    await asyncio.sleep(0)
    assert harness.complete.ids == ["i1", "w1", "i2"]
    assert harness.execute.threads[2] is loop_thread


async def test_an_inline_item_cancelled_before_it_ran_never_runs(harness: Harness) -> None:
    batcher = harness.batcher(inline=True)
    ticket = batcher.submit(Item("i1", Stream("i"), inline=True))
    ticket.cancel()  # its client left in the same turn
    await asyncio.sleep(0)
    assert harness.complete.ids == ["i1"]
    assert isinstance(harness.complete.outcome("i1"), Cancelled)
    assert harness.execute.batches == []
    assert not batcher.busy


async def test_an_accepted_item_goes_to_the_worker_while_the_batcher_is_busy(
    harness: Harness,
) -> None:
    batcher = harness.batcher(inline=True)
    loop_thread = threading.current_thread()
    await hold_first(harness, batcher, Item("held", Stream("h")))
    batcher.submit(Item("late", Stream("l"), inline=True))
    assert harness.complete.ids == []  # not run inline
    harness.execute.release.set()
    await harness.complete.wait("held", "late")
    assert harness.execute.batches == [["held"], ["late"]]
    assert all(worker_thread(thread) for thread in harness.execute.threads)
    assert all(call.thread is loop_thread for call in harness.complete.calls)


async def test_an_accepted_item_does_not_overtake_queued_items(harness: Harness) -> None:
    batcher = harness.batcher(inline=True)
    a = Stream("a")
    batcher.submit(Item("a1", a))  # queued, not yet handed over
    batcher.submit(Item("a2", a, inline=True))
    assert harness.complete.ids == []
    await harness.complete.wait("a1", "a2")
    assert harness.execute.batches == [["a1"], ["a2"]]
    assert all(worker_thread(thread) for thread in harness.execute.threads)


async def test_an_accepted_item_waits_for_a_job_on_the_worker(harness: Harness) -> None:
    batcher = harness.batcher(inline=True)
    gate = harness.gate()
    job = asyncio.create_task(batcher.on_worker(lambda: gate.wait(WAIT_S)))
    await asyncio.sleep(0)  # the job runs on the worker (and may touch what items use)
    batcher.submit(Item("i", Stream("i"), inline=True))
    assert harness.complete.ids == []
    gate.set()
    assert await asyncio.wait_for(job, WAIT_S)
    await harness.complete.wait("i")
    assert worker_thread(harness.execute.threads[0])


# ---------------------------------------------------------------- cancellation and failures


async def test_an_item_cancelled_before_the_worker_takes_it_never_runs(harness: Harness) -> None:
    batcher = harness.batcher()
    await hold_first(harness, batcher, Item("x", Stream("x")))
    early = batcher.submit(Item("early", Stream("e")))
    early.cancel()  # before it was even handed over
    late = batcher.submit(Item("late", Stream("l")))
    batcher.submit(Item("kept", Stream("k")))
    await asyncio.sleep(0)  # handed over to the busy worker
    late.cancel()
    harness.execute.release.set()
    await harness.complete.wait("x", "early", "late", "kept")
    assert harness.execute.batches == [["x"], ["kept"]]
    for name in ("early", "late"):
        assert isinstance(harness.complete.outcome(name), Cancelled)
        assert harness.complete.of(name).queue_s == [0.0, 0.0]
    assert harness.complete.outcome("kept") == "ran kept"
    await until(lambda: not batcher.busy)


async def test_cancelling_an_item_the_worker_took_does_not_stop_it(harness: Harness) -> None:
    batcher = harness.batcher()
    harness.execute.hold.add("x")
    ticket = batcher.submit(Item("x", Stream("x")))
    await until(harness.execute.held.is_set)
    ticket.cancel()
    harness.execute.release.set()
    await harness.complete.wait("x")
    assert harness.complete.outcome("x") == "ran x"


async def test_a_failed_batch_fails_each_of_its_items_and_later_batches_run(
    harness: Harness,
) -> None:
    batcher = harness.batcher()
    harness.execute.fail.add("bad")
    a = Stream("a")
    batcher.submit(Item("bad", a))
    batcher.submit(Item("other", Stream("b")))
    batcher.submit(Item("after", a))  # same sequence as "bad": the next batch
    await harness.complete.wait("bad", "other", "after")
    assert harness.execute.batches == [["bad", "other"], ["after"]]
    failure = harness.complete.outcome("bad")
    assert isinstance(failure, Boom)
    assert harness.complete.outcome("other") is failure
    assert harness.complete.outcome("after") == "ran after"


async def test_a_wrong_number_of_outcomes_fails_the_batch(harness: Harness) -> None:
    batcher: SequenceBatcher[Item, str] = SequenceBatcher(
        NAME, lambda items: ["one answer"], harness.complete, 8
    )
    batcher.start()
    harness.made.append(batcher)
    batcher.submit(Item("u", Stream("u")))
    batcher.submit(Item("v", Stream("v")))
    await harness.complete.wait("u", "v")
    for name in ("u", "v"):
        outcome = harness.complete.outcome(name)
        assert isinstance(outcome, RuntimeError)
        assert "1 outcomes for a batch of 2" in str(outcome)


async def test_a_failing_complete_does_not_stop_the_batcher(harness: Harness) -> None:
    batcher = harness.batcher(inline=True)
    harness.complete.failures = 2
    batcher.submit(Item("first", Stream("f")))
    await harness.complete.wait("first")
    batcher.submit(Item("inline", Stream("i"), inline=True))
    await harness.complete.wait("inline")  # complete raised: the batcher did not
    batcher.submit(Item("then", Stream("t")))
    await harness.complete.wait("then")
    assert harness.complete.outcome("then") == "ran then"
    await until(lambda: not batcher.busy)


# ---------------------------------------------------------------- timings and stopping


async def test_queue_and_compute_times_follow_what_happened(harness: Harness) -> None:
    batcher = harness.batcher()
    before_x = time.perf_counter()
    await hold_first(harness, batcher, Item("x", Stream("x")))
    # "x" waited at most from before its submission to when the fake saw it.
    x_waited_at_most = harness.execute.started_at[0] - before_x
    batcher.submit(Item("y", Stream("y")))
    after_y = time.perf_counter()
    # Hold "x" until "y" has certainly waited longer than "x" did.
    await until(lambda: time.perf_counter() - after_y > x_waited_at_most)
    released = time.perf_counter()
    harness.execute.release.set()
    await harness.complete.wait("x", "y")
    x, y = harness.complete.of("x"), harness.complete.of("y")
    assert 0.0 <= x.queue_s[0] <= x_waited_at_most
    assert y.queue_s[0] >= released - after_y > x.queue_s[0]
    assert x.compute_s >= released - harness.execute.started_at[0]
    assert y.compute_s >= 0.0


async def test_stop_runs_what_is_queued_and_then_refuses_items(harness: Harness) -> None:
    batcher = harness.batcher()
    await hold_first(harness, batcher, Item("x", Stream("x")))
    batcher.submit(Item("y", Stream("y")))
    batcher.submit(Item("z", Stream("z")))
    stopping = asyncio.create_task(batcher.stop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done()  # "x" still runs, "y" and "z" wait
    harness.execute.release.set()
    await asyncio.wait_for(stopping, WAIT_S)
    assert sorted(harness.complete.ids) == ["x", "y", "z"]
    assert not batcher.busy
    with pytest.raises(RuntimeError, match=f"the batcher of model {NAME} is stopped"):
        batcher.submit(Item("after", Stream("a")))
    assert harness.complete.ids.count("after") == 0


async def test_an_item_wider_than_a_batch_runs_alone_rather_than_never(harness: Harness) -> None:
    batcher = harness.batcher(max_batch_size=2)
    batcher.submit(Item("wide", Stream("w"), rows=3))
    batcher.submit(Item("next", Stream("n")))
    await harness.complete.wait("wide", "next")
    assert harness.execute.batches == [["wide"], ["next"]]


async def test_stop_waits_for_a_job_on_the_worker_without_blocking_the_loop(
    harness: Harness,
) -> None:
    batcher = harness.batcher()
    gate = harness.gate()
    job = asyncio.create_task(batcher.on_worker(lambda: gate.wait(WAIT_S)))
    await asyncio.sleep(0.01)  # the job runs on the worker
    stopping = asyncio.create_task(batcher.stop())
    ticks = 0
    for _ in range(20):  # the loop keeps turning while stop() waits for the job
        await asyncio.sleep(0.001)
        ticks += 1
    assert ticks == 20 and not stopping.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(job, stopping), WAIT_S)
