"""ONNX Runtime, on the CUDA execution provider when the GPU build and a GPU are there."""

from __future__ import annotations

import enum
import logging
import os
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
        self, feeds: Mapping[str, np.ndarray], work: int | None = None
    ) -> dict[str, np.ndarray]:
        """Every output of one model call on `feeds`, by name.

        `feeds`: arrays by input name, [B, T, ...] (states [B, layers*directions, H]). A call
        of less `work` (rows x time steps) than `parallel_min_work` runs on the single-threaded
        session. Raises InvalidInput for ONNX Runtime's INVALID_ARGUMENT (values the model
        cannot take), and ONNX Runtime's other errors as they are.
        """
        small = work is not None and work < self.parallel_min_work
        run = self._serial_run if small else self._run
        try:
            results = run(self._output_names, feeds if type(feeds) is dict else dict(feeds), None)
        except _OrtInvalidArgument as error:
            raise InvalidInput(str(error).removeprefix("[ONNXRuntimeError] : 2 : ")) from error
        return dict(zip(self._output_names, results, strict=True))


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
