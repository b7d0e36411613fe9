"""Recurrent architectures with their state batch-first, so a server can stack sessions on axis 0.

PyTorch keeps recurrent state as [layers * directions, B, H]; every tensor that crosses this
module's boundary is [B, layers * directions, H] instead, the layout the exported ONNX graphs and
the server use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

Cell = Literal["lstm", "gru", "rnn"]
Head = Literal["logits", "softmax", "residual"]
State = tuple[torch.Tensor, ...]

GATES: dict[str, int] = {"lstm": 4, "gru": 3, "rnn": 1}
_MODULES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class RecurrentSpec:
    """Everything needed to rebuild a network; stored in checkpoints and model cards."""

    cell: Cell
    input_size: int
    """Features per time step; with `vocab_size`, the embedding width."""
    hidden_size: int
    output_size: int
    num_layers: int = 1
    dropout: float = 0.0
    bias: bool = True
    bidirectional: bool = False
    vocab_size: int | None = None
    """When set, inputs are int64 token ids [B, T] looked up in an embedding."""
    head: Head = "logits"
    """logits: a linear read-out; softmax: probabilities; residual: next value = input + delta."""

    def __post_init__(self) -> None:
        if self.cell not in GATES:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {sorted(GATES)}")
        if self.head == "residual" and self.output_size != self.input_size:
            raise ValueError("a residual head forecasts its own input: output_size == input_size")
        if self.head == "residual" and self.vocab_size is not None:
            raise ValueError("a residual head needs float features, not token ids")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    @property
    def state_shape(self) -> tuple[int, int]:
        """Per-sequence state shape, without the batch axis."""
        return (self.num_layers * self.directions, self.hidden_size)

    @property
    def streamable(self) -> bool:
        """A backward direction needs the future, so only unidirectional nets can carry state."""
        return not self.bidirectional


def recurrent_parameter_count(spec: RecurrentSpec) -> int:
    """Closed form for the recurrent layers: gates * (X*H + H*H + 2H) per layer and direction.

    PyTorch keeps two bias vectors (b_ih and b_hh), hence 2H; the textbook form with one bias is
    gates * ((X + H) * H + H).
    """
    total = 0
    for layer in range(spec.num_layers):
        x = spec.input_size if layer == 0 else spec.hidden_size * spec.directions
        h = spec.hidden_size
        per_direction = (x + h) * h + (2 * h if spec.bias else 0)
        total += GATES[spec.cell] * per_direction * spec.directions
    return total


class RecurrentNet(nn.Module):
    """An embedding or feature scaler, a stack of recurrent layers and a read-out head."""

    def __init__(self, spec: RecurrentSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embedding = (
            nn.Embedding(spec.vocab_size, spec.input_size) if spec.vocab_size is not None else None
        )
        self.rnn = _MODULES[spec.cell](
            input_size=spec.input_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            bias=spec.bias,
            batch_first=True,
            dropout=spec.dropout if spec.num_layers > 1 else 0.0,
            bidirectional=spec.bidirectional,
        )
        self.readout = nn.Linear(spec.hidden_size * spec.directions, spec.output_size)
        # Normalisation lives in the network, so clients send raw values and get raw values back.
        self.register_buffer("input_shift", torch.zeros(spec.input_size))
        self.register_buffer("input_scale", torch.ones(spec.input_size))
        self.register_buffer("output_shift", torch.zeros(spec.output_size))
        self.register_buffer("output_scale", torch.ones(spec.output_size))

    def recurrent_parameters(self) -> int:
        return sum(p.numel() for p in self.rnn.parameters())

    def zero_state(self, batch: int) -> State:
        shape = (batch, *self.spec.state_shape)
        return tuple(torch.zeros(shape) for _ in self.spec.state_names)

    def raw(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The head's pre-activation (what losses see): logits, or the normalised delta."""
        features = self._features(x)
        torch_state = None if state is None else tuple(s.transpose(0, 1) for s in state)
        if torch_state is not None and self.spec.cell != "lstm":
            out, new_h = self.rnn(features, torch_state[0].contiguous())
            new_state: State = (new_h,)
        elif torch_state is not None:
            h, c = (s.contiguous() for s in torch_state)
            out, (new_h, new_c) = self.rnn(features, (h, c))
            new_state = (new_h, new_c)
        else:
            out, hidden = self.rnn(features)
            new_state = tuple(hidden) if isinstance(hidden, tuple) else (hidden,)
        return self.readout(out), tuple(s.transpose(0, 1) for s in new_state)

    def raw_packed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Like `raw` from the zero state, for a padded batch of sequences of different lengths.

        The padding never enters the recurrence: the batch is packed first.
        """
        packed = pack_padded_sequence(
            self._features(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.readout(padded)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(x)
        return (x - self.input_shift) / self.input_scale

    def finish(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Turn the head's pre-activation into what clients receive."""
        if self.spec.head == "softmax":
            return torch.softmax(raw, dim=-1)
        if self.spec.head == "residual":
            return x + raw * self.output_scale + self.output_shift
        return raw

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        raw, new_state = self.raw(x, state)
        return self.finish(x, raw), new_state
