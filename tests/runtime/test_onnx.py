"""The ONNX Runtime implementation of the Runtime protocol."""

from __future__ import annotations

import numpy as np

from rnnserve.runtime.onnx import EngineSettings, FasterSession, OnnxRuntime, Provider
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


def test_a_call_made_alone_runs_on_the_session_measured_faster_for_its_size() -> None:
    faster = FasterSession()
    size = 6  # work 32..63
    taken: list[bool] = []

    def call(serial_s: float, parallel_s: float) -> None:
        taken.append(faster.pick(size))
        faster.record(size, taken[-1], parallel_s if taken[-1] else serial_s)

    # Each runs SAMPLES + 1 calls in a row (the first after a switch is not counted).
    for _ in range(2 * (FasterSession.SAMPLES + 1)):
        call(0.001, 0.002)
    assert taken == [False] * 6 + [True] * 6
    assert faster.faster(size) is False and faster.faster(size + 1) is None
    # The single-threaded one runs them, but for one trial of the other per RECHECK calls.
    taken.clear()
    for _ in range(2 * (FasterSession.RECHECK + FasterSession.TRIAL - 1)):
        call(0.001, 0.002)
    assert taken.count(True) == 2 * FasterSession.TRIAL
    first = FasterSession.RECHECK - 1
    assert taken[first : first + FasterSession.TRIAL + 1] == [True] * FasterSession.TRIAL + [False]
    # The parallel one becomes faster, but not by MARGIN: the cheaper one stays.
    taken.clear()
    for _ in range(3 * FasterSession.RECHECK):
        call(0.001, 0.001 * (FasterSession.MARGIN + 0.05))
    assert faster.faster(size) is False
    # Now by more: seen at the next trials, and it takes over.
    for _ in range(3 * FasterSession.RECHECK):
        call(0.001, 0.0005)
    assert faster.faster(size) is True and taken[-10:] == [True] * 10


def test_calls_made_alone_answer_as_the_others_do_on_either_session() -> None:
    path = BUNDLED / MODEL / "1" / "model.onnx"
    twin = OnnxRuntime(path, EngineSettings(Provider.CPU, intra_op_threads=2, parallel_min_work=64))
    rng = np.random.default_rng(4)
    feeds = {
        "tokens": rng.integers(0, 97, size=(1, 32), dtype=np.int64),
        "h_in": rng.standard_normal((1, 2, 256)).astype(np.float32),
        "c_in": rng.standard_normal((1, 2, 256)).astype(np.float32),
    }
    expected = twin.run(feeds)
    assert twin._faster is not None
    for _ in range(2 * (FasterSession.SAMPLES + 1)):
        answer = twin.run(feeds, work=32, alone=True)
        for name in ("logits", "h_out", "c_out"):
            np.testing.assert_allclose(answer[name], expected[name], atol=TOLERANCE, rtol=0)
    # Both sessions ran it, and one of them is now known as the faster for its size.
    assert twin._faster.faster((32).bit_length()) is not None
    # A call of parallel_min_work or more stays on the parallel session, alone or not: the
    # single-threaded one's memory arena never grows for it.
    twin.run({**feeds, "tokens": np.zeros((1, 64), np.int64)}, work=64, alone=True)
    assert twin._faster.faster((64).bit_length()) is None


def test_sizes_that_take_turns_on_different_sessions_still_get_known() -> None:
    faster = FasterSession()
    # Size 1 is known: the single-threaded session is its faster.
    for _ in range(2 * (FasterSession.SAMPLES + 1)):
        parallel = faster.pick(1)
        faster.record(1, parallel, 0.002 if parallel else 0.001)
    assert faster.faster(1) is False
    # Calls of size 6 (unknown) and size 1 alternate: each call of one follows a call of the
    # other, on the other session, and would never count if a switch always voided a call.
    for _ in range(50):
        for size in (6, 1):
            parallel = faster.pick(size)
            faster.record(size, parallel, 0.0005 if parallel else 0.001)
    assert faster.faster(6) is True and faster.faster(1) is False


def test_a_failed_call_is_not_counted() -> None:
    faster = FasterSession()
    parallel = faster.pick(3)
    for _ in range(10):
        faster.record(3, parallel, None)
    assert faster.faster(3) is None and faster.pick(3) is parallel
