"""A client process that the chaos test (tests/api/test_stress.py) kills with SIGKILL mid-stream.

    python chaos_client.py TARGET MODEL FIRST_ID COUNT SEED

It starts COUNT sequences (ids FIRST_ID, FIRST_ID + 1, ...) on one stream and keeps stepping them
round-robin, never ending them, with up to IN_FLIGHT requests unanswered, as a pipelining client
does. It prints `streaming` once the first answer arrived, so the killer knows it is mid-stream.
Self-contained on purpose (numpy and tritonclient only): it starts fast and imports no test code.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import tritonclient.grpc as triton

IN_FLIGHT = 8
INPUTS = {
    "charlm_lstm": ("tokens", "INT64"),
    "sensor_gru": ("reading", "FP32"),
    "digits_lstm": ("pixels", "FP32"),
}


def step_input(model: str, rng: np.random.Generator) -> triton.InferInput:
    """One time step of plausible input for `model`."""
    name, datatype = INPUTS[model]
    if model == "charlm_lstm":
        x = rng.integers(1, 97, size=(1, 1), dtype=np.int64)
    elif model == "sensor_gru":
        x = (24 + 2 * rng.standard_normal((1, 1, 1))).astype(np.float32)
    else:
        x = rng.integers(0, 17, size=(1, 1, 8)).astype(np.float32)
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def main(target: str, model: str, first: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    room = threading.Semaphore(IN_FLIGHT)
    answered = threading.Event()

    def on_answer(result: object, error: object) -> None:
        answered.set()
        room.release()

    client = triton.InferenceServerClient(target)
    client.start_stream(callback=on_answer)
    announced = False
    started: set[int] = set()
    while True:  # until killed
        for sid in range(first, first + count):
            room.acquire()
            client.async_stream_infer(
                model, [step_input(model, rng)], sequence_id=sid, sequence_start=sid not in started
            )
            started.add(sid)
        if answered.is_set() and not announced:
            print("streaming", flush=True)
            announced = True


if __name__ == "__main__":
    target_arg, model_arg, first_arg, count_arg, seed_arg = sys.argv[1:]
    main(target_arg, model_arg, int(first_arg), int(count_arg), int(seed_arg))
