"""A model whose state overflows on finite inputs, and copies of bundled models with a
config parameter set: the repositories the NaN and infinity tests serve.

The bundled models cannot hold a non-finite state: ONNX Runtime's recurrent kernels clamp their
gates' arguments, so even a NaN reading leaves sensor_gru's state finite. The accumulator adds
its readings into its state, so two readings of 3e38 overflow it to infinity, and a NaN reading
makes it NaN: the cases where the server must keep a state from being stored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.models.graph import parse_config, render_config
from tests.conftest import BUNDLED

ACCUMULATOR = "accumulator"
STATE_WIDTH = 4


def publish_accumulator(repository: Path, name: str = ACCUMULATOR) -> Path:
    """A streamable model: h_out = h_in + the sum of the request's readings (on every state
    element), forecast = reading + the largest element of h_in; its folder."""
    nodes = [
        helper.make_node("ReduceSum", ["reading", "time_axis"], ["total"], keepdims=1),
        helper.make_node("Add", ["h_in", "total"], ["h_out"]),
        helper.make_node("ReduceMax", ["h_in"], ["level"], axes=[1, 2], keepdims=1),
        helper.make_node("Add", ["reading", "level"], ["forecast"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("reading", TensorProto.FLOAT, ["batch", "time", 1]),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 1, STATE_WIDTH]),
        ],
        [
            helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch", "time", 1]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 1, STATE_WIDTH]),
        ],
        [onnx.numpy_helper.from_array(np.asarray([1], np.int64), "time_axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=64)
    config.input.add(name="reading", data_type=mc.TYPE_FP32, dims=[-1, 1])
    config.output.add(name="forecast", data_type=mc.TYPE_FP32, dims=[-1, 1])
    state = config.sequence_batching.state.add(
        input_name="h_in", output_name="h_out", data_type=mc.TYPE_FP32, dims=[1, STATE_WIDTH]
    )
    state.initial_state.add(data_type=mc.TYPE_FP32, dims=[1, STATE_WIDTH], zero_data=True)
    state.initial_state[0].name = "zero"
    config.parameters["streamable"].string_value = "true"
    (folder / "config.pbtxt").write_text(render_config(config))
    return folder


def accumulated(readings: list[float]) -> np.ndarray:
    """The accumulator's state after `readings`, one request each, from zero (float32)."""
    h = np.zeros((1, 1, STATE_WIDTH), np.float32)
    for reading in readings:
        h = h + np.float32(reading)
    return h


def copy_bundled(repository: Path, model: str, name: str | None = None, **parameters: str) -> Path:
    """A copy of a bundled model's folder in `repository`, as `name`, with config `parameters`
    set; its folder."""
    folder = repository / (name or model)
    shutil.copytree(BUNDLED / model, folder)
    configure(folder, **parameters)
    if name is not None:
        path = folder / "config.pbtxt"
        config = parse_config(path.read_text())
        config.name = name
        path.write_text(render_config(config))
    return folder


def configure(folder: Path, **parameters: str) -> None:
    """Set `parameters` in the config.pbtxt of the model in `folder`."""
    path = folder / "config.pbtxt"
    config = parse_config(path.read_text())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    path.write_text(render_config(config))
