"""One loaded model version: it checks a request, plans its work, and answers it once.

The path of one request: `submit` checks the request against the model's signature and turns
it into a frozen `Work` (for a sequence: started, resumed or ended here); the batcher decides
when it runs; `BatchExecution` runs it; `_complete` releases what it held, counts it, and hands
its outcome (an `InferenceResult` or a `ServiceError`) to the caller's callback, once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.batching.batcher import Cancelled, SequenceBatcher, Ticket, Turn
from rnnserve.errors import (
    AnswerTooLarge,
    InternalError,
    InvalidArgument,
    InvalidModelRepository,
    ModelNotReady,
    RequestCancelled,
    ServiceError,
    TooManySteps,
)
from rnnserve.repository.signature import ModelSignature, TensorSpec, signature_of, wire_name_of
from rnnserve.runtime.base import Runtime
from rnnserve.serving.execution import (
    BatchExecution,
    Executed,
    Ran,
    Work,
    all_finite,
    non_finite_error,
)
from rnnserve.serving.request import InferenceRequest, InferenceResult, OnOutcome, Outcome
from rnnserve.serving.snapshot import ModelSnapshot, SequenceSnapshot
from rnnserve.serving.statistics import Statistics
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.manager import EvictionReason, SequenceManager, SequenceQuota
from rnnserve.sessions.sequence import SequenceId, SequenceKey, sequence_key
from rnnserve.sessions.store import Durability, MemoryStore, StateStore
from rnnserve.sessions.sync import StateSync

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    """Where a loaded model version is in its life."""

    READY = "READY"
    UNLOADING = "UNLOADING"
    """Unloaded: takes no new sequences; its live ones go on until the unload grace ends."""
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class Limits:
    """Per-model limits set for the whole server; None defers to each model's config.pbtxt."""

    max_sequences: int | None = None
    idle_timeout_s: float | None = None
    max_queue_delay_s: float | None = None
    max_steps_per_request: int | None = None
    """Time steps one request may carry."""
    inline_max_work: int = 64
    """A lone sequence's requests of at most this many rows x time steps run on the event
    loop (0: none do)."""
    max_answer_bytes: int | None = None
    """The largest answer the transport carries (its largest message); larger ones are refused
    before they run. None: no limit."""


ANSWER_OVERHEAD_BYTES = 1024
"""What an answer carries besides its tensors' bytes, at most: model name, version, request
id (counted apart), parameters, and each output's name, type and shape (protobuf framing)."""
DEFAULT_MAX_STEPS = 4096
"""Time steps one request may carry when neither the server nor the config says."""
MAX_CHECKED_SHAPES = 1024
"""Input shapes a model remembers as checked."""


def _config_int(config: mc.ModelConfig, key: str) -> int | None:
    """A whole number from the config's `parameters`; None when absent.

    Raises InvalidModelRepository when the parameter is not a whole number.
    """
    if key not in config.parameters:
        return None
    text = config.parameters[key].string_value
    if not text.isdigit():
        raise InvalidModelRepository(
            f"model {config.name}: parameter {key} must be a whole number, got {text!r}"
        )
    return int(text)


def _config_flag(config: mc.ModelConfig, key: str) -> bool:
    """A "true" or "false" from the config's `parameters`; False when absent.

    Raises InvalidModelRepository for any other value.
    """
    if key not in config.parameters:
        return False
    text = config.parameters[key].string_value
    if text not in ("true", "false"):
        raise InvalidModelRepository(
            f'model {config.name}: parameter {key} must be "true" or "false", got {text!r}'
        )
    return text == "true"


@dataclass(frozen=True)
class SequenceSupport:
    """A streamable model's one optional part: its live sequences, their state arena, and
    the sync of that arena with the state store."""

    manager: SequenceManager
    arena: StateArena
    sync: StateSync


class ServedModel:
    """One loaded model version (event loop only, but for `snapshot`)."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        path: Path,
        runtime: Runtime,
        limits: Limits,
        store: StateStore | None = None,
        durability: Durability = Durability.STEP,
        quota: SequenceQuota | None = None,
        turn: Turn | None = None,
        server_lone: Callable[[], bool] | None = None,
    ) -> None:
        """`server_lone` says whether the whole server holds one live sequence at most (the
        registry's `lone`); without it, this model's own sequences decide."""
        self.name = name
        self.version = version
        self.config = config
        self.path = path
        self.runtime = runtime
        self.signature: ModelSignature = signature_of(config, runtime)
        sig = self.signature
        self.idle_timeout_s = (
            limits.idle_timeout_s if limits.idle_timeout_s is not None else sig.idle_timeout_s
        )
        self.max_steps = (
            limits.max_steps_per_request
            or _config_int(config, "max_steps_per_request")
            or DEFAULT_MAX_STEPS
        )
        # Triton's ONNX Runtime backend ignores parameters it does not know, so the opt-in
        # leaves the repository servable by Triton.
        finite_inputs = (
            ()
            if _config_flag(config, "allow_non_finite_inputs")
            else tuple(t.name for t in sig.inputs if t.dtype.kind == "f")
        )
        store = store if store is not None else MemoryStore()
        self.sequences = self._sequence_support(limits, store, durability, quota)
        delay = (
            limits.max_queue_delay_s if limits.max_queue_delay_s is not None else sig.queue_delay_s
        )
        # Inline runs would block the event loop on a shared store's round trips.
        inline_max_work = 0 if store.shared else limits.inline_max_work
        self.stats = Statistics()
        support = self.sequences
        self._batcher: SequenceBatcher[Work, Executed] = SequenceBatcher(
            f"{name}-{version}",
            BatchExecution(
                runtime,
                sig.states,
                support.arena if support is not None else None,
                support.sync if support is not None else None,
                model=name,
                finite_inputs=finite_inputs,
                lone=self._lone_sequence(server_lone) if support is not None else None,
            ),
            self._complete,
            sig.max_batch_size,
            delay,
            may_run_inline=(
                self._lone_sequence_rule(inline_max_work, server_lone) if support else None
            ),
            turn=turn,
        )
        self.state = ModelState.READY
        self._inputs = {t.name: t for t in sig.inputs}
        self._state_inputs = [s.input_name for s in sig.states]
        self._outputs = {t.name for t in sig.outputs} | {s.output_name for s in sig.states}
        self._default_outputs = tuple(t.name for t in sig.outputs)
        self._max_answer_bytes = limits.max_answer_bytes
        self._finite_inputs = finite_inputs
        self._answer_sizes = _answer_sizes(sig)
        """Per output: (bytes per row and time step, bytes per row not per time step)."""
        self._answer_bytes_seen: dict[tuple[int, int, tuple[str, ...]], int] = {}
        self._warn_if_answers_cannot_fit()
        self._index_bounds = {
            name: size
            for name, size in runtime.index_bounds.items()
            if name in self._inputs and self._inputs[name].dtype.kind in "iu"
        }
        """Integer inputs that index a table of the graph: the table's size (values 0..size-1)."""
        self._checked_inputs: dict[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[int, int]]
        self._checked_inputs = {}

    def _sequence_support(
        self,
        limits: Limits,
        store: StateStore,
        durability: Durability,
        quota: SequenceQuota | None,
    ) -> SequenceSupport | None:
        sig = self.signature
        if not sig.streamable:
            return None
        limit = limits.max_sequences or sig.max_sequences
        # Twice the limit in slots: an ended sequence keeps its slot until its last request
        # ran, outside the limit. np.zeros commits memory only as slots are first used.
        arena = StateArena([s.dims for s in sig.states], 2 * limit)
        label = f"{self.name} (version {self.version})"
        return SequenceSupport(
            SequenceManager(
                label, arena, self.idle_timeout_s, adopt=store.shared, limit=limit, quota=quota
            ),
            arena,
            StateSync(store, durability, self.name, self.version, arena, self.idle_timeout_s),
        )

    def _lone_sequence(self, server_lone: Callable[[], bool] | None) -> Callable[[], bool]:
        """Whether this model has one live sequence at most, and the server too (what it is
        asked for): its calls then have the CPU and the event loop to themselves."""
        live = self.sequences.manager.live if self.sequences is not None else {}
        if server_lone is None:
            return lambda: len(live) <= 1
        return lambda: len(live) <= 1 and server_lone()

    def _lone_sequence_rule(
        self, max_work: int, server_lone: Callable[[], bool] | None
    ) -> Callable[[Work], bool]:
        """Work that may run inline: a lone live sequence's, of at most `max_work` rows x T.

        Only for a lone sequence, in the whole server: with company, the work that arrives
        while a batch runs on the worker thread makes the next batch, and running single items
        inline would starve that (or another model's work, which waits for the event loop).
        """
        lone = self._lone_sequence(server_lone)

        def rule(work: Work) -> bool:
            return work.sequence is not None and work.rows * work.time_steps <= max_work and lone()

        return rule

    @property
    def labels(self) -> tuple[str, str]:
        """Its metric labels: model and version."""
        return self.name, str(self.version)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start serving (on the event loop)."""
        self._batcher.start()

    async def stop(self) -> None:
        """Run the work that is queued, then stop; the model takes no request after this."""
        self.state = ModelState.UNAVAILABLE
        await self._batcher.stop()

    async def wait_for_sequences(self, grace_s: float) -> None:
        """Wait until it holds no live sequence, or for `grace_s` seconds at most (the unload
        grace: an unloaded version's live sequences go on meanwhile)."""
        deadline = time.monotonic() + grace_s
        while self.live_sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def end_sequences(self, why: str) -> list[SequenceKey]:
        """End every live sequence now, their next request to be told `why` (the unload grace
        ran out); their keys."""
        if self.sequences is None:
            return []
        manager = self.sequences.manager
        ended = list(manager.live.values())
        for sequence in ended:
            manager.evict(sequence, why, EvictionReason.UNLOADED)
        return [sequence.key for sequence in ended]

    @property
    def live_sequences(self) -> int:
        """How many sequences it holds live (0 for a whole-sequence model)."""
        return len(self.sequences.manager.live) if self.sequences is not None else 0

    def holds(self, sequence_id: SequenceId, owner: str = "") -> bool:
        """Whether `owner`'s sequence `sequence_id` is one of its live sequences."""
        return (
            self.sequences is not None
            and sequence_key(owner, sequence_id) in self.sequences.manager.live
        )

    def ending(self, key: SequenceKey) -> str | None:
        """Why the sequence of `key` recently stopped being live on this version; None when it
        is live here or unknown."""
        return self.sequences.manager.ending(key) if self.sequences is not None else None

    def endings(self) -> list[tuple[SequenceKey, str]]:
        """Every ending this version remembers, as (key, why), oldest first."""
        return self.sequences.manager.endings() if self.sequences is not None else []

    @property
    def busy(self) -> bool:
        """Work is queued or running."""
        return self._batcher.busy

    def evict_idle(self, now: float | None = None) -> int:
        """Evict sequences idle for over the idle timeout at `now` (`time.monotonic()`
        seconds; the current time when None); how many were."""
        return len(self.sequences.manager.evict_idle(now)) if self.sequences is not None else 0

    async def mark_moving(self, ttl_s: float) -> int:
        """Mark in the state store the states `write_states` is about to write (hand-over at
        shutdown), for `ttl_s` seconds; how many. Raises StoreUnavailable."""
        if self.sequences is None:
            return 0
        sync, live = self.sequences.sync, list(self.sequences.manager.live.values())
        return await self._batcher.on_worker(lambda: sync.mark_moving(live, ttl_s))

    async def write_states(self) -> int:
        """Write every live state to the state store where durability asks (hand-over at
        shutdown); how many were. Raises StoreUnavailable."""
        if self.sequences is None:
            return 0
        sync, live = self.sequences.sync, list(self.sequences.manager.live.values())
        return await self._batcher.on_worker(lambda: sync.write_all(live))

    def snapshot(self) -> ModelSnapshot:
        """Its figures as they are now; safe from any thread."""
        sequences = None
        support = self.sequences
        if support is not None:
            counters = support.manager.counters
            arena = support.arena
            sequences = SequenceSnapshot(
                live=len(support.manager.live),
                capacity=support.manager.limit,
                state_bytes=arena.used * arena.bytes_per_slot,
                started=counters.started,
                ended=counters.ended,
                evicted_idle=counters.evicted_idle,
                evicted_unloaded=counters.evicted_unloaded,
                store_events=dict(support.sync.events),
            )
        return ModelSnapshot(
            self.name,
            self.version,
            self.state.value,
            self.runtime.provider,
            self.stats.snapshot(),
            sequences,
        )

    # ------------------------------------------------------------------ inference
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Run one request; its result. Raises the ServiceError that answers it.

        If the caller is cancelled before the request ran, it never runs.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        ticket = self.submit(request, functools.partial(_deliver, future))
        try:
            outcome = await future
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        if not isinstance(outcome, ServiceError):
            return outcome
        try:
            raise outcome
        finally:
            # The error's traceback holds this frame: its references to the error (the future
            # holds it too) would make a cycle holding the request's bytes until the cyclic
            # collector runs.
            del outcome, future, ticket

    def submit(self, request: InferenceRequest, on_outcome: OnOutcome) -> Ticket[Work]:
        """Check the request and queue its work; the ticket, to cancel it. `on_outcome` hears
        how it ended, once, on the event loop, and never inside this call.

        Raises the ServiceError that refuses the request (its checks failed), before anything
        is queued; RuntimeError once the model stopped. Synchronous on purpose: the requests of
        one sequence are queued in the order they arrive, whatever callers await in between.
        Call on the event loop.
        """
        try:
            work = self._plan(request, on_outcome)
        except ServiceError:
            self.stats.refused()
            raise
        sequence = work.sequence
        if sequence is not None and self.sequences is not None:
            self.sequences.manager.request_started(sequence)
            if work.end:
                self.sequences.manager.end(sequence)
        return self._batcher.submit(work)

    def _complete(
        self,
        batch: Sequence[Work],
        outcomes: Sequence[Executed | Exception],
        queue_s: Sequence[float],
        compute_s: float,
    ) -> None:
        """On the event loop, once per batch: release, count and answer each request."""
        now = time.perf_counter()
        ok = ok_ns = failed = failed_ns = 0
        ran = False
        for work, executed, waited in zip(batch, outcomes, queue_s, strict=True):
            answer: Outcome
            outcome, held = executed if isinstance(executed, Executed) else (executed, None)
            if isinstance(outcome, Ran):
                ran = True
                answer = InferenceResult(
                    self.name,
                    self.version,
                    outcome.outputs,
                    waited,
                    compute_s,
                    outcome.sequence_version,
                )
            else:
                answer = _service_error(outcome)
                ran = ran or isinstance(outcome, ServiceError)
            elapsed_ns = int((now - work.received) * 1e9)
            if isinstance(answer, ServiceError):
                failed, failed_ns = failed + 1, failed_ns + elapsed_ns
            else:
                ok, ok_ns = ok + 1, ok_ns + elapsed_ns
            self._release(work, isinstance(answer, ServiceError), held)
            try:
                work.on_outcome(answer)
            except Exception:  # one caller's failure must not stop the others
                logger.exception("answering a request to model %s failed", self.name)
        rows = sum(w.rows for w in batch) if ran else 0
        self.stats.completed(
            rows, int(compute_s * 1e9), int(sum(queue_s) * 1e9), (ok, ok_ns), (failed, failed_ns)
        )

    def _release(self, work: Work, failed: bool, held: bool | None) -> None:
        """Its sequence's bookkeeping after one request: `held` is what its execution reported
        of the slot (None when it never ran)."""
        sequence, support = work.sequence, self.sequences
        if sequence is None or support is None:
            return
        if held is not None:
            support.manager.reported(sequence, held)
        if failed and work.end and sequence.has_state:
            support.manager.revive(sequence)  # an END not applied did not end it
        if failed and not sequence.has_state and sequence.pending == 1:
            # Its state never reached the slot (a failed first step or load), and no request
            # of it is still queued (a START sent again after this one): drop it.
            support.manager.forget(sequence, "its first request failed")
        support.manager.request_finished(sequence)

    def _plan(self, request: InferenceRequest, on_outcome: OnOutcome) -> Work:
        """The request's work; raises the ServiceError that refuses it."""
        if self.state is not ModelState.READY and not request.sequence.id:
            raise ModelNotReady(f"model {self.name} version {self.version} is being unloaded")
        rows, time_steps = self._check_inputs(request.inputs)
        if self._index_bounds:
            self._check_indices(request.inputs)
        # NaN and infinity in the inputs are looked for per batch (BatchExecution), but for
        # an END's: one that failed there would still end its sequence, and its client could
        # not send it again with good values.
        if request.sequence.end:
            self._check_finite(request.inputs)
        outputs = self._check_outputs(request.outputs)
        if self._max_answer_bytes is not None:
            self._check_answer_size(rows, time_steps, outputs, len(request.id))
        inputs = {n: request.inputs[n] for n in self._inputs}
        received = request.received or time.perf_counter()
        control = request.sequence
        if control.id:
            return self._sequence_work(
                request, inputs, rows, time_steps, outputs, on_outcome, received
            )
        if control.start or control.end or control.expect_version is not None:
            raise InvalidArgument(
                "sequence_start, sequence_end and sequence_version need a sequence_id (a "
                "non-zero integer or a non-empty string) naming the sequence"
            )
        if not self.signature.states:
            return Work(inputs, rows, time_steps, outputs, on_outcome, received)
        missing = [n for n in self._state_inputs if n not in request.inputs]
        if missing:
            raise InvalidArgument(
                f"model {self.name} carries recurrent state: either send sequence_id with "
                f"sequence_start=true on a sequence's first request and let the server keep the "
                f"state, or send every state tensor yourself (missing: {', '.join(missing)})"
            )
        states = tuple(self._check_state(request.inputs[n], n, rows) for n in self._state_inputs)
        return Work(inputs, rows, time_steps, outputs, on_outcome, received, states=states)

    def _sequence_work(
        self,
        request: InferenceRequest,
        inputs: dict[str, np.ndarray],
        rows: int,
        time_steps: int,
        outputs: tuple[str, ...],
        on_outcome: OnOutcome,
        received: float,
    ) -> Work:
        control = request.sequence
        if self.sequences is None:
            raise InvalidArgument(
                f"model {self.name} is not streamable (a bidirectional or whole-sequence model "
                f"cannot carry state between requests); send each whole sequence in one request "
                f"without sequence_id"
            )
        given_states = [n for n in self._state_inputs if n in request.inputs]
        if given_states:
            raise InvalidArgument(
                f"request for sequence {control.id!r} also sends state tensors "
                f"({', '.join(given_states)}); with a sequence_id the server holds the state"
            )
        if rows != 1:
            raise InvalidArgument(
                f"a request in a sequence carries one sequence: its batch size must be 1, got "
                f"{rows}"
            )
        assert control.id is not None  # the caller checked
        manager = self.sequences.manager
        if control.start:
            if self.state is not ModelState.READY:
                raise ModelNotReady(
                    f"model {self.name} version {self.version} is being unloaded and takes no "
                    f"new sequences"
                )
            sequence, _ = manager.start(control.id, request.principal)
        else:
            sequence = manager.resume(control.id, request.principal)
        return Work(
            inputs,
            rows,
            time_steps,
            outputs,
            on_outcome,
            received,
            sequence=sequence,
            start=control.start,
            end=control.end,
            expect=control.expect_version,
        )

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Batch rows and time steps of the request, or InvalidArgument saying what is wrong."""
        # Requests come in few shapes (a stream repeats one); each is checked once.
        key = tuple((name, array.dtype.str, array.shape) for name, array in inputs.items())
        known = self._checked_inputs.get(key)
        if known is None:
            known = self._check_new_inputs(inputs)
            if len(self._checked_inputs) >= MAX_CHECKED_SHAPES:
                self._checked_inputs.clear()
            self._checked_inputs[key] = known
        return known

    def _check_new_inputs(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        unknown = [n for n in inputs if n not in self._inputs and n not in self._state_inputs]
        if unknown:
            raise InvalidArgument(
                f"model {self.name} has no input {', '.join(map(repr, unknown))}; its inputs "
                f"are {', '.join(self._inputs)}"
            )
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise InvalidArgument(f"model {self.name} needs input {', '.join(missing)}")
        rows = time_steps = -1
        for name, spec in self._inputs.items():
            array = inputs[name]
            self._check_tensor(array, spec)
            if rows == -1:
                rows, time_steps = array.shape[0], array.shape[1]
            elif array.shape[:2] != (rows, time_steps):
                raise InvalidArgument(
                    f"inputs disagree on batch and time axes: {name} is {list(array.shape)}"
                )
        if not 1 <= rows <= self.signature.max_batch_size:
            raise InvalidArgument(
                f"batch size {rows} is outside 1..{self.signature.max_batch_size} for model "
                f"{self.name}"
            )
        if not 1 <= time_steps <= self.max_steps:
            raise (TooManySteps if time_steps > self.max_steps else InvalidArgument)(
                f"a request to model {self.name} carries 1..{self.max_steps} time steps, got "
                f"{time_steps}"
            )
        return rows, time_steps

    def _warn_if_answers_cannot_fit(self) -> None:
        limit, outputs = self._max_answer_bytes, tuple(t.name for t in self.signature.outputs)
        if limit is None:
            return
        largest = self.answer_bytes(1, self.max_steps, outputs)
        if largest > limit:
            per_step = self.answer_bytes(1, 1, outputs) - self.answer_bytes(1, 0, outputs)
            fits = (limit - self.answer_bytes(1, 0, outputs)) // max(per_step, 1)
            logger.warning(
                "model %s version %d: a request of %d time steps (its most) would be answered "
                "with %d bytes, over --max-message-bytes %d; such requests are refused beyond "
                "%d time steps",
                self.name,
                self.version,
                self.max_steps,
                largest,
                limit,
                fits,
            )

    def answer_bytes(self, rows: int, time_steps: int, outputs: Sequence[str]) -> int:
        """The most bytes an answer of `rows` x `time_steps` with `outputs` takes on the wire."""
        sizes = self._answer_sizes
        per_row = sum(sizes[n][0] * time_steps + sizes[n][1] for n in outputs)
        return rows * per_row + ANSWER_OVERHEAD_BYTES

    def answer_bound(self) -> tuple[float, int]:
        """The most bytes an answer takes on the wire, as (per request byte, fixed): an answer
        to a request of n bytes takes at most `per * n + fixed`, whatever outputs it asks for.

        A request carries at least one byte per input element of each row and time step (a
        packed varint), so rows x time steps is at most its bytes over its elements per row
        and step; the echoed request id takes at most 4 bytes a character of its own. An input
        whose features are dynamic bounds nothing: the bound is then unbounded (inf).
        """
        elements = 0
        for spec in self.signature.inputs:
            features = spec.dims[1:]
            if any(d < 0 for d in features):
                return math.inf, ANSWER_OVERHEAD_BYTES
            elements += math.prod(features)
        per_row_and_step = sum(
            per_step + per_row for per_step, per_row in self._answer_sizes.values()
        )
        return per_row_and_step / max(elements, 1) + 4, ANSWER_OVERHEAD_BYTES

    def answer_bytes_of(self, request: InferenceRequest) -> int:
        """About how many bytes the answer to `request` takes on the wire, before the request
        is checked (0 for one whose inputs say nothing): for a stream's flow control."""
        first = next(iter(request.inputs.values()), None)
        if first is None or first.ndim < 2:
            return 0
        outputs = [n for n in request.outputs or self._default_outputs if n in self._answer_sizes]
        return self.answer_bytes(first.shape[0], first.shape[1], outputs)

    def _check_answer_size(
        self, rows: int, time_steps: int, outputs: tuple[str, ...], id_chars: int
    ) -> None:
        """AnswerTooLarge when the answer could not travel: known before the model runs, so a
        refused request changes no state (a stream would otherwise lose it after the fact)."""
        limit = self._max_answer_bytes
        assert limit is not None
        key = (rows, time_steps, outputs)
        size = self._answer_bytes_seen.get(key)
        if size is None:
            size = self.answer_bytes(rows, time_steps, outputs)
            if len(self._answer_bytes_seen) >= MAX_CHECKED_SHAPES:
                self._answer_bytes_seen.clear()
            self._answer_bytes_seen[key] = size
        size += 4 * id_chars  # the request id is echoed: up to 4 bytes a character in UTF-8
        if size <= limit:
            return
        per_step = rows * sum(self._answer_sizes[n][0] for n in outputs)
        fixed = self.answer_bytes(rows, 0, outputs) + 4 * id_chars
        fits = (limit - fixed) // per_step if per_step else 0
        raise AnswerTooLarge(
            f"the answer to this request ({rows} x {time_steps} time steps of "
            f"{', '.join(outputs)}) would take {size:,} bytes, over the server's largest "
            f"message of {limit:,} bytes (--max-message-bytes); send at most {max(fits, 0)} "
            f"time steps per request, or ask for fewer outputs"
        )

    def _check_indices(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InvalidArgument when an index-valued input (token ids) is outside its table."""
        for name, size in self._index_bounds.items():
            array = inputs[name]
            if array.size == 1:  # a stream's usual step: a Python comparison is cheapest
                if 0 <= array.item() < size:
                    continue
            elif not ((array < 0) | (array >= size)).any():
                continue
            low, high = int(array.min()), int(array.max())
            raise InvalidArgument(
                f"input {name} of model {self.name} takes values 0..{size - 1} (the size of the "
                f"table it indexes, e.g. a vocabulary), got {low if low < 0 else high}"
            )

    def _check_tensor(self, array: np.ndarray, spec: TensorSpec) -> None:
        if array.dtype != spec.dtype:
            raise InvalidArgument(
                f"input {spec.name} must be {spec.datatype}, got {wire_name_of(array.dtype)}"
            )
        expected = [-1, *spec.dims]
        shape = array.shape
        fits = len(shape) == len(expected) and all(
            e == -1 or e == s for e, s in zip(expected, shape, strict=True)
        )
        if not fits:
            shown = ["batch", *("T" if d == -1 else str(d) for d in spec.dims)]
            raise InvalidArgument(
                f"input {spec.name} must have shape [{', '.join(shown)}], got {list(shape)}"
            )

    def _check_finite(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InvalidArgument when an input that must be finite holds NaN or infinity."""
        for name in self._finite_inputs:
            if not all_finite(inputs[name]):
                raise non_finite_error(f"input {name} of model {self.name}", may_opt_in=True)

    def _check_state(self, array: np.ndarray, name: str, rows: int) -> np.ndarray:
        dims = next(s.dims for s in self.signature.states if s.input_name == name)
        if array.dtype != np.float32 or array.shape != (rows, *dims):
            raise InvalidArgument(
                f"state {name} must be FP32 of shape {[rows, *dims]}, got "
                f"{wire_name_of(array.dtype)}{list(array.shape)}"
            )
        # Refused even where the config allows non-finite inputs: it is a state.
        if not all_finite(array):
            raise non_finite_error(f"state {name} of model {self.name}")
        return array

    def _check_outputs(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in requested if n not in self._outputs]
        if unknown:
            raise InvalidArgument(
                f"model {self.name} has no output {', '.join(map(repr, unknown))}; its outputs "
                f"are {', '.join(sorted(self._outputs))}"
            )
        return requested or self._default_outputs


def _deliver(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _answer_sizes(signature: ModelSignature) -> dict[str, tuple[int, int]]:
    """Each output's bytes per batch row: (per time step, not per time step). A dynamic axis
    (-1) is the time axis; the states' outputs have none."""
    sizes: dict[str, tuple[int, int]] = {}
    for spec in signature.outputs:
        fixed = int(np.prod([d for d in spec.dims if d >= 0])) * spec.dtype.itemsize
        sizes[spec.name] = (fixed, 0) if -1 in spec.dims else (0, fixed)
    for state in signature.states:
        sizes[state.output_name] = (0, int(np.prod(state.dims)) * 4)
    return sizes


def _service_error(outcome: Exception) -> ServiceError:
    """The ServiceError that answers a request whose work did not run (see the batcher)."""
    if isinstance(outcome, ServiceError):
        return outcome
    if isinstance(outcome, Cancelled):
        return RequestCancelled("the request was cancelled before it ran; it was not applied")
    return InternalError()  # the batcher logged the failure with its traceback
