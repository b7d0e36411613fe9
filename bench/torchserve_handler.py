"""A TorchServe 0.12 handler for a recurrent ONNX model with server-held state: the peer that
`rnnserve bench` measures rnnserve against.

It runs the same model file on the same ONNX Runtime as rnnserve, so the comparison is between
the servers, not the engines. TorchServe's sequence batching puts at most one request of each
sequence in a batch; the handler stacks the batch's inputs and the sequences' states, makes
one model call and keeps each sequence's new state, keyed by its sequence id.

Each request's input map holds every model input (not the states) as the raw bytes of a
[1, T, ...] array, and `sequence_start` / `sequence_end` set to b"1" on a sequence's first and
last request (TorchServe 0.12 does not pass its own start and end markers through gRPC
correctly). The answer to each request is the raw bytes of the output named in the config.

TorchServe imports this file by itself inside its worker process: it must define exactly one
class, and it imports nothing from rnnserve.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import onnxruntime as ort


class RecurrentOnnxHandler:
    def initialize(self, context: Any) -> None:
        config = context.model_yaml_config["handler"]
        model_dir = context.system_properties["model_dir"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config.get("intra_op_threads", 0))
        # As rnnserve's threads do by default: spin for work only while a call runs.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(
            os.path.join(model_dir, config["model_file"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.inputs = [
            (t["name"], np.dtype(t["dtype"]), tuple(t["dims"])) for t in config["inputs"]
        ]
        self.state_specs = [(s["input"], s["output"], tuple(s["dims"])) for s in config["states"]]
        self.output = config["output"]
        self.output_names = [self.output, *(out for _, out, _ in self.state_specs)]
        self.states: dict[str, list[np.ndarray]] = {}

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        ids = [context.get_sequence_id(i) for i in range(len(data))]
        feeds = {
            name: np.concatenate([self._array(row[name], dtype, dims) for row in data])
            for name, dtype, dims in self.inputs
        }
        for k, (name, _, dims) in enumerate(self.state_specs):
            feeds[name] = np.stack(
                [
                    self.states[sid][k]
                    if sid in self.states and not _flag(row, "sequence_start")
                    else np.zeros(dims, np.float32)
                    for sid, row in zip(ids, data, strict=True)
                ]
            )
        output, *new_states = self.session.run(self.output_names, feeds)
        for i, (sid, row) in enumerate(zip(ids, data, strict=True)):
            if _flag(row, "sequence_end"):
                self.states.pop(sid, None)
            else:
                self.states[sid] = [state[i] for state in new_states]
        return [output[i : i + 1].tobytes() for i in range(len(data))]

    @staticmethod
    def _array(raw: bytes, dtype: np.dtype[Any], dims: tuple[int, ...]) -> np.ndarray:
        """[1, T, ...] from raw bytes; T is whatever the byte count gives (-1 in `dims`)."""
        per_step = math.prod(d for d in dims if d >= 0) * dtype.itemsize
        shape = tuple(len(raw) // per_step if d < 0 else d for d in dims)
        return np.frombuffer(raw, dtype=dtype).reshape(1, *shape)


def _flag(row: dict[str, Any], key: str) -> bool:
    return bytes(row.get(key) or b"") == b"1"
