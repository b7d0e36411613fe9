"""One loaded model version: its graph, its state arena, its sequences and its batcher."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.batching.batcher import SequenceBatcher, Step
from rnnserve.errors import InvalidArgument, InvalidModelRepository, ModelNotReady
from rnnserve.repository.signature import (
    ModelSignature,
    TensorSpec,
    signature_of,
    wire_name_of,
)
from rnnserve.runtime.base import Runtime
from rnnserve.serving.request import InferenceRequest, InferenceResult
from rnnserve.sessions.arena import StateArena
from rnnserve.sessions.manager import SequenceManager
from rnnserve.sessions.store import Durability, MemoryStore, StateStore
from rnnserve.sessions.sync import StateSync

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class Limits:
    """Per-model limits; zero or negative values defer to the model's config.pbtxt."""

    max_sequences: int = 0
    idle_timeout_s: float = 0.0
    max_queue_delay_s: float = -1.0
    max_steps_per_request: int = 0
    inline_max_steps: int = 1
    """A lone sequence's batches of at most this many rows x time steps run on the event loop
    (0: none)."""


DEFAULT_MAX_STEPS = 4096
MAX_CHECKED_SHAPES = 1024
"""Input shapes a model remembers as checked."""


def _config_int(config: mc.ModelConfig, key: str) -> int:
    """An integer from the config's `parameters`, 0 when absent."""
    if key not in config.parameters:
        return 0
    text = config.parameters[key].string_value
    if not text.isdigit():
        raise InvalidModelRepository(
            f"model {config.name}: parameter {key} must be a whole number, got {text!r}"
        )
    return int(text)


@dataclass
class Statistics:
    """Cumulative figures for ModelStatistics, in Triton's terms (durations in ns)."""

    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)
    """batch size -> [count, compute ns]."""


BatchHook = Callable[["ServedModel", Sequence[Step], float], None]


class ServedModel:
    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        path: Path,
        runtime: Runtime,
        limits: Limits,
        on_batch: BatchHook | None = None,
        store: StateStore | None = None,
        durability: Durability = Durability.STEP,
    ) -> None:
        self.name = name
        self.version = version
        self.labels = (name, str(version))
        """Its metric labels: model and version."""
        self.config = config
        self.path = path
        self.runtime = runtime
        self.limits = limits
        self.signature: ModelSignature = signature_of(config, runtime)
        sig = self.signature
        self.idle_timeout_s = limits.idle_timeout_s or sig.idle_timeout_s
        self.max_steps = (
            limits.max_steps_per_request
            or _config_int(config, "max_steps_per_request")
            or DEFAULT_MAX_STEPS
        )
        capacity = limits.max_sequences or sig.max_sequences
        self.arena = StateArena([s.dims for s in sig.states], capacity) if sig.streamable else None
        store = store if store is not None else MemoryStore()
        self.sync = (
            StateSync(store, durability, name, version, self.arena, self.idle_timeout_s)
            if self.arena is not None
            else None
        )
        self.sequences = (
            SequenceManager(
                f"{name} (version {version})", self.arena, self.idle_timeout_s, store.shared
            )
            if self.arena is not None
            else None
        )
        delay = limits.max_queue_delay_s if limits.max_queue_delay_s >= 0 else sig.queue_delay_s
        self.stats = Statistics()
        self._on_batch = on_batch
        self.batcher = SequenceBatcher(
            f"{name}-{version}",
            runtime,
            sig.states,
            self.arena,
            sig.max_batch_size,
            delay,
            observer=self._batch_done,
            sync=self.sync,
            inline_max_steps=limits.inline_max_steps,
            lone=lambda: self.sequences is not None and len(self.sequences.live) <= 1,
        )
        self.state = ModelState.READY
        self._inputs = {t.name: t for t in sig.inputs}
        self._state_inputs = [s.input_name for s in sig.states]
        self._outputs = {t.name for t in sig.outputs} | {s.output_name for s in sig.states}
        self._default_outputs = tuple(t.name for t in sig.outputs)
        self._checked_inputs: dict[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[int, int]]
        self._checked_inputs = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        self.state = ModelState.UNAVAILABLE
        await self.batcher.stop()

    @property
    def live_sequences(self) -> int:
        return len(self.sequences.live) if self.sequences is not None else 0

    @property
    def state_bytes(self) -> int:
        return self.arena.used * self.arena.bytes_per_slot if self.arena is not None else 0

    def holds(self, sequence_id: object) -> bool:
        return self.sequences is not None and sequence_id in self.sequences.live

    @property
    def busy(self) -> bool:
        """Steps are queued or running."""
        return self.batcher.busy

    async def announce(self, ttl_s: float) -> int:
        """Mark in the state store the states `flush` is about to write (shutdown)."""
        if self.sync is None or self.sequences is None:
            return 0
        sync, live = self.sync, list(self.sequences.live.values())
        return await self.batcher.on_worker(lambda: sync.announce(live, ttl_s))

    async def flush(self) -> int:
        """Write every live state to the state store where durability asks (shutdown)."""
        if self.sync is None or self.sequences is None:
            return 0
        sync, live = self.sync, list(self.sequences.live.values())
        return await self.batcher.on_worker(lambda: sync.flush(live))

    # ------------------------------------------------------------------ inference
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: Step) -> None:
            if not done.done():
                done.set_result(None)

        step = self.submit(request, wake)
        try:
            await done
        except BaseException:
            step.abandoned = True
            self._release(step, failed=True)
            raise
        return self.finish(step)

    def submit(self, request: InferenceRequest, on_done: Callable[[Step], None]) -> Step:
        """Check the request and queue its step; `on_done(step)` is called once it ran.

        `on_done` runs on the event loop and should call `finish`. Synchronous on purpose: the
        steps of one sequence are queued in the order their requests arrive, whatever callers
        await in between.
        """
        try:
            if self.state is not ModelState.READY and not request.sequence.id:
                raise ModelNotReady(f"model {self.name} version {self.version} is being unloaded")
            rows, steps = self._check_inputs(request.inputs)
            outputs = self._check_outputs(request.outputs)
            model_inputs = {n: request.inputs[n] for n in self._inputs}
            step = self._plan(request, model_inputs, rows, steps, outputs)
        except Exception:
            self.stats.fail_count += 1
            raise
        step.on_done = on_done
        sequence = step.sequence
        if sequence is not None:
            sequence.pending += 1
            if request.sequence.end:
                self.sequences.end(sequence)  # type: ignore[union-attr]
        self.batcher.submit(step)
        return step

    def finish(self, step: Step) -> InferenceResult:
        """Release what the step held; its result, or its error raised."""
        outputs = step.result
        self._release(step, failed=outputs is None)
        if step.error is not None:
            raise step.error
        if outputs is None:
            raise asyncio.CancelledError("the step was abandoned before it ran")
        result = InferenceResult(self.name, self.version, outputs, step.queue_s, step.compute_s)
        if step.sequence is not None:
            result.extra["sequence_version"] = step.version
        return result

    def _release(self, step: Step, failed: bool) -> None:
        sequence = step.sequence
        if sequence is not None:
            if failed and not sequence.held:
                # Its state never reached the slot (a failed first step or load): drop it.
                self.sequences.forget(sequence, "its first request failed")  # type: ignore[union-attr]
            self.sequences.step_finished(sequence)  # type: ignore[union-attr]
        elapsed_ns = int((time.perf_counter() - step.enqueued) * 1e9)
        stats = self.stats
        if failed:
            stats.fail_count += 1
            stats.fail_ns += elapsed_ns
        else:
            stats.success_count += 1
            stats.success_ns += elapsed_ns

    def _plan(
        self,
        request: InferenceRequest,
        inputs: dict[str, np.ndarray],
        rows: int,
        steps: int,
        outputs: tuple[str, ...],
    ) -> Step:
        control = request.sequence
        given_states = [n for n in self._state_inputs if n in request.inputs]
        if control.id:
            return self._sequence_step(request, inputs, rows, steps, outputs, given_states)
        if control.start or control.end or control.expect_version is not None:
            raise InvalidArgument(
                "sequence_start, sequence_end and sequence_version need a sequence_id (a "
                "non-zero integer or a non-empty string) naming the sequence"
            )
        if not self.signature.states:
            return Step(inputs, rows, steps, outputs)
        if len(given_states) != len(self._state_inputs):
            missing = [n for n in self._state_inputs if n not in request.inputs]
            raise InvalidArgument(
                f"model {self.name} carries recurrent state: either send sequence_id with "
                f"sequence_start=true on a sequence's first request and let the server keep the "
                f"state, or send every state tensor yourself (missing: {', '.join(missing)})"
            )
        states = [self._check_state(request.inputs[n], n, rows) for n in self._state_inputs]
        return Step(inputs, rows, steps, outputs, states=states)

    def _sequence_step(
        self,
        request: InferenceRequest,
        inputs: dict[str, np.ndarray],
        rows: int,
        steps: int,
        outputs: tuple[str, ...],
        given_states: list[str],
    ) -> Step:
        if self.sequences is None:
            raise InvalidArgument(
                f"model {self.name} is not streamable (a bidirectional or whole-sequence model "
                f"cannot carry state between requests); send each whole sequence in one request "
                f"without sequence_id"
            )
        if given_states:
            raise InvalidArgument(
                f"request for sequence {request.sequence.id!r} also sends state tensors "
                f"({', '.join(given_states)}); with a sequence_id the server holds the state"
            )
        if rows != 1:
            raise InvalidArgument(
                f"a request in a sequence carries one sequence: its batch size must be 1, got "
                f"{rows}"
            )
        control = request.sequence
        if control.start:
            if self.state is not ModelState.READY:
                raise ModelNotReady(
                    f"model {self.name} version {self.version} is being unloaded and takes no "
                    f"new sequences"
                )
            sequence, _ = self.sequences.start(control.id)  # type: ignore[arg-type]
        else:
            sequence = self.sequences.resume(control.id)  # type: ignore[arg-type]
        return Step(
            inputs,
            rows,
            steps,
            outputs,
            sequence=sequence,
            start=control.start,
            end=control.end,
            expect=control.expect_version,
        )

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[int, int]:
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

    def _check_new_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[int, int]:
        unknown = [n for n in inputs if n not in self._inputs and n not in self._state_inputs]
        if unknown:
            raise InvalidArgument(
                f"model {self.name} has no input {', '.join(map(repr, unknown))}; its inputs "
                f"are {', '.join(self._inputs)}"
            )
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise InvalidArgument(f"model {self.name} needs input {', '.join(missing)}")
        rows = steps = -1
        for name, spec in self._inputs.items():
            array = inputs[name]
            self._check_tensor(array, spec)
            if rows == -1:
                rows, steps = array.shape[0], array.shape[1]
            elif array.shape[:2] != (rows, steps):
                raise InvalidArgument(
                    f"inputs disagree on batch and time axes: {name} is {list(array.shape)}"
                )
        if not 1 <= rows <= self.signature.max_batch_size:
            raise InvalidArgument(
                f"batch size {rows} is outside 1..{self.signature.max_batch_size} for model "
                f"{self.name}"
            )
        if not 1 <= steps <= self.max_steps:
            raise InvalidArgument(
                f"a request to model {self.name} carries 1..{self.max_steps} time steps, got "
                f"{steps}"
            )
        return rows, steps

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

    def _check_state(self, array: np.ndarray, name: str, rows: int) -> np.ndarray:
        dims = next(s.dims for s in self.signature.states if s.input_name == name)
        if array.dtype != np.float32 or array.shape != (rows, *dims):
            raise InvalidArgument(
                f"state {name} must be FP32 of shape {[rows, *dims]}, got "
                f"{wire_name_of(array.dtype)}{list(array.shape)}"
            )
        return array

    def _check_outputs(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in requested if n not in self._outputs]
        if unknown:
            raise InvalidArgument(
                f"model {self.name} has no output {', '.join(map(repr, unknown))}; its outputs "
                f"are {', '.join(sorted(self._outputs))}"
            )
        return requested or self._default_outputs

    def _batch_done(self, batch: Sequence[Step], compute_s: float) -> None:
        stats = self.stats
        rows = sum(s.rows for s in batch)
        compute_ns = int(compute_s * 1e9)
        stats.inference_count += rows
        stats.execution_count += 1
        stats.compute_ns += compute_ns * len(batch)
        stats.queue_ns += int(sum(s.queue_s for s in batch) * 1e9)
        stats.last_inference_ms = int(time.time() * 1000)
        per_size = stats.batches.setdefault(rows, [0, 0])
        per_size[0] += 1
        per_size[1] += compute_ns
        if self._on_batch is not None:
            self._on_batch(self, batch, compute_s)

    # ------------------------------------------------------------------ unloading
    async def drain(self, grace_s: float) -> None:
        """Take no new sequences; let live ones run up to `grace_s`, then end the rest."""
        self.state = ModelState.UNLOADING
        deadline = time.monotonic() + grace_s
        while self.live_sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.sequences is not None:
            for sequence in list(self.sequences.live.values()):
                self.sequences.evict(
                    sequence,
                    f"version {self.version} of model {self.name} was unloaded",
                    reason="unloaded",
                )
        await self.stop()
