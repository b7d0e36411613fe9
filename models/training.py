"""One training loop for every bundled model.

A task supplies batches, a loss and a validation score; the loop adds what all of them need:
a fixed seed, gradient-norm clipping, truncated BPTT (the state is carried across consecutive
chunks and detached between them) when the task asks for it, early stopping on validation with
the best weights restored, and a progress bar.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from rnnserve.models.architectures import RecurrentNet, RecurrentSpec, State

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    clip_norm: float = 1.0
    """Gradients are rescaled to at most this global L2 norm."""
    patience: int = 3
    """Stop after this many epochs without a better validation score."""
    seed: int = 1234
    bptt: int | None = None
    """Truncated BPTT length for tasks that stream one long sequence."""
    threads: int = 2


class Task(Protocol):
    """What the loop needs from a bundled model's recipe (see models/zoo.py)."""

    name: str
    spec: RecurrentSpec
    settings: TrainSettings
    carries_state: bool
    """True when consecutive batches continue the same sequences (truncated BPTT)."""
    validation_metric: str

    def prepare(self, model: RecurrentNet) -> None: ...

    def train_batches(self, rng: np.random.Generator) -> Iterator[Any]: ...

    def loss(
        self, model: RecurrentNet, batch: Any, state: State | None
    ) -> tuple[torch.Tensor, State | None]: ...

    def validate(self, model: RecurrentNet) -> float:
        """Lower is better."""
        ...

    def evaluate(self, model: RecurrentNet) -> dict[str, float]: ...

    def data_card(self) -> dict[str, Any]: ...


@dataclass
class FitResult:
    model: RecurrentNet
    epochs_run: int
    best_epoch: int
    best_validation: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(task: Task, settings: TrainSettings | None = None, progress: bool = True) -> FitResult:
    settings = settings or task.settings
    seed_everything(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(settings.seed)
    model = RecurrentNet(task.spec)
    task.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)

    started = time.perf_counter()
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, settings.max_epochs + 1):
        train_loss = _train_epoch(task, model, optimizer, settings, rng, epoch, progress)
        model.eval()
        with torch.no_grad():
            score = task.validate(model)
        history.append({"epoch": epoch, "train_loss": train_loss, task.validation_metric: score})
        logger.info(
            "epoch %d train_loss=%.4f %s=%.4f", epoch, train_loss, task.validation_metric, score
        )
        if score < best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= settings.patience:
            logger.info(
                "early stop: no better %s for %d epochs", task.validation_metric, epoch - best[1]
            )
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(
        model=model,
        epochs_run=epoch,
        best_epoch=best[1],
        best_validation=best[0],
        seconds=time.perf_counter() - started,
        history=history,
    )


def _train_epoch(
    task: Task,
    model: RecurrentNet,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    rng: np.random.Generator,
    epoch: int,
    progress: bool,
) -> float:
    from tqdm import tqdm

    model.train()
    state: State | None = None
    total, count = 0.0, 0
    bar = tqdm(
        task.train_batches(rng),
        desc=f"{task.name} epoch {epoch}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    for batch in bar:
        optimizer.zero_grad(set_to_none=True)
        loss, state = task.loss(model, batch, state if task.carries_state else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        if state is not None:
            # Truncated BPTT: keep the values, cut the graph.
            state = tuple(s.detach() for s in state)
        total += loss.item()
        count += 1
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def settings_card(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)


def evaluate(task: Task, model: RecurrentNet) -> dict[str, float]:
    """The task's final metrics, computed without autograd."""
    model.eval()
    with torch.no_grad():
        return task.evaluate(model)
