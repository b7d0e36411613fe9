"""ONNX Runtime, on the CUDA execution provider when the GPU build and a GPU are there."""

from __future__ import annotations

import enum
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.runtime.base import InvalidInput, TensorInfo

logger = logging.getLogger(__name__)

_DTYPES: dict[str, np.dtype[np.generic]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(bool)": np.dtype(np.bool_),
}


def quiet_process_logger() -> None:
    """Make ONNX Runtime's process-wide logger report fatal errors only, as each session's
    does: its warnings (GPU device discovery or CUDA provider probing in a container, say) are
    coloured lines on stderr, past --log-format json, the first a container logs. Call it
    before the first session; a failure is raised, and reported by whoever handles it."""
    ort.set_default_logger_severity(4)


class Provider(enum.Enum):
    """Which execution provider a model runs on."""

    AUTO = "auto"
    """CUDA when the GPU build of ONNX Runtime and a GPU are there, else the CPU."""
    CPU = "cpu"
    CUDA = "cuda"


_OrtInvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument

PROVIDERS = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider"}
"""ONNX Runtime's name of each execution provider."""


class Spinning(enum.Enum):
    """Whether ONNX Runtime's threads busy-wait for work."""

    NEVER = "never"
    DURING_RUN = "during-run"
    """While a model call runs; they stop as it returns."""
    ALWAYS = "always"
    """ONNX Runtime's own default: idle threads burn CPU between calls too."""

    @classmethod
    def _missing_(cls, value: object) -> Spinning | None:
        # The numbers earlier releases took (--ort-spinning 0, 1, 2).
        return {"0": cls.NEVER, "1": cls.DURING_RUN, "2": cls.ALWAYS}.get(str(value))


@dataclass(frozen=True)
class EngineSettings:
    """How ONNX Runtime runs every model of the server."""

    provider: Provider = Provider.AUTO
    intra_op_threads: int | None = None
    """Threads inside one operator; None lets ONNX Runtime choose."""
    inter_op_threads: int | None = None
    """Threads across operators; None lets ONNX Runtime choose."""
    spinning: Spinning = Spinning.ALWAYS
    parallel_min_work: int = 0
    """On the CPU with several intra-op threads, calls of less work than this (rows x time
    steps, the `work` given to `run`) run on a second, single-threaded session. 0: none do."""


def choose_provider(wanted: Provider) -> str:
    """ONNX Runtime's name of the provider to ask for; RuntimeError when it is not built in."""
    available = ort.get_available_providers()
    cuda, cpu = PROVIDERS[Provider.CUDA], PROVIDERS[Provider.CPU]
    if wanted is Provider.AUTO:
        return cuda if cuda in available else cpu
    provider = PROVIDERS[wanted]
    if provider not in available:
        raise RuntimeError(
            f"execution provider {provider} is not available in this onnxruntime build "
            f"(available: {', '.join(available)}); install rnnserve[gpu] on a GPU machine"
        )
    return provider


class OnnxRuntime:
    """One model file. A small call may run on a single-threaded twin of the session.

    Splitting a small call across threads costs more CPU in hand-offs and waiting than it saves
    in time: on the 2-core benchmark machine, where gRPC and the event loop want the other core,
    a 30-row LSTM step ran 17% more steps per second single-threaded, while 32 rows x 32 steps
    ran 20% fewer. The twin costs a second copy of the weights, small for recurrent models.

    A call made `alone` (nothing else waits for the CPU) wants the answer soonest, whatever the
    CPU: below `parallel_min_work` it runs on whichever session has been the faster for calls
    of its size, as measured on those calls (`FasterSession`); larger ones stay on the parallel
    session, so the twin's memory arena grows no larger than before. Which one is faster
    depends on the model, not on the work alone: on that machine one sequence's 32 steps of
    charlm_lstm (hidden 256) took 0.77 ms on two threads and 1.02 ms on one, while sensor_gru
    (hidden 64) took 0.11 ms on two and 0.09 on one.
    """

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        self.session = self._open(path, settings, settings.intra_op_threads)
        # What ONNX Runtime runs on, which is not always what was asked for.
        self.provider = self.session.get_providers()[0]
        self.inputs: Sequence[TensorInfo] = [self._info(a) for a in self.session.get_inputs()]
        self.outputs: Sequence[TensorInfo] = [self._info(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.index_bounds: Mapping[str, int] = index_bounds(path)
        threads = settings.intra_op_threads or _usable_cores()
        self.parallel_min_work = 0
        self.serial_session = self.session
        cpu = PROVIDERS[Provider.CPU]
        if settings.parallel_min_work > 0 and threads > 1 and self.provider == cpu:
            self.parallel_min_work = settings.parallel_min_work
            self.serial_session = self._open(path, settings, 1)
        self._run = _fast_run(self.session)
        self._serial_run = _fast_run(self.serial_session)
        self._faster = FasterSession() if self.serial_session is not self.session else None

    @staticmethod
    def _open(path: Path, settings: EngineSettings, threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice
        options.inter_op_num_threads = settings.inter_op_threads or 0
        # Fatal only: a failed call raises, and is reported once, by whoever handles it (ONNX
        # Runtime's own error lines go to stderr unformatted, past --log-format json).
        options.log_severity_level = 4
        spin = "0" if settings.spinning is Spinning.NEVER else "1"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if settings.spinning is Spinning.DURING_RUN:
            # Spinning inside a call saves a thread wake-up per parallel section (an LSTM
            # call has several per time step); spinning between calls burns the CPU that
            # gRPC and the event loop need.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(
            str(path), options, providers=[choose_provider(settings.provider)]
        )

    @staticmethod
    def _info(arg: ort.NodeArg) -> TensorInfo:
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise RuntimeError(f"tensor {arg.name} has unsupported type {arg.type}")
        return TensorInfo(arg.name, dtype, tuple(arg.shape))

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        """Every output of one model call on `feeds`, by name.

        `feeds`: arrays by input name, [B, T, ...] (states [B, layers*directions, H]). A call
        of less `work` (rows x time steps) than `parallel_min_work` runs on the single-threaded
        session, unless it is made `alone`: then on the session measured faster for its work
        (larger calls stay on the parallel one, so the single-threaded session's memory arena
        never grows past the calls it ran before).
        Raises InvalidInput for ONNX Runtime's INVALID_ARGUMENT (values the model cannot take),
        and ONNX Runtime's other errors as they are.
        """
        if type(feeds) is not dict:
            feeds = dict(feeds)
        small = work is not None and work < self.parallel_min_work
        try:
            if alone and small and work is not None and self._faster is not None:
                size = work.bit_length()
                parallel = self._faster.pick(size)
                started = time.perf_counter()
                try:
                    results = (self._run if parallel else self._serial_run)(
                        self._output_names, feeds, None
                    )
                except BaseException:
                    self._faster.record(size, parallel, None)
                    raise
                self._faster.record(size, parallel, time.perf_counter() - started)
            else:
                results = (self._serial_run if small else self._run)(
                    self._output_names, feeds, None
                )
        except _OrtInvalidArgument as error:
            raise InvalidInput(str(error).removeprefix("[ONNXRuntimeError] : 2 : ")) from error
        return dict(zip(self._output_names, results, strict=True))


class FasterSession:
    """Which of two sessions (single-threaded, parallel) answers calls of a size sooner.

    Sizes are classes of work (rows x time steps) by bit length: 1, 2-3, 4-7, 8-15, ... Each
    session's time for a size is the median of its last `SAMPLES` calls of that size, so one
    slow call (a preemption) does not decide. A call counts only when the call before it ran on
    the same session: the first after a switch finds the other session's weights in the cache
    and its own evicted, which would make whichever runs less often look slower than it is
    (after `MAX_UNCOUNTED` such calls of a size in a row, the next counts anyway, so sizes that
    take turns with each other still get known). Until both are known, each runs calls in a
    row until it has `SAMPLES`. Then the faster runs them, the parallel one only when `MARGIN`
    faster (it takes about half as much CPU again), and every `RECHECK`-th call starts `TRIAL`
    calls on the other, so a change is seen (0.3% of calls, which stay out of a p99 of the
    requests). One caller at a time per instance: a model runs one batch at a time.
    """

    SAMPLES = 5
    RECHECK = 1024
    TRIAL = 3
    MARGIN = 0.9
    MAX_UNCOUNTED = 2

    __slots__ = ("_sizes", "_last")

    def __init__(self) -> None:
        self._sizes: dict[int, _Timings] = {}
        self._last: bool | None = None

    def pick(self, size: int) -> bool:
        """Whether the next call of `size` runs on the parallel session."""
        known = self._sizes.get(size)
        if known is None:
            known = self._sizes[size] = _Timings(self.SAMPLES)
        if known.trial:
            known.trial -= 1
            return known.trial_parallel
        if len(known.serial) < self.SAMPLES:
            return False
        if len(known.parallel) < self.SAMPLES:
            return True
        known.calls += 1
        faster = known.parallel_faster(self.MARGIN)
        if known.calls % self.RECHECK == 0:
            known.trial, known.trial_parallel = self.TRIAL - 1, not faster
            return not faster
        return faster

    def record(self, size: int, parallel: bool, seconds: float | None) -> None:
        """A call of `size` took `seconds` (wall) on the parallel session or the other; None:
        it failed, and tells nothing of the session's speed."""
        known = self._sizes[size]
        if seconds is not None:
            if self._last is parallel or known.uncounted >= self.MAX_UNCOUNTED:
                (known.parallel if parallel else known.serial).append(seconds)
                known.uncounted = 0
            else:
                known.uncounted += 1
        self._last = parallel

    def faster(self, size: int) -> bool | None:
        """Whether calls of `size` run on the parallel session; None until both are known."""
        known = self._sizes.get(size)
        if known is None or min(len(known.serial), len(known.parallel)) < self.SAMPLES:
            return None
        return known.parallel_faster(self.MARGIN)


class _Timings:
    """One size's recent call times on each session (seconds), and where its trial stands."""

    __slots__ = ("serial", "parallel", "calls", "trial", "trial_parallel", "uncounted")

    def __init__(self, samples: int) -> None:
        self.serial: deque[float] = deque(maxlen=samples)
        self.parallel: deque[float] = deque(maxlen=samples)
        self.calls = 0
        self.trial = 0
        """Calls still to run on the slower session before the faster takes over again."""
        self.trial_parallel = False
        self.uncounted = 0
        """Calls of this size in a row not counted (each came right after a switch)."""

    def parallel_faster(self, margin: float) -> bool:
        return (
            bool(self.parallel)
            and bool(self.serial)
            and (_median(self.parallel) < margin * _median(self.serial))
        )


def _median(samples: deque[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _fast_run(session: ort.InferenceSession) -> Callable[..., list[np.ndarray]]:
    """`session`'s call as `run(output_names, feeds, run_options)`.

    On the CPU, the binding's own `run`: `InferenceSession.run` first checks the feeds' names
    against the graph, which `ServedModel` has done once per request shape, and that check
    cost 14 us of a 33 us call of sensor_gru (a lone sequence's step) on the 2-core benchmark
    machine. Elsewhere the public call, whose fallback to the CPU on a provider's failure the
    binding lacks; and wherever a release of ONNX Runtime no longer has `_sess`.
    """
    run: Callable[..., list[np.ndarray]] = session.run
    binding = getattr(session, "_sess", None)
    if session.get_providers()[0] == PROVIDERS[Provider.CPU] and callable(
        getattr(binding, "run", None)
    ):
        run = binding.run  # type: ignore[union-attr]
    return run


def index_bounds(path: Path) -> dict[str, int]:
    """Graph inputs used as the indices of a Gather from a constant table (an embedding), with
    the table's size along the gathered axis; valid values are 0..size-1.

    ONNX's Gather also takes negative indices, counting from the end (onnx.ai Operators:
    Gather), which for token ids only hides a client's mistake; they are refused too.
    """
    import onnx  # at load only: its protobuf parse of the graph, without the weights' data

    graph = onnx.load(str(path), load_external_data=False).graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    bounds: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        table, indices = node.input[0], node.input[1]
        if table not in tables or indices not in inputs:
            continue
        dims = tables[table]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        size = dims[axis] if -len(dims) <= axis < len(dims) else 0
        if size > 0:
            bounds[indices] = min(size, bounds.get(indices, size))
    return bounds


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
