"""Stress and chaos against one real server, every good answer checked against the model.

The stress run is Triton's own sequence stress (qa/L0_sequence_stress) for rnnserve: client
threads interleave sequences of about 16 steps on their own ids, with valid sequences, sequences
abandoned without END (evicted after the 1 s idle timeout), ids reused after END or eviction,
and about 1% of requests continuing a sequence that is not live (no START: refused). The chaos
run mixes good traffic with client deadlines, cancelled streams, client processes killed with
SIGKILL mid-stream (tests/api/chaos_client.py) and bad inputs, and checks that good requests are
answered right, that no sequence is stuck, that health answers throughout and that the server's
memory is flat. Each test prints its figures and records them as the property `figures`
(`pytest -rA` or `-s` shows them; the junit XML keeps them).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.api.conftest import MODELS, OUTPUTS, Reference, infer_input, sequence_data
from tests.server import RunningServer, serving

IDLE_TIMEOUT_S = 1.0
EVICTED_BY_S = 5.0
"""By then a sequence idle since a moment is surely evicted: the idle timeout, plus the server's
eviction sweep (every second), plus room for an event loop that lags on busy cores (0.7 s seen
with two CPU hogs beside the tests)."""
REQUEST_TIMEOUT_S = 30.0
"""A good request's deadline: far beyond any honest answer, so hitting it means stuck."""
NOT_LIVE = frozenset({"FAILED_PRECONDITION", "INVALID_ARGUMENT"})
"""A continuation of a sequence that is not live: rnnserve says FAILED_PRECONDITION, Triton
INVALID_ARGUMENT."""
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

THREADS = 8
ITERATIONS = 200
"""Requests per stress thread."""
ACTIVE = 2
"""Sequences each stress thread interleaves."""
NO_END_P = 0.2
REUSE_P = 0.5
MISSING_START_P = 0.01
THINK_S = 0.05
"""Mean pause between a stress thread's requests: unpaced, the 1,600 requests take about a
second here, before any abandoned sequence is evicted; paced, the run lasts several idle
timeouts, so evictions, reuses of evicted ids and refused continuations of them happen in it."""
STRESS_BOUND_S = 120.0

WARMUP_S = 6.0
CHAOS_S = 20.0
HEALTH_EVERY_S = 0.5
HEALTH_TIMEOUT_S = 5.0
RSS_GROWTH_MB = 20.0
"""Allowed RSS growth from the end of the warm-up to the end of the chaos run, both measured
idle. Every allocation of the run (arena slots, ONNX Runtime buffers, gRPC arenas) has happened
in the warm-up; what remains is the allocator's fragmentation, a few MB on these runs. A leak
of one request's buffers, a stream's queue or a dead client's call grows far past it over the
~30,000 requests of the run."""
SETTLE_S = 0.5
"""Time for the server to take in a cancelled stream or a killed client's connection."""
CHAOS_CLIENT = Path(__file__).with_name("chaos_client.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(
        tmp_path_factory.mktemp("stress"),
        "--idle-timeout-s", str(IDLE_TIMEOUT_S), "--max-queue-delay-us", "500",
    ) as running:  # fmt: skip
        yield running


# ---------------------------------------------------------------------------- shared pieces
class Tally:
    """Counts by kind and failures, from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n

    def fail(self, message: str) -> None:
        with self._lock:
            self.failures.append(message)


@dataclass(frozen=True)
class Answer:
    output: np.ndarray
    version: int
    """The response's sequence_version: requests applied since the START."""


@dataclass(eq=False)
class Tracked:
    """A sequence as its client knows it: every input since its START, and what came back."""

    model: str
    sid: int | str
    data: np.ndarray
    """The inputs planned for it, [1, length, ...]."""
    ends: bool = True
    chunks: list[np.ndarray] = field(default_factory=list)
    answers: list[np.ndarray | None] = field(default_factory=list)
    """None for a request whose answer was lost (a deadline) but which was applied."""
    last_sent: float = 0.0
    notes: list[str] = field(default_factory=list)
    """What happened to it that a failure report should tell."""

    def __str__(self) -> str:
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.model} sequence {self.sid!r}{notes}"

    @property
    def sent(self) -> int:
        """Time steps applied since the START."""
        return sum(chunk.shape[1] for chunk in self.chunks)

    @property
    def length(self) -> int:
        return int(self.data.shape[1])

    def accept(self, chunk: np.ndarray, answer: Answer | None, tally: Tally) -> None:
        """Record a request that was applied; its answer's version must count it."""
        if answer is not None and answer.version != len(self.chunks) + 1:
            tally.fail(
                f"{self}: an answer says sequence_version {answer.version}, but the client sent "
                f"{len(self.chunks) + 1} requests since its START"
            )
        self.chunks.append(chunk)
        self.answers.append(answer.output if answer is not None else None)

    def verify(self, reference: Reference, tally: Tally) -> None:
        """Every answer against the model run in-process over the inputs since the START."""
        if not self.chunks:
            return
        whole = reference.run(self.model, np.concatenate(self.chunks, axis=1))
        start = 0
        for k, (chunk, answer) in enumerate(zip(self.chunks, self.answers, strict=True)):
            end = start + chunk.shape[1]
            want = whole[:, start:end]
            if answer is None:
                tally.count("answers lost to a deadline (applied, checked by later answers)")
            elif answer.shape != want.shape:
                tally.fail(f"WRONG ANSWER: {self}, request {k}: shape {answer.shape}")
            elif not np.allclose(answer, want, **TOLERANCE):
                diff = np.abs(answer - want).max()
                tally.fail(f"WRONG ANSWER: {self}, request {k} (steps {start}..{end}): {diff:g}")
            else:
                tally.count("answers checked")
            start = end


def infer(
    client: triton.InferenceServerClient,
    model: str,
    sid: int | str,
    x: np.ndarray,
    *,
    start: bool = False,
    end: bool = False,
    timeout: float = REQUEST_TIMEOUT_S,
    expect: int | None = None,
) -> Answer:
    """One sequence request; raises InferenceServerException."""
    result = client.infer(
        model,
        [infer_input(model, x)],
        sequence_id=sid,
        sequence_start=start,
        sequence_end=end,
        client_timeout=timeout,
        parameters=None if expect is None else {"sequence_version": expect},
    )
    version = result.get_response().parameters["sequence_version"].int64_param
    return Answer(result.as_numpy(OUTPUTS[model]), version)


def code_of(error: InferenceServerException) -> str:
    return str(error.status() or "").removeprefix("StatusCode.")


def describe(error: InferenceServerException) -> str:
    return f"{code_of(error)} {error.message()}"


def explained_eviction(error: InferenceServerException, elapsed: float) -> bool:
    """Whether a good continuation refused as evicted may have been idle for the timeout.

    `elapsed` runs from sending the sequence's previous request to this refusal coming back.
    The server saw the previous request no earlier than it was sent and this one no later than
    it answered, so it saw the sequence idle for at most `elapsed`: an eviction within less is
    the server's error. Beyond, a starved client thread or a lagging server explains it (the
    tests share two cores with the server).
    """
    evicted = code_of(error) in NOT_LIVE and "evicted" in error.message()
    return evicted and elapsed > IDLE_TIMEOUT_S


def refused_good(
    tally: Tally, tracked: Tracked, error: InferenceServerException, what: str
) -> bool:
    """Count a good request's refusal; a failure unless an idle eviction explains it (then
    True). `tracked.last_sent` is when its previous request was sent."""
    elapsed = time.monotonic() - tracked.last_sent
    tally.count(f"good requests refused: {code_of(error)}")
    if explained_eviction(error, elapsed):
        tally.count("good sequences evicted after a stall of over the timeout")
        return True
    tally.fail(
        f"{tracked}, {what}, refused {elapsed:.3f} s after its previous request was sent: "
        f"{describe(error)}"
    )
    return False


def cuts(length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A sequence cut into requests of mostly one time step, some of 2-4."""
    bounds = [0]
    while bounds[-1] < length:
        steps = 1 if rng.random() < 0.7 else int(rng.integers(2, 5))
        bounds.append(min(length, bounds[-1] + steps))
    return list(itertools.pairwise(bounds))


def sequence_length(rng: np.random.Generator) -> int:
    return int(np.clip(round(rng.normal(16, 4)), 2, 32))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def metric_sum(scrape: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in scrape.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until_no_live_sequence(server: RunningServer, bound_s: float = 15.0) -> float:
    """Seconds until rnnserve_live_sequences is 0 for every model; fails past `bound_s`."""
    began = time.monotonic()
    while (live := metric_sum(server.scrape(), "rnnserve_live_sequences")) > 0:
        assert time.monotonic() - began < bound_s, (
            f"{live:.0f} sequences still live {bound_s:.0f} s after the traffic stopped, with "
            f"an idle timeout of {IDLE_TIMEOUT_S:g} s: stuck"
        )
        time.sleep(0.2)
    return time.monotonic() - began


def server_log_problems(server: RunningServer, since: int = 0) -> tuple[Counter[str], list[str]]:
    """Tracebacks in the server log from offset `since`, by exception, and the first of each
    kind; and requests the server answered INTERNAL (an unexpected error)."""
    log = server.log_text()[since:]
    tracebacks: Counter[str] = Counter()
    problems = []
    marker = "Traceback (most recent call last):"
    for match in re.finditer(re.escape(marker), log):
        lines = log[match.end() :].splitlines()
        last = next((line for line in lines if line and not line[0].isspace()), "?")
        kind = last.split(":")[0]
        tracebacks[kind] += 1
        if tracebacks[kind] == 1:
            line_start = log.rfind("\n", 0, match.start() - 1) + 1
            problems.append(f"the server logged:\n{log[line_start : match.end() + 1500]}")
    internal = metric_sum(server.scrape(), "rnnserve_requests_total", outcome="INTERNAL")
    if internal:
        problems.append(f"{internal:.0f} requests were answered INTERNAL")
    return tracebacks, problems


def report(
    record_property: Callable[[str, object], None], name: str, figures: dict[str, object]
) -> None:
    line = json.dumps(figures, default=str)
    record_property("figures", line)
    print(f"\n{name} figures: {line}")


def run_threads(
    tally: Tally, targets: dict[str, Callable[[], None]]
) -> dict[str, threading.Thread]:
    """Start each target in a daemon thread whose crash is a failure, not a lost thread."""

    def guarded(name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException:  # noqa: BLE001 - reported as the test's failure
                tally.fail(f"{name} crashed:\n{traceback.format_exc()}")

        return run

    threads = {
        name: threading.Thread(target=guarded(name, target), name=name, daemon=True)
        for name, target in targets.items()
    }
    for thread in threads.values():
        thread.start()
    return threads


def join_all(threads: dict[str, threading.Thread], until: float, tally: Tally) -> None:
    for name, thread in threads.items():
        thread.join(max(0.0, until - time.monotonic()))
        if thread.is_alive():
            tally.fail(f"{name} did not finish in time: stuck")


# ---------------------------------------------------------------------------- stress
@dataclass(frozen=True)
class IdleId:
    """An id of a sequence its thread finished: reusable, and not live once evicted."""

    model: str
    sid: int | str
    why: str
    """"ended" (END), "abandoned" (no END) or "evicted" (evicted while its client stalled)."""
    since: float

    def describe(self) -> str:
        """Why it is idle; for an abandoned id, whether it is evicted by now."""
        if self.why != "abandoned":
            return self.why
        age = time.monotonic() - self.since
        if age < IDLE_TIMEOUT_S:
            return "abandoned (still live)"
        return "abandoned (evicted)" if age > EVICTED_BY_S else "abandoned (live or evicted)"


class StressClient:
    """One client thread: ACTIVE interleaved sequences on ids of its own, one request at a time."""

    def __init__(self, index: int, target: str, reference: Reference, tally: Tally) -> None:
        self.index = index
        self.target = target
        self.reference = reference
        self.tally = tally
        self.rng = np.random.default_rng(1000 + index)
        self.active: list[Tracked] = []
        self.idle: list[IdleId] = []
        self._fresh = itertools.count(1)
        self._cuts: dict[Tracked, list[tuple[int, int]]] = {}

    def run(self, deadline: float) -> None:
        with triton.InferenceServerClient(self.target) as client:
            for _ in range(ITERATIONS):
                if time.monotonic() > deadline:
                    self.tally.fail(f"stress thread {self.index} ran past {STRESS_BOUND_S:g} s")
                    return
                time.sleep(min(self.rng.exponential(THINK_S), 5 * THINK_S))
                if self.rng.random() < MISSING_START_P:
                    self.missing_start(client)
                else:
                    self.advance(client, self.pick())
        for tracked in list(self.active):  # cut short by the iteration count: abandoned
            self.finish(tracked, "abandoned")

    def fresh_id(self) -> int | str:
        n = next(self._fresh)
        return f"stress-{self.index}-{n}" if n % 3 == 0 else self.index * 100_000 + n

    def pick(self) -> Tracked:
        while len(self.active) < ACTIVE:
            self.active.append(self.new_sequence())
        return self.active[int(self.rng.integers(len(self.active)))]

    def new_sequence(self) -> Tracked:
        rng = self.rng
        model = MODELS[int(rng.integers(len(MODELS)))]
        reusable = [entry for entry in self.idle if entry.model == model]
        if reusable and rng.random() < REUSE_P:
            entry = reusable[int(rng.integers(len(reusable)))]
            self.idle.remove(entry)
            sid: int | str = entry.sid
            self.tally.count(f"ids reused with START after: {entry.describe()}")
        else:
            sid = self.fresh_id()
        data = sequence_data(model, sequence_length(rng), rng)
        tracked = Tracked(model, sid, data, ends=rng.random() >= NO_END_P)
        self._cuts[tracked] = cuts(tracked.length, rng)
        return tracked

    def advance(self, client: triton.InferenceServerClient, tracked: Tracked) -> None:
        a, b = self._cuts[tracked][len(tracked.chunks)]
        chunk = tracked.data[:, a:b]
        start, end = a == 0, tracked.ends and b == tracked.length
        sent = time.monotonic()
        try:
            answer = infer(client, tracked.model, tracked.sid, chunk, start=start, end=end)
        except InferenceServerException as error:
            self.active.remove(tracked)
            what = f"steps {a}..{b} (start={start}, end={end})"
            if refused_good(self.tally, tracked, error, what):
                self.finish(tracked, "evicted", since=0.0)
            else:
                tracked.verify(self.reference, self.tally)
            return
        tracked.last_sent = sent
        self.tally.count("good requests answered")
        tracked.accept(chunk, answer, self.tally)
        if b == tracked.length:
            self.finish(tracked, "ended" if tracked.ends else "abandoned")

    def finish(self, tracked: Tracked, why: str, since: float | None = None) -> None:
        if tracked in self.active:
            self.active.remove(tracked)
        tracked.verify(self.reference, self.tally)
        self.tally.count(f"sequences {why}")
        when = time.monotonic() if since is None else since
        self.idle.append(IdleId(tracked.model, tracked.sid, why, when))

    def missing_start(self, client: triton.InferenceServerClient) -> None:
        """A continuation of a sequence that is surely not live: it must be refused."""
        rng, now = self.rng, time.monotonic()
        kinds: dict[str, list[IdleId]] = {"fresh": []}
        for entry in self.idle:
            if entry.why != "abandoned":
                kinds.setdefault(entry.why, []).append(entry)
            elif now - entry.since > EVICTED_BY_S:
                kinds.setdefault("evicted", []).append(entry)
        # Evicted ids first: refusing them while traffic goes on shows the eviction happened.
        why = "evicted" if "evicted" in kinds else sorted(kinds)[int(rng.integers(len(kinds)))]
        if why == "fresh":
            model, sid = MODELS[int(rng.integers(len(MODELS)))], self.fresh_id()
        else:
            entry = kinds[why][int(rng.integers(len(kinds[why])))]
            model, sid = entry.model, entry.sid
        x = sequence_data(model, int(rng.integers(1, 3)), rng)
        try:
            infer(client, model, sid, x, end=bool(rng.random() < 0.3))
        except InferenceServerException as error:
            if code_of(error) in NOT_LIVE:
                self.tally.count(f"missing START refused ({why} id): {code_of(error)}")
                return
            self.tally.fail(f"missing START on {why} {model} id {sid!r}: {describe(error)}")
            return
        self.tally.fail(f"a continuation without START of {why} {model} id {sid!r} was answered")


def test_stress(server: RunningServer, reference: Reference, record_property) -> None:
    tally = Tally()
    rss_before = rss_mb(server.pid)
    began = time.monotonic()
    deadline = began + STRESS_BOUND_S
    clients = [StressClient(i, server.target, reference, tally) for i in range(THREADS)]
    threads = run_threads(
        tally, {f"stress-{c.index}": (lambda c=c: c.run(deadline)) for c in clients}
    )
    join_all(threads, deadline + REQUEST_TIMEOUT_S, tally)
    run_s = time.monotonic() - began
    evicted_in = wait_until_no_live_sequence(server)
    rss_after = rss_mb(server.pid)

    # Nothing finished is live: every id continues to be refused without START ...
    idle = [entry for c in clients for entry in c.idle]
    with triton.InferenceServerClient(server.target) as client:
        for entry in idle:
            try:
                infer(
                    client,
                    entry.model,
                    entry.sid,
                    sequence_data(entry.model, 1, np.random.default_rng(0)),
                )
            except InferenceServerException as error:
                if code_of(error) not in NOT_LIVE:
                    tally.fail(
                        f"after the run, {entry.why} {entry.model} {entry.sid!r}: {describe(error)}"
                    )
            else:
                tally.fail(f"after the run, {entry.why} {entry.model} {entry.sid!r} is still live")
        # ... and starts again with START, from the zero state.
        rng = np.random.default_rng(99)
        for entry in [e for e in idle if e.why == "abandoned"][:6]:
            tracked = Tracked(entry.model, entry.sid, sequence_data(entry.model, 3, rng))
            for t in range(3):
                chunk = tracked.data[:, t : t + 1]
                answer = infer(client, entry.model, entry.sid, chunk, start=t == 0, end=t == 2)
                tracked.accept(chunk, answer, tally)
            tracked.verify(reference, tally)
            tally.count("evicted ids restarted after the run")
    tracebacks, log_problems = server_log_problems(server)

    requests = sum(n for kind, n in tally.counts.items() if kind.startswith(("good", "missing")))
    figures = {
        "threads x iterations": f"{THREADS} x {ITERATIONS}",
        "requests": requests,
        "seconds": round(run_s, 1),
        "requests/s": round(requests / run_s),
        "all live sequences evicted within s": round(evicted_in, 1),
        "server RSS MB before/after": [round(rss_before, 1), round(rss_after, 1)],
        "counts": dict(sorted(tally.counts.items())),
        "failures": len(tally.failures),
        "server log tracebacks": dict(tracebacks),
    }
    report(record_property, "stress", figures)
    assert not tally.failures, "\n".join(tally.failures[:30])
    assert tally.counts["answers checked"] > THREADS * ITERATIONS * 0.8
    assert not log_problems, "\n".join(log_problems)


# ---------------------------------------------------------------------------- chaos
class Ids:
    """Sequence ids no other actor uses, from many threads."""

    def __init__(self, first: int) -> None:
        self._lock = threading.Lock()
        self._next = first

    def take(self, count: int = 1) -> int:
        with self._lock:
            first, self._next = self._next, self._next + count
            return first


@dataclass
class Chaos:
    """What the chaos actors share."""

    server: RunningServer
    reference: Reference
    workdir: Path
    tally: Tally = field(default_factory=Tally)
    stop: threading.Event = field(default_factory=threading.Event)
    ids: Ids = field(default_factory=lambda: Ids(10_000_000))

    def new_sequence(self, rng: np.random.Generator, length: int | None = None) -> Tracked:
        model = MODELS[int(rng.integers(len(MODELS)))]
        steps = sequence_length(rng) if length is None else length
        return Tracked(model, self.ids.take(), sequence_data(model, steps, rng))

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.server.target)


def run_good_sequence(
    chaos: Chaos, client: triton.InferenceServerClient, tracked: Tracked, rng: np.random.Generator
) -> None:
    """Send a sequence from where it is to its END, one checked request at a time."""
    tally = chaos.tally
    base = tracked.sent
    for a, b in cuts(tracked.length - base, rng):
        end = base + b == tracked.length
        where = f"steps {base + a}..{base + b} (end={end})"
        if not send_good(client, tracked, tally, base + a, base + b, where):
            break
    tracked.verify(chaos.reference, tally)


def send_good(
    client: triton.InferenceServerClient, tracked: Tracked, tally: Tally, a: int, b: int, where: str
) -> bool:
    """Send steps a..b of a good sequence and check the answer; False if it was refused."""
    chunk = tracked.data[:, a:b]
    sent = time.monotonic()
    try:
        answer = infer(
            client, tracked.model, tracked.sid, chunk, start=a == 0, end=b == tracked.length
        )
    except InferenceServerException as error:
        refused_good(tally, tracked, error, where)
        return False
    tracked.last_sent = sent
    tally.count("good requests answered")
    tracked.accept(chunk, answer, tally)
    return True


def good_unary(chaos: Chaos, rng: np.random.Generator) -> None:
    """Valid sequences, unary requests, every answer checked."""
    with chaos.client() as client:
        while not chaos.stop.is_set():
            run_good_sequence(chaos, client, chaos.new_sequence(rng), rng)
            chaos.tally.count("good sequences (unary)")


def good_stream(chaos: Chaos, rng: np.random.Generator) -> None:
    """Valid sequences pipelined over one stream, every answer checked."""
    tally = chaos.tally
    with chaos.client() as client:
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            while not chaos.stop.is_set():
                tracked = chaos.new_sequence(rng)
                parts = cuts(tracked.length, rng)
                for k, (a, b) in enumerate(parts):
                    client.async_stream_infer(
                        tracked.model,
                        [infer_input(tracked.model, tracked.data[:, a:b])],
                        request_id=str(k),
                        sequence_id=tracked.sid,
                        sequence_start=a == 0,
                        sequence_end=b == tracked.length,
                    )
                got: dict[str, Answer] = {}
                for _ in parts:
                    result, error = answers.get(timeout=REQUEST_TIMEOUT_S)
                    if error is not None:
                        tally.fail(f"good stream request on {tracked}: {describe(error)}")
                        continue
                    response = result.get_response()
                    got[response.id] = Answer(
                        result.as_numpy(OUTPUTS[tracked.model]),
                        response.parameters["sequence_version"].int64_param,
                    )
                for k, (a, b) in enumerate(parts):
                    if str(k) not in got:
                        break
                    tracked.accept(tracked.data[:, a:b], got[str(k)], tally)
                tracked.verify(chaos.reference, tally)
                tally.count("good requests answered", len(got))
                tally.count("good sequences (stream)")
        finally:
            client.stop_stream()


def deadlines(chaos: Chaos, rng: np.random.Generator) -> None:
    """Sequences whose requests often carry a deadline of 0.5-20 ms. A request that timed out
    may or may not have been applied: the client finds out with sequence_version, as README
    tells a client that lost an answer to, and goes on; every answer it did get is checked."""
    tally = chaos.tally
    with chaos.client() as client:
        while not chaos.stop.is_set():
            tracked = chaos.new_sequence(rng)
            for a, b in cuts(tracked.length, rng):
                chunk = tracked.data[:, a:b]
                start, end = a == 0, b == tracked.length
                short = rng.random() < 0.6
                timeout = float(rng.uniform(0.0005, 0.02)) if short else REQUEST_TIMEOUT_S
                sent = time.monotonic()
                try:
                    answer = infer(
                        client, tracked.model, tracked.sid, chunk,
                        start=start, end=end, timeout=timeout,
                    )  # fmt: skip
                except InferenceServerException as error:
                    if code_of(error) != "DEADLINE_EXCEEDED" or not short:
                        what = f"steps {a}..{b} (end={end}, deadline {timeout * 1000:.1f} ms)"
                        refused_good(tally, tracked, error, what)
                        break
                    tally.count("deadline: DEADLINE_EXCEEDED")
                    if not resolve_deadline(chaos, client, tracked, chunk, start, end):
                        break
                    continue
                tracked.last_sent = sent
                tally.count("deadline: answered in time")
                tracked.accept(chunk, answer, tally)
            tracked.verify(chaos.reference, tally)


def resolve_deadline(
    chaos: Chaos,
    client: triton.InferenceServerClient,
    tracked: Tracked,
    chunk: np.ndarray,
    start: bool,
    end: bool,
) -> bool:
    """Send a timed-out request again, applied at most once; whether the sequence goes on."""
    tally, model, sid = chaos.tally, tracked.model, tracked.sid
    sent = time.monotonic()
    if start:  # a START starts from the zero state whether or not the first one ran
        tracked.accept(chunk, infer(client, model, sid, chunk, start=True), tally)
        tracked.last_sent = sent
        tracked.notes.append("its START timed out; sent again, it was answered OK")
        tally.count("deadline: START sent again")
        return True
    try:
        answer = infer(client, model, sid, chunk, end=end, expect=len(tracked.chunks))
    except InferenceServerException as error:
        applied = re.search(r"is at version (\d+)", error.message())
        if code_of(error) == "ABORTED" and applied and int(applied[1]) == len(tracked.chunks) + 1:
            tracked.accept(chunk, None, tally)
            tracked.last_sent = sent
            tally.count("deadline: the timed-out step had been applied")
            return True
        if end and code_of(error) in NOT_LIVE and "it ended" in error.message():
            tally.count("deadline: the timed-out END had ended the sequence")
            return False
        refused_good(tally, tracked, error, "a timed-out step sent again")
        return False
    tracked.last_sent = sent
    tracked.accept(chunk, answer, tally)
    tally.count("deadline: the timed-out step had not been applied; sent again")
    return True


def probe_version(client: triton.InferenceServerClient, tracked: Tracked) -> int:
    """How many requests the sequence has applied since its START (0: it is not live), asked
    with a sequence_version it cannot be at, so the probe itself is never applied."""
    x = tracked.data[:, :1]
    try:
        infer(client, tracked.model, tracked.sid, x, expect=0)
    except InferenceServerException as error:
        if code_of(error) in NOT_LIVE:
            return 0
        applied = re.search(r"is at version (\d+)", error.message())
        assert code_of(error) == "ABORTED" and applied, describe(error)
        return int(applied[1])
    raise AssertionError(f"{tracked}: a request expecting version 0 was applied")


def cancelled_streams(chaos: Chaos, rng: np.random.Generator) -> None:
    """Streams cancelled with requests in flight. What ran must be a prefix of what was sent,
    every answer that came back must be for a step that ran, and the sequence must go on from
    exactly that prefix and end."""
    tally = chaos.tally
    with chaos.client() as client:
        while not chaos.stop.is_set():
            streamed = int(rng.integers(4, 25))
            tracked = chaos.new_sequence(rng, length=streamed + 3)
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error, q=answers: q.put((result, error)))
            for k in range(streamed):
                client.async_stream_infer(
                    tracked.model,
                    [infer_input(tracked.model, tracked.data[:, k : k + 1])],
                    request_id=str(k),
                    sequence_id=tracked.sid,
                    sequence_start=k == 0,
                )
            time.sleep(float(rng.uniform(0, 0.03)))
            client.stop_stream(cancel_requests=True)
            tally.count("cancelled streams")
            got = drain_stream_answers(answers, tracked, tally)
            time.sleep(SETTLE_S)
            tracked.last_sent = time.monotonic()  # the probe counts as a request: it resumes
            applied = probe_version(client, tracked)
            tally.count("cancelled streams: steps applied", applied)
            tally.count("cancelled streams: steps not applied", streamed - applied)
            if any(k >= applied for k in got):
                tally.fail(f"{tracked}: answers {sorted(got)} came back, but {applied} ran")
            for k in range(applied):
                tracked.accept(tracked.data[:, k : k + 1], got.get(k), tally)
            if applied == 0:
                tracked.chunks, tracked.answers = [], []
                tracked.data = tracked.data[:, streamed:]  # the START never ran: start over
            run_good_sequence(chaos, client, tracked, rng)


def drain_stream_answers(answers: queue.Queue, tracked: Tracked, tally: Tally) -> dict[int, Answer]:
    """The answers a cancelled stream delivered, by request index."""
    got: dict[int, Answer] = {}
    while True:
        try:
            result, error = answers.get_nowait()
        except queue.Empty:
            return got
        if error is not None:
            if code_of(error) != "CANCELLED":
                tally.fail(f"{tracked}: a cancelled stream answered {describe(error)}")
            continue
        response = result.get_response()
        version = response.parameters["sequence_version"].int64_param
        got[int(response.id)] = Answer(result.as_numpy(OUTPUTS[tracked.model]), version)


def killed_clients(chaos: Chaos, rng: np.random.Generator) -> None:
    """Client processes streaming 4 sequences, killed with SIGKILL mid-stream; then one of
    their ids is started again (a restart of a live sequence) and must run right."""
    tally, count = chaos.tally, 4
    while not chaos.stop.is_set():
        model = MODELS[int(rng.integers(len(MODELS)))]
        first = chaos.ids.take(count)
        errors = chaos.workdir / f"chaos_client-{first}.err"
        with errors.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(CHAOS_CLIENT), chaos.server.target, model, str(first),
                 str(count), str(first)],
                stdout=subprocess.PIPE, stderr=stderr, text=True,
            )  # fmt: skip
        try:
            ready, _, _ = select.select([process.stdout], [], [], REQUEST_TIMEOUT_S)
            assert process.stdout is not None
            if not ready or process.stdout.readline().strip() != "streaming":
                tally.fail(f"chaos client did not stream: {errors.read_text()[-2000:]}")
                continue
            time.sleep(float(rng.uniform(0.05, 0.5)))
            os.kill(process.pid, signal.SIGKILL)
            process.wait(REQUEST_TIMEOUT_S)
            tally.count("client processes killed mid-stream")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        time.sleep(SETTLE_S)
        tracked = Tracked(model, first, sequence_data(model, 3, rng))
        with chaos.client() as client:
            run_good_sequence(chaos, client, tracked, rng)
        tally.count("ids of killed clients started again")


def bad_request(
    model: str, rng: np.random.Generator
) -> tuple[str, str, list[triton.InferInput], str]:
    """A request the server must refuse: (kind, model to send it to, inputs, expected code)."""
    name = {"charlm_lstm": "tokens", "sensor_gru": "reading", "digits_lstm": "pixels"}[model]
    good = sequence_data(model, 1, rng)
    kinds = ["dtype", "shape", "batch", "model"] + (["range"] if model == "charlm_lstm" else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "model":
        return kind, "no_such_model", [infer_input(model, good)], "NOT_FOUND"
    if kind == "dtype":
        wrong = good.astype(np.float32 if good.dtype == np.int64 else np.int64)
        return kind, model, [infer_input(model, wrong)], "INVALID_ARGUMENT"
    if kind == "shape":
        wrong = np.concatenate([good, good], axis=-1) if good.ndim == 3 else good[..., None]
        return kind, model, [infer_input(model, wrong)], "INVALID_ARGUMENT"
    if kind == "batch":
        return kind, model, [infer_input(model, np.concatenate([good, good]))], "INVALID_ARGUMENT"
    wrong = np.full_like(good, 200)
    tensor = triton.InferInput(name, list(wrong.shape), "INT64")
    tensor.set_data_from_numpy(wrong)
    return kind, model, [tensor], "INVALID_ARGUMENT"


def send_bad(
    chaos: Chaos, client: triton.InferenceServerClient, tracked: Tracked, rng: np.random.Generator
) -> None:
    """A bad request on a good sequence's id, with random START/END flags: refused, and the
    sequence not touched (neither advanced, restarted nor ended)."""
    kind, model, inputs, expected = bad_request(tracked.model, rng)
    try:
        client.infer(
            model,
            inputs,
            sequence_id=tracked.sid,
            sequence_start=bool(rng.random() < 0.3),
            sequence_end=bool(rng.random() < 0.3),
            client_timeout=REQUEST_TIMEOUT_S,
        )
    except InferenceServerException as error:
        if code_of(error) != expected:
            chaos.tally.fail(f"bad input ({kind}) on {tracked}: {describe(error)}")
        chaos.tally.count(f"bad inputs refused: {kind} {code_of(error)}")
        return
    chaos.tally.fail(f"bad input ({kind}) on {tracked} was answered")


def bad_inputs(chaos: Chaos, rng: np.random.Generator) -> None:
    """Good sequences with bad requests on their ids in between (wrong dtype or shape, batch 2
    in a sequence, token 200, unknown model); a sequence whose START was bad is not live."""
    tally = chaos.tally
    with chaos.client() as client:
        while not chaos.stop.is_set():
            tracked = chaos.new_sequence(rng)
            if rng.random() < 0.3:  # a bad START leaves nothing live behind
                send_bad(chaos, client, tracked, rng)
                if probe_version(client, tracked) != 0:
                    tally.fail(f"{tracked} is live after its only START was refused")
            for a, b in cuts(tracked.length, rng):
                if rng.random() < 0.4:
                    send_bad(chaos, client, tracked, rng)
                if not send_good(
                    client, tracked, tally, a, b, f"steps {a}..{b}, between bad requests"
                ):
                    break
            tracked.verify(chaos.reference, tally)


class HealthWatch:
    """ServerLive and grpc.health.v1 every HEALTH_EVERY_S, each within HEALTH_TIMEOUT_S."""

    def __init__(self, target: str, tally: Tally) -> None:
        self.target = target
        self.tally = tally
        self.stop = threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        with (
            triton.InferenceServerClient(self.target) as client,
            grpc.insecure_channel(self.target) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(HEALTH_EVERY_S):
                began = time.monotonic()
                try:
                    live = client.is_server_live(client_timeout=HEALTH_TIMEOUT_S)
                    check = health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
                except (InferenceServerException, grpc.RpcError) as error:
                    self.tally.fail(f"health did not answer: {error}")
                    continue
                self.latencies.append(time.monotonic() - began)
                if not live or check.status != health_pb2.HealthCheckResponse.SERVING:
                    self.tally.fail(f"health answered live={live}, status={check.status}")


ACTORS: dict[str, tuple[Callable[[Chaos, np.random.Generator], None], int]] = {
    "good unary": (good_unary, 2),
    "good stream": (good_stream, 1),
    "deadlines": (deadlines, 1),
    "cancelled streams": (cancelled_streams, 1),
    "killed clients": (killed_clients, 1),
    "bad inputs": (bad_inputs, 1),
}


def run_chaos(chaos: Chaos, seconds: float, seed: int) -> float:
    """Every actor for `seconds`; then each finishes what it is doing. The seconds it took."""
    chaos.stop.clear()
    began = time.monotonic()
    targets = {}
    for name, (actor, copies) in ACTORS.items():
        for copy in range(copies):
            rng = np.random.default_rng([seed, len(targets)])
            targets[f"{name} {copy}"] = lambda actor=actor, rng=rng: actor(chaos, rng)
    threads = run_threads(chaos.tally, targets)
    time.sleep(seconds)
    chaos.stop.set()
    join_all(threads, time.monotonic() + 2 * REQUEST_TIMEOUT_S, chaos.tally)
    return time.monotonic() - began


def test_chaos(
    server: RunningServer, reference: Reference, tmp_path: Path, record_property
) -> None:
    log_offset = len(server.log_text())
    watch = HealthWatch(server.target, Tally())
    health = run_threads(watch.tally, {"health": watch.run})

    warmup = Chaos(server, reference, tmp_path)
    run_chaos(warmup, WARMUP_S, seed=1)
    wait_until_no_live_sequence(server)
    rss_warm = rss_mb(server.pid)

    chaos = Chaos(server, reference, tmp_path, ids=Ids(20_000_000))
    run_s = run_chaos(chaos, CHAOS_S, seed=2)
    evicted_in = wait_until_no_live_sequence(server)
    rss_end = rss_mb(server.pid)
    watch.stop.set()
    join_all(health, time.monotonic() + 2 * HEALTH_TIMEOUT_S, watch.tally)
    tracebacks, log_problems = server_log_problems(server, since=log_offset)

    tally = chaos.tally
    requests = sum(
        n
        for kind, n in tally.counts.items()
        if kind.startswith(("good requests", "deadline: DEADLINE", "deadline: answered", "bad"))
    )
    failures = warmup.tally.failures + tally.failures + watch.tally.failures
    figures = {
        "seconds (warm-up, chaos)": [WARMUP_S, round(run_s, 1)],
        "requests (chaos, not counting streamed-and-cancelled ones)": requests,
        "wrong answers": sum(f.startswith("WRONG ANSWER") for f in failures),
        "all live sequences evicted within s": round(evicted_in, 1),
        "server RSS MB (end of warm-up, end)": [round(rss_warm, 1), round(rss_end, 1)],
        "health polls, slowest s": [
            len(watch.latencies),
            round(max(watch.latencies, default=0.0), 3),
        ],
        "counts": dict(sorted(tally.counts.items())),
        "failures": len(failures),
        "server log tracebacks": dict(tracebacks),
    }
    report(record_property, "chaos", figures)
    assert not failures, "\n".join(failures[:30])
    assert rss_end - rss_warm < RSS_GROWTH_MB, figures["server RSS MB (end of warm-up, end)"]
    assert len(watch.latencies) >= (WARMUP_S + CHAOS_S) / HEALTH_EVERY_S / 2
    for kind in ("client processes killed mid-stream", "cancelled streams", "answers checked",
                 "deadline: DEADLINE_EXCEEDED"):  # fmt: skip
        assert tally.counts[kind] > 0, f"no {kind} in the run"
    assert not log_problems, "\n".join(log_problems)
