"""The networks themselves: parameter counts, batch-first state, packed batches."""

from __future__ import annotations

import pytest
import torch

from rnnserve.models.architectures import RecurrentNet, RecurrentSpec, recurrent_parameter_count

SPECS = [
    RecurrentSpec(cell="lstm", input_size=5, hidden_size=7, output_size=3, num_layers=2),
    RecurrentSpec(cell="lstm", input_size=5, hidden_size=7, output_size=3, bias=False),
    RecurrentSpec(cell="gru", input_size=4, hidden_size=6, output_size=2, num_layers=3),
    RecurrentSpec(
        cell="rnn", input_size=3, hidden_size=8, output_size=3, head="residual", bidirectional=False
    ),
    RecurrentSpec(
        cell="lstm", input_size=5, hidden_size=7, output_size=3, num_layers=2, bidirectional=True
    ),
    RecurrentSpec(cell="gru", input_size=6, hidden_size=9, output_size=11, vocab_size=11),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.cell}-L{s.num_layers}-bi{s.bidirectional}"
)
def test_recurrent_parameters_match_the_closed_form(spec: RecurrentSpec) -> None:
    net = RecurrentNet(spec)
    assert net.recurrent_parameters() == recurrent_parameter_count(spec)


def test_closed_form_for_one_lstm_layer() -> None:
    x, h = 64, 256
    spec = RecurrentSpec(cell="lstm", input_size=x, hidden_size=h, output_size=1)
    # 4 gates * ((X + H) * H + H), plus the second bias vector PyTorch keeps.
    assert recurrent_parameter_count(spec) == 4 * ((x + h) * h + h) + 4 * h


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_state_is_batch_first_and_matches_pytorch_layout(cell: str) -> None:
    torch.manual_seed(0)
    spec = RecurrentSpec(cell=cell, input_size=4, hidden_size=6, output_size=2, num_layers=2)
    net = RecurrentNet(spec).eval()
    x = torch.randn(3, 5, 4)
    state = tuple(torch.randn(3, 2, 6) for _ in spec.state_names)
    y, new_state = net(x, state)
    assert y.shape == (3, 5, 2)
    assert all(s.shape == (3, 2, 6) for s in new_state)
    # The same computation with PyTorch's own [layers, B, H] layout.
    torch_state = tuple(s.transpose(0, 1).contiguous() for s in state)
    out, hidden = net.rnn(x, torch_state if cell == "lstm" else torch_state[0])
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    torch.testing.assert_close(y, net.readout(out))
    for ours, theirs in zip(new_state, hidden, strict=True):
        torch.testing.assert_close(ours, theirs.transpose(0, 1))


def test_packed_batch_ignores_padding() -> None:
    torch.manual_seed(0)
    spec = RecurrentSpec(cell="gru", input_size=1, hidden_size=5, output_size=1, head="residual")
    net = RecurrentNet(spec).eval()
    lengths = torch.tensor([4, 7, 2])
    x = torch.randn(3, 7, 1)
    x[0, 4:] = 1e6  # padding must not leak into the valid steps
    x[2, 2:] = -1e6
    packed = net.raw_packed(x, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone, _ = net.raw(x[row : row + 1, :length])
        torch.testing.assert_close(packed[row, :length], alone[0])


def test_residual_head_needs_matching_sizes() -> None:
    with pytest.raises(ValueError, match="output_size == input_size"):
        RecurrentSpec(cell="gru", input_size=2, hidden_size=4, output_size=1, head="residual")


def test_bidirectional_is_not_streamable() -> None:
    spec = RecurrentSpec(
        cell="lstm", input_size=2, hidden_size=3, output_size=1, bidirectional=True
    )
    assert not spec.streamable
    assert spec.state_shape == (2, 3)
