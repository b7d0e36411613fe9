"""ONNX export through the same path the bundled models take, on small random networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.models.architectures import RecurrentSpec
from rnnserve.models.export import (
    BATCH,
    TIME,
    ExportError,
    check_declared_shapes,
    check_parity,
    declared_shapes,
    export_onnx,
)
from rnnserve.models.publish import CARD_FILE, parse_config, publish
from tests.factories import SIGNATURE, random_net

CASES = {
    "lstm-features": RecurrentSpec(
        cell="lstm", input_size=6, hidden_size=16, output_size=4, num_layers=2
    ),
    "gru-features": RecurrentSpec(
        cell="gru", input_size=3, hidden_size=12, output_size=3, num_layers=2, head="residual"
    ),
    "rnn-features": RecurrentSpec(
        cell="rnn", input_size=5, hidden_size=10, output_size=2, head="softmax"
    ),
    "lstm-tokens": RecurrentSpec(
        cell="lstm", input_size=8, hidden_size=16, output_size=20, vocab_size=20
    ),
    "lstm-dropout": RecurrentSpec(
        cell="lstm", input_size=4, hidden_size=8, output_size=4, num_layers=3, dropout=0.3
    ),
    "rnn-no-bias": RecurrentSpec(
        cell="rnn", input_size=4, hidden_size=6, output_size=2, bias=False, num_layers=2
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_publish_checks_shapes_and_parity(case: str, tmp_path: Path) -> None:
    spec = CASES[case]
    net = random_net(spec)
    published = publish(net, SIGNATURE, tmp_path, "m", version=3)
    assert not net.training, "export must leave the network in eval mode"

    assert published.onnx_path == tmp_path / "m" / "3" / "model.onnx"
    assert published.parity.max_abs_diff_vs_reference < 1e-5
    assert published.parity.max_abs_diff_steps_vs_whole < 1e-5
    assert {(1, 1), (1, 50), (7, 1), (7, 50)} <= set(published.parity.cases)

    state = [BATCH, spec.num_layers, spec.hidden_size]
    expected = {
        "x": [BATCH, TIME] if spec.vocab_size else [BATCH, TIME, spec.input_size],
        "y": [BATCH, TIME, spec.output_size],
        "h_in": state,
        "h_out": state,
    }
    if spec.cell == "lstm":
        expected |= {"c_in": state, "c_out": state}
    assert declared_shapes(published.onnx_path) == expected

    config = parse_config(published.config_path.read_text())
    assert [s.input_name for s in config.sequence_batching.state] == [
        n for n in ("h_in", "c_in") if n in expected
    ]
    assert all(list(s.dims) == state[1:] for s in config.sequence_batching.state)
    card = json.loads((tmp_path / "m" / CARD_FILE).read_text())
    assert card["parameters"]["recurrent"] == card["parameters"]["recurrent_closed_form"]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_onnx_runs_any_batch_and_length_and_emits_native_ops(cell: str, tmp_path: Path) -> None:
    import onnx

    spec = RecurrentSpec(cell=cell, input_size=3, hidden_size=8, output_size=2)
    path = tmp_path / "m.onnx"
    export_onnx(random_net(spec), SIGNATURE, path, streamable=True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert cell.upper() in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    states = ["h_in", "c_in"] if cell == "lstm" else ["h_in"]
    for batch, steps in [(1, 1), (13, 2), (4, 97)]:
        feeds = {"x": np.zeros((batch, steps, 3), np.float32)}
        feeds |= {s: np.zeros((batch, 1, 8), np.float32) for s in states}
        y, *new_states = session.run(None, feeds)
        assert y.shape == (batch, steps, 2)
        assert all(s.shape == (batch, 1, 8) for s in new_states)


def test_parity_check_catches_a_graph_that_differs(tmp_path: Path) -> None:
    net = random_net(CASES["lstm-features"])
    path = tmp_path / "m.onnx"
    export_onnx(net, SIGNATURE, path, streamable=True)
    with torch.no_grad():
        net.readout.bias.add_(1e-3)  # the graph no longer matches the network
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(net, SIGNATURE, path, streamable=True)


def test_shape_check_catches_a_wrong_declaration(tmp_path: Path) -> None:
    net = random_net(CASES["gru-features"])
    path = tmp_path / "m.onnx"
    export_onnx(net, SIGNATURE, path, streamable=True)
    wider = RecurrentSpec(
        cell="gru", input_size=3, hidden_size=13, output_size=3, num_layers=2, head="residual"
    )
    with pytest.raises(ExportError, match="declared graph shapes"):
        check_declared_shapes(path, wider, SIGNATURE, streamable=True)


def test_bidirectional_exports_whole_sequence_only(tmp_path: Path) -> None:
    spec = RecurrentSpec(
        cell="lstm", input_size=4, hidden_size=8, output_size=3, bidirectional=True, num_layers=2
    )
    net = random_net(spec)
    with pytest.raises(ExportError, match="bidirectional"):
        publish(net, SIGNATURE, tmp_path, "bi", streamable=True)
    assert not (tmp_path / "bi" / "1" / "model.onnx").exists()

    published = publish(net, SIGNATURE, tmp_path, "bi", streamable=False)
    assert declared_shapes(published.onnx_path) == {
        "x": [BATCH, TIME, 4],
        "y": [BATCH, TIME, 3],
    }
    config = parse_config(published.config_path.read_text())
    assert not config.HasField("sequence_batching")
    assert config.parameters["streamable"].string_value == "false"
    assert published.parity.max_abs_diff_vs_reference < 1e-5
