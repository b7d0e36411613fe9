"""The ONNX Runtime implementation of the Runtime protocol."""

from __future__ import annotations

import numpy as np

from rnnserve.runtime.onnx import EngineSettings, OnnxRuntime, Provider
from tests.conftest import BUNDLED

MODEL = "charlm_lstm"
TOLERANCE = 1e-5


def test_small_calls_run_on_a_single_threaded_twin_with_the_same_answers() -> None:
    path = BUNDLED / MODEL / "1" / "model.onnx"
    twin = OnnxRuntime(path, EngineSettings(Provider.CPU, intra_op_threads=2, parallel_min_work=8))
    alone = OnnxRuntime(path, EngineSettings(Provider.CPU, intra_op_threads=1, parallel_min_work=8))
    assert twin.parallel_min_work == 8 and twin.serial_session is not twin.session
    assert alone.parallel_min_work == 0 and alone.serial_session is alone.session
    rng = np.random.default_rng(3)
    feeds = {
        "tokens": rng.integers(0, 97, size=(4, 2), dtype=np.int64),
        "h_in": rng.standard_normal((4, 2, 256)).astype(np.float32),
        "c_in": rng.standard_normal((4, 2, 256)).astype(np.float32),
    }
    small, large, single = twin.run(feeds, work=1), twin.run(feeds), alone.run(feeds, work=1)
    for name in ("logits", "h_out", "c_out"):
        np.testing.assert_allclose(small[name], large[name], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(small[name], single[name], atol=TOLERANCE, rtol=0)
