"""ONNX Runtime, on the CUDA execution provider when the GPU build and a GPU are there."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.runtime.base import TensorInfo

logger = logging.getLogger(__name__)

_DTYPES: dict[str, np.dtype[np.generic]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(bool)": np.dtype(np.bool_),
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SPIN_NEVER, SPIN_DURING_RUN, SPIN_ALWAYS = 0, 1, 2


@dataclass(frozen=True)
class EngineSettings:
    provider: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    intra_op_threads: int = 0
    """Threads inside one operator; 0 lets ONNX Runtime choose."""
    inter_op_threads: int = 0
    spinning: int = SPIN_ALWAYS
    """Whether ONNX Runtime's threads busy-wait for work: SPIN_NEVER, SPIN_DURING_RUN (while a
    model call runs; they stop as it returns) or SPIN_ALWAYS (ONNX Runtime's own default)."""
    parallel_min_work: int = 0
    """On the CPU with several intra-op threads, calls of less work than this (rows x time
    steps, the `work` given to `run`) run on a second, single-threaded session. 0: none do."""


def choose_provider(wanted: str) -> str:
    available = ort.get_available_providers()
    if wanted == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
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
        threads = settings.intra_op_threads or _usable_cores()
        self.parallel_min_work = 0
        self.serial_session = self.session
        if settings.parallel_min_work > 0 and threads > 1 and self.provider == PROVIDERS["cpu"]:
            self.parallel_min_work = settings.parallel_min_work
            self.serial_session = self._open(path, settings, 1)

    @staticmethod
    def _open(path: Path, settings: EngineSettings, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.log_severity_level = 3
        spin = "0" if settings.spinning == SPIN_NEVER else "1"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if settings.spinning == SPIN_DURING_RUN:
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
        small = work is not None and work < self.parallel_min_work
        session = self.serial_session if small else self.session
        results = session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results, strict=True))


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
