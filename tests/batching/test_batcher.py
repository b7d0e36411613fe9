"""The sequence batcher against ONNX Runtime run step by step, whichever way a batch runs.

Sequences are stepped together, so their steps share batches: rows gathered from the arena,
restarts from zero, and requests that bring their own state, mixed. The answers must match
each sequence run alone, whether batches run on the worker thread, on the event loop, or both.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.runtime.onnx import SPIN_NEVER, EngineSettings, OnnxRuntime
from rnnserve.serving.model import Limits, ServedModel
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, SequenceControl
from tests.conftest import BUNDLED

MODEL = "charlm_lstm"
VOCAB = 97
TOLERANCE = 1e-5


def reference(tokens: np.ndarray, restart_at: int | None = None) -> list[np.ndarray]:
    """Each step's logits for one sequence, run alone and in order."""
    session = ort.InferenceSession(str(BUNDLED / MODEL / "1" / "model.onnx"))
    h = np.zeros((1, 2, 256), np.float32)
    c = np.zeros((1, 2, 256), np.float32)
    out = []
    for t, token in enumerate(tokens):
        if t == restart_at:
            h, c = np.zeros_like(h), np.zeros_like(c)
        logits, h, c = session.run(
            ["logits", "h_out", "c_out"], {"tokens": token.reshape(1, -1), "h_in": h, "c_in": c}
        )
        out.append(logits)
    return out


async def served(inline_max_steps: int) -> tuple[ModelRegistry, ServedModel]:
    registry = ModelRegistry(
        BUNDLED,
        lambda path: OnnxRuntime(path, EngineSettings(provider="cpu", spinning=SPIN_NEVER)),
        Limits(max_queue_delay_s=0.0, inline_max_steps=inline_max_steps),
    )
    await registry.load_all()
    return registry, registry.get(MODEL)


@pytest.mark.parametrize("inline_max_steps", [0, 1, 100_000])
def test_batched_steps_match_each_sequence_alone(inline_max_steps: int) -> None:
    asyncio.run(step_sequences_together(inline_max_steps))


async def step_sequences_together(inline_max_steps: int) -> None:
    rng = np.random.default_rng(7)
    sequences, length, steps = 6, 5, 3
    tokens = rng.integers(0, VOCAB, size=(sequences, length, steps), dtype=np.int64)
    restart = {2: 3}  # sequence 2 starts again at its fourth request
    expected = [reference(tokens[s], restart.get(s)) for s in range(sequences)]
    registry, model = await served(inline_max_steps)
    # On even rounds, a request that brings its own (zero) state, two rows of it, rides along.
    own = rng.integers(0, VOCAB, size=(2, steps), dtype=np.int64)
    own_expected = np.concatenate([reference(own[r : r + 1])[0] for r in range(2)])
    zeros = np.zeros((2, 2, 256), np.float32)
    try:
        for t in range(length):
            requests = [
                InferenceRequest(
                    MODEL,
                    {"tokens": tokens[s, t].reshape(1, steps)},
                    outputs=("logits",),
                    sequence=SequenceControl(
                        1000 + s, start=t == 0 or restart.get(s) == t, end=t == length - 1
                    ),
                )
                for s in range(sequences)
            ]
            if t % 2 == 0:
                requests.append(
                    InferenceRequest(
                        MODEL, {"tokens": own, "h_in": zeros, "c_in": zeros}, ("logits",)
                    )
                )
            results = await asyncio.gather(*(model.infer(r) for r in requests))
            for s in range(sequences):
                got = results[s].outputs["logits"]
                assert got.shape == (1, steps, VOCAB)
                np.testing.assert_allclose(got, expected[s][t], atol=TOLERANCE, rtol=0)
            if t % 2 == 0:
                np.testing.assert_allclose(
                    results[-1].outputs["logits"], own_expected, atol=TOLERANCE, rtol=0
                )
        assert model.live_sequences == 0
        assert model.arena is not None and model.arena.used == 0
        # They shared batches: fewer model calls than requests.
        assert model.stats.execution_count < model.stats.success_count
    finally:
        await registry.stop()


@pytest.mark.parametrize("inline_max_steps", [0, 1])
def test_a_lone_sequence_runs_on_the_event_loop_when_allowed(inline_max_steps: int) -> None:
    asyncio.run(step_a_lone_sequence(inline_max_steps))


async def step_a_lone_sequence(inline_max_steps: int) -> None:
    tokens = np.random.default_rng(11).integers(0, VOCAB, size=(6, 1), dtype=np.int64)
    expected = reference(tokens)
    registry, model = await served(inline_max_steps)
    try:
        for t, token in enumerate(tokens):
            control = SequenceControl("alone", start=t == 0, end=t == len(tokens) - 1)
            request = InferenceRequest(MODEL, {"tokens": token.reshape(1, 1)}, "", ("logits",))
            request.sequence = control
            result = await model.infer(request)
            np.testing.assert_allclose(result.outputs["logits"], expected[t], atol=TOLERANCE)
        workers = [t for t in threading.enumerate() if t.name.startswith(f"batch-{MODEL}")]
        assert bool(workers) == (inline_max_steps == 0)
    finally:
        await registry.stop()
