"""The recipes of the three bundled models: data splits, losses, metrics and baselines."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from rnnserve.models import data
from rnnserve.models.architectures import RecurrentNet, RecurrentSpec, State
from rnnserve.models.signature import Signature
from rnnserve.models.training import TrainSettings

LN2 = math.log(2.0)


def run_stream(model: RecurrentNet, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Raw outputs over long sequences, in chunks, carrying the state between them."""
    state: State | None = None
    outputs = []
    for start in range(0, x.shape[1], chunk):
        raw, state = model.raw(x[:, start : start + chunk], state)
        outputs.append(raw)
    return torch.cat(outputs, dim=1)


def _contiguous_splits(n: int, fractions: tuple[float, float]) -> tuple[int, int]:
    train_end = int(n * fractions[0])
    val_end = int(n * (fractions[0] + fractions[1]))
    return train_end, val_end


class CharLM:
    """A character-level language model over Python's own reference documentation."""

    name = "charlm_lstm"
    carries_state = True
    validation_metric = "validation_bits_per_char"
    signature = Signature(
        input_name="tokens",
        output_name="logits",
        description="Next-character logits over the vocabulary, for each input character",
        parameters=(("vocabulary", "".join(data.VOCABULARY)),),
    )

    def __init__(self, settings: TrainSettings | None = None, limit: int | None = None) -> None:
        text, self.provenance = data.python_docs_corpus()
        ids = data.encode_text(text[:limit] if limit else text)
        train_end, val_end = _contiguous_splits(len(ids), (0.9, 0.05))
        self.train_ids, self.val_ids, self.test_ids = (
            ids[:train_end],
            ids[train_end:val_end],
            ids[val_end:],
        )
        self.spec = RecurrentSpec(
            cell="lstm",
            input_size=64,
            hidden_size=256,
            num_layers=2,
            dropout=0.1,
            output_size=len(data.VOCABULARY),
            vocab_size=len(data.VOCABULARY),
            head="logits",
        )
        self.settings = settings or TrainSettings(
            max_epochs=12, batch_size=64, bptt=128, learning_rate=3e-3, patience=2
        )

    def prepare(self, model: RecurrentNet) -> None:
        pass

    def train_batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        bptt = self.settings.bptt or 128
        # Parallel streams through the corpus, each from its own offset, advanced chunk by chunk.
        offset = int(rng.integers(0, bptt))
        usable = (len(self.train_ids) - offset - 1) // self.settings.batch_size
        streams = self.train_ids[offset : offset + usable * self.settings.batch_size + 1]
        inputs = torch.from_numpy(streams[:-1].reshape(self.settings.batch_size, usable))
        targets = torch.from_numpy(streams[1:].reshape(self.settings.batch_size, usable))
        for start in range(0, usable - 1, bptt):
            yield inputs[:, start : start + bptt], targets[:, start : start + bptt]

    def loss(
        self, model: RecurrentNet, batch: tuple[torch.Tensor, ...], state: State | None
    ) -> tuple[torch.Tensor, State | None]:
        inputs, targets = batch
        logits, state = model.raw(inputs, state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), state

    def _bits_per_char(self, model: RecurrentNet, ids: np.ndarray) -> float:
        tensor = torch.from_numpy(ids)[None, :]
        logits = run_stream(model, tensor[:, :-1])
        nats = F.cross_entropy(logits[0], tensor[0, 1:])
        return float(nats.detach()) / LN2

    def validate(self, model: RecurrentNet) -> float:
        return self._bits_per_char(model, self.val_ids)

    def evaluate(self, model: RecurrentNet) -> dict[str, float]:
        counts = np.bincount(self.train_ids, minlength=len(data.VOCABULARY)) + 1.0
        probabilities = counts / counts.sum()
        unigram = float(-np.mean(np.log2(probabilities[self.test_ids[1:]])))
        return {
            "validation_bits_per_char": self._bits_per_char(model, self.val_ids),
            "test_bits_per_char": self._bits_per_char(model, self.test_ids),
            "test_unigram_baseline_bits_per_char": unigram,
        }

    def data_card(self) -> dict[str, Any]:
        return {
            **asdict(self.provenance),
            "splits": "contiguous 90% / 5% / 5% of the characters",
            "split_sizes": {
                "train": len(self.train_ids),
                "validation": len(self.val_ids),
                "test": len(self.test_ids),
            },
            "unit": "characters",
        }


class SensorForecast:
    """One-step-ahead forecasts of monthly sea surface temperature (El Nino region 1+2)."""

    name = "sensor_gru"
    carries_state = False
    validation_metric = "validation_rmse"
    signature = Signature(
        input_name="reading",
        output_name="forecast",
        description="Forecast of the next reading (deg C), after each reading",
        parameters=(("unit", "degC"),),
    )

    def __init__(self, settings: TrainSettings | None = None) -> None:
        self.series, self.provenance = data.elnino_sst()
        self.train_end, self.val_end = _contiguous_splits(len(self.series), (0.8, 0.1))
        self.spec = RecurrentSpec(
            cell="gru", input_size=1, hidden_size=64, num_layers=2, output_size=1, head="residual"
        )
        self.settings = settings or TrainSettings(
            max_epochs=80, batch_size=32, learning_rate=3e-3, patience=10
        )

    def prepare(self, model: RecurrentNet) -> None:
        train = self.series[: self.train_end]
        deltas = np.diff(train)
        model.input_shift.fill_(float(train.mean()))
        model.input_scale.fill_(float(train.std()))
        model.output_shift.fill_(float(deltas.mean()))
        model.output_scale.fill_(float(deltas.std()))

    def train_batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        train = self.series[: self.train_end]
        # Windows of random lengths, padded into a batch and packed so padding never counts.
        for _ in range(len(train) // self.settings.batch_size):
            lengths = rng.integers(12, 121, size=self.settings.batch_size)
            starts = rng.integers(0, len(train) - lengths - 1)
            x = np.zeros((len(lengths), int(lengths.max()) + 1), dtype=np.float32)
            for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
                x[row, : length + 1] = train[start : start + length + 1]
            yield torch.from_numpy(x), torch.from_numpy(lengths)

    def loss(
        self, model: RecurrentNet, batch: tuple[torch.Tensor, ...], state: State | None
    ) -> tuple[torch.Tensor, State | None]:
        windows, lengths = batch
        inputs = windows[:, :-1, None]
        target = (windows[:, 1:, None] - windows[:, :-1, None] - model.output_shift) / (
            model.output_scale
        )
        raw = model.raw_packed(inputs, lengths)
        mask = (torch.arange(inputs.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        return ((raw - target) ** 2 * mask).sum() / mask.sum(), None

    def forecasts(self, model: RecurrentNet) -> np.ndarray:
        """forecasts[t] predicts series[t + 1], streaming through the whole series."""
        x = torch.from_numpy(self.series)[None, :, None]
        raw = run_stream(model, x)
        return model.finish(x, raw)[0, :, 0].numpy()

    def _rmse(self, predicted: np.ndarray, start: int, end: int) -> float:
        # Forecasts made at t = start-1 .. end-2 for the targets series[start .. end-1].
        errors = predicted[start - 1 : end - 1] - self.series[start:end]
        return float(np.sqrt(np.mean(errors**2)))

    def validate(self, model: RecurrentNet) -> float:
        return self._rmse(self.forecasts(model), self.train_end, self.val_end)

    def evaluate(self, model: RecurrentNet) -> dict[str, float]:
        predicted = self.forecasts(model)
        n = len(self.series)
        return {
            "validation_rmse": self._rmse(predicted, self.train_end, self.val_end),
            "test_rmse": self._rmse(predicted, self.val_end, n),
            "test_naive_rmse": self._rmse(self.series, self.val_end, n),
        }

    def data_card(self) -> dict[str, Any]:
        return {
            **asdict(self.provenance),
            "splits": "contiguous in time: first 80% train, next 10% validation, last 10% test",
            "split_sizes": {
                "train": self.train_end,
                "validation": self.val_end - self.train_end,
                "test": len(self.series) - self.val_end,
            },
            "unit": "monthly readings",
        }


class DigitRows:
    """Handwritten digits read one row of 8 pixels per time step; class probabilities per row."""

    name = "digits_lstm"
    carries_state = False
    validation_metric = "validation_loss"
    signature = Signature(
        input_name="pixels",
        output_name="probabilities",
        description="Class probabilities (digits 0-9) after each image row (8 pixels, 0..16)",
        parameters=(("labels", "0123456789"),),
    )

    def __init__(self, settings: TrainSettings | None = None) -> None:
        from sklearn.model_selection import train_test_split

        images, labels, self.provenance = data.handwritten_digits()
        self.settings = settings or TrainSettings(
            max_epochs=80, batch_size=64, learning_rate=3e-3, patience=8
        )
        indices = np.arange(len(labels))
        train, rest = train_test_split(
            indices, test_size=0.3, stratify=labels, random_state=self.settings.seed
        )
        val, test = train_test_split(
            rest, test_size=0.5, stratify=labels[rest], random_state=self.settings.seed
        )
        self.images, self.labels = images, labels
        self.split = {"train": train, "validation": val, "test": test}
        self.spec = RecurrentSpec(
            cell="lstm", input_size=8, hidden_size=128, output_size=10, head="softmax"
        )

    def prepare(self, model: RecurrentNet) -> None:
        # Pixels are 0..16: centre them on 0 with unit range.
        model.input_shift.fill_(8.0)
        model.input_scale.fill_(8.0)

    def _tensors(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images[indices]), torch.from_numpy(self.labels[indices])

    def train_batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        order = rng.permutation(self.split["train"])
        for start in range(0, len(order), self.settings.batch_size):
            yield self._tensors(order[start : start + self.settings.batch_size])

    @staticmethod
    def _objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The final row decides; earlier rows are trained lightly so streamed answers firm up.
        final = F.cross_entropy(logits[:, -1], labels)
        steps = logits.shape[1]
        early = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.repeat_interleave(steps - 1)
        )
        return final + 0.3 * early

    def loss(
        self, model: RecurrentNet, batch: tuple[torch.Tensor, ...], state: State | None
    ) -> tuple[torch.Tensor, State | None]:
        images, labels = batch
        logits, _ = model.raw(images)
        return self._objective(logits, labels), None

    def _score(self, model: RecurrentNet, split: str, score: Callable[..., float]) -> float:
        images, labels = self._tensors(self.split[split])
        logits, _ = model.raw(images)
        return score(logits, labels)

    def validate(self, model: RecurrentNet) -> float:
        return self._score(
            model, "validation", lambda lg, lb: float(F.cross_entropy(lg[:, -1], lb).detach())
        )

    def evaluate(self, model: RecurrentNet) -> dict[str, float]:
        def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
            return float((logits[:, -1].argmax(-1) == labels).float().mean())

        return {
            "validation_loss": self.validate(model),
            "validation_accuracy": self._score(model, "validation", accuracy),
            "test_accuracy": self._score(model, "test", accuracy),
        }

    def data_card(self) -> dict[str, Any]:
        return {
            **asdict(self.provenance),
            "splits": "stratified 70% / 15% / 15% (scikit-learn train_test_split, seeded)",
            "split_sizes": {name: len(idx) for name, idx in self.split.items()},
            "unit": "images of 8 rows",
        }


TASKS: dict[str, Callable[[], Any]] = {
    CharLM.name: CharLM,
    SensorForecast.name: SensorForecast,
    DigitRows.name: DigitRows,
}
