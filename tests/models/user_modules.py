"""Recurrent modules as users write them, PyTorch's defaults kept: time-major nn.LSTM, nn.GRU and
nn.RNN ([T, B, F], states [layers, B, H]), a batch-first nn.GRU over an embedding, and a module
with two recurrent layers holding separate states. Each forward is (x, state=None) -> (y, state).

Also a file for `rnnserve export --module tests/models/user_modules.py:FACTORY`.
"""

from __future__ import annotations

import torch
from torch import nn


class LSTMTagger(nn.Module):
    """Time-major [T, B, 6] features -> per-step tag log-probabilities [T, B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, (h, c) = self.lstm(x, state)
        return torch.log_softmax(self.head(out), dim=-1), (h, c)


class TokenGRU(nn.Module):
    """Batch-first int64 token ids [B, T] (vocabulary 30) -> next-token logits [B, T, 30]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.out = nn.Linear(12, 30)

    def forward(self, tokens: torch.Tensor, h: torch.Tensor | None = None):
        out, h = self.gru(self.embedding(tokens), h)
        return self.out(out), h


class TwoLayerRNN(nn.Module):
    """A time-major 2-layer Elman RNN: [T, B, 4] -> [T, B, 3], state [2, B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 10, num_layers=2)
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        out, h = self.rnn(x, h)
        return self.out(out), h


class SensorGRU(nn.Module):
    """A time-major 2-layer nn.GRU forecaster: [T, B, 3] readings -> [T, B, 1], state [2, B, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8, num_layers=2)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        out, h = self.gru(x, h)
        return self.out(out), h


class Stacked(nn.Module):
    """An LSTM feeding a GRU of another width, batch-first, with state ((h1, c1), h2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 9, batch_first=True)
        self.gru = nn.GRU(9, 7, batch_first=True)
        self.out = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor, state=None):
        first, second = state if state is not None else (None, None)
        mid, first = self.lstm(x, first)
        out, second = self.gru(mid, second)
        return self.out(out), (first, second)


def lstm_tagger() -> nn.Module:
    torch.manual_seed(1)
    return LSTMTagger().eval()


def token_gru() -> nn.Module:
    torch.manual_seed(2)
    return TokenGRU().eval()


def two_layer_rnn() -> nn.Module:
    torch.manual_seed(3)
    return TwoLayerRNN().eval()


def sensor_gru() -> nn.Module:
    torch.manual_seed(5)
    return SensorGRU().eval()


def stacked() -> nn.Module:
    torch.manual_seed(4)
    return Stacked().eval()
