"""The GPU path: CUDA execution matches the CPU, and NVML figures reach /metrics.

Each test skips on a machine without what it needs (the GPU build of ONNX Runtime and a GPU, or
NVML and a driver), which is every machine CI runs on; run them on a GPU machine with
`pip install -e .[gpu,test]`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from rnnserve.metrics import Metrics
from rnnserve.runtime.onnx import PROVIDERS, EngineSettings, OnnxRuntime, Provider
from rnnserve.serving.model import Limits
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, SequenceControl
from tests.conftest import BUNDLED
from tests.serving.test_model import MODEL, VOCAB, reference

GPU_TOLERANCE = 1e-4
"""cuDNN and cuBLAS sum in another order than the CPU kernels."""


def _nvml_works() -> bool:
    try:
        import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]

        pynvml.nvmlInit()
        return bool(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no library, no driver or no GPU
        return False


needs_cuda = pytest.mark.skipif(
    PROVIDERS[Provider.CUDA] not in ort.get_available_providers(),
    reason="no CUDA execution provider (onnxruntime-gpu and a GPU)",
)


@needs_cuda
async def test_sequences_on_the_gpu_match_the_cpu() -> None:
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(provider=Provider.CUDA)),
        Limits(max_queue_delay_s=0.0),
    )
    await registry.load_all()
    model = registry.get(MODEL)
    assert model.runtime.provider == PROVIDERS[Provider.CUDA]
    tokens = np.random.default_rng(5).integers(0, VOCAB, size=(4, 6, 1), dtype=np.int64)
    try:
        for t in range(tokens.shape[1]):
            requests = [
                InferenceRequest(
                    MODEL,
                    {"tokens": tokens[s, t].reshape(1, 1)},
                    outputs=("logits",),
                    sequence=SequenceControl(s + 1, start=t == 0, end=t == tokens.shape[1] - 1),
                )
                for s in range(len(tokens))
            ]
            results = await asyncio.gather(*(model.infer(r) for r in requests))
            for s, result in enumerate(results):
                expected = reference(tokens[s])[t]
                np.testing.assert_allclose(
                    result.outputs["logits"], expected, atol=GPU_TOLERANCE, rtol=0
                )
    finally:
        await registry.stop()


@pytest.mark.skipif(not _nvml_works(), reason="no NVML, driver or GPU")
def test_gpu_figures_reach_the_metrics() -> None:
    text = generate_latest(Metrics(lambda: []).registry).decode()
    for name in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"):
        assert f'{name}{{gpu_uuid="' in text
