"""The committed generated code is exactly what proto/*.proto generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generated = load_generator().generate(tmp_path / "_pb")
    committed = ROOT / "service" / "_pb"
    assert sorted(p.name for p in generated) == sorted(
        p.name for p in committed.iterdir() if p.suffix in {".py", ".pyi"}
    )
    stale = [p.name for p in generated if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"run `make proto` and commit: {stale} differ from what proto/ generates"


def test_triton_style_config_parses() -> None:
    from google.protobuf import text_format

    from rnnserve._pb import model_config_pb2 as mc

    text = """
    name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
    input [{ name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] }]
    output [{ name: "y" data_type: TYPE_FP32 dims: [ -1, 2 ] }]
    instance_group [{ kind: KIND_CPU count: 2 }]
    sequence_batching {
      max_sequence_idle_microseconds: 5000000
      control_input [{ name: "START" control [{ kind: CONTROL_SEQUENCE_START
                                                int32_false_true: [ 0, 1 ] }] }]
      state [{ input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 1, 3 ]
               initial_state: [{ data_type: TYPE_FP32 dims: [ 1, 3 ] zero_data: true
                                 name: "zero" }] }]
    }
    """
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.sequence_batching.state[0].initial_state[0].zero_data
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
