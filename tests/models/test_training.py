"""Tiny real training runs, and the `rnnserve train` / `rnnserve export` commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnserve.models.training import TrainSettings, evaluate, fit
from rnnserve.models.zoo import CharLM, DigitRows, SensorForecast


def test_truncated_bptt_run_on_the_char_corpus() -> None:
    settings = TrainSettings(max_epochs=2, batch_size=8, bptt=32, patience=5, seed=7)
    task = CharLM(settings=settings, limit=12_000)
    result = fit(task, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]
    # The restored weights are the best epoch's: validating again gives the recorded score.
    assert task.validate(result.model) == pytest.approx(result.best_validation, rel=1e-6)
    metrics = evaluate(task, result.model)
    # Even two tiny epochs learn the character frequencies: better than uniform over 97.
    assert metrics["test_bits_per_char"] < np.log2(97)


def test_training_is_reproducible_with_a_fixed_seed() -> None:
    settings = TrainSettings(max_epochs=1, batch_size=64, seed=3, patience=1)
    first = fit(DigitRows(settings=settings), progress=False)
    second = fit(DigitRows(settings=settings), progress=False)
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_packed_windows_train_the_forecaster() -> None:
    task = SensorForecast(settings=TrainSettings(max_epochs=1, batch_size=16, patience=5))
    batch = next(task.train_batches(np.random.default_rng(0)))
    windows, lengths = batch
    assert len(set(lengths.tolist())) > 1, "windows of different lengths exercise packing"
    result = fit(task, progress=False)
    metrics = evaluate(task, result.model)
    assert np.isfinite(metrics["test_rmse"])
    assert metrics["test_naive_rmse"] == pytest.approx(
        float(np.sqrt(np.mean(np.diff(task.series[task.val_end - 1 :]) ** 2)))
    )


def test_early_stop_restores_the_best_epoch() -> None:
    # A learning rate far too high makes validation worse after the first epochs.
    settings = TrainSettings(max_epochs=30, batch_size=64, learning_rate=0.5, patience=2)
    result = fit(DigitRows(settings=settings), progress=False)
    assert result.epochs_run < 30
    assert result.epochs_run - result.best_epoch == 2
    best = min(h["validation_loss"] for h in result.history)
    assert result.best_validation == best


def test_train_and_export_commands(cli, tmp_path: Path) -> None:
    repository, checkpoints = tmp_path / "repo", tmp_path / "ckpt"
    done = cli(
        "train",
        "digits_lstm",
        "--max-epochs",
        "2",
        "--no-progress",
        "--model-repository",
        str(repository),
        "--checkpoint-dir",
        str(checkpoints),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    card = json.loads((repository / "digits_lstm" / "model_card.json").read_text())
    assert card["data"]["sha256"] and card["data"]["source"].startswith("sklearn")
    assert sum(card["data"]["split_sizes"].values()) == 1797
    assert card["training"]["epochs_run"] == 2
    assert card["training"]["settings"]["seed"] == 1234
    assert card["training"]["seconds"] > 0
    assert card["parameters"]["recurrent"] == 4 * ((8 + 128) * 128 + 2 * 128)
    assert 0 <= card["metrics"]["test_accuracy"] <= 1
    assert card["export"]["parity"]["max_scaled_diff_vs_torch"] < 1e-5
    assert card["git_revision"]
    assert (repository / "digits_lstm" / "1" / "model.onnx").is_file()

    exported = cli(
        "export",
        str(checkpoints / "digits_lstm.pt"),
        "--model-repository",
        str(repository),
        "--name",
        "digits_copy",
        "--version",
        "2",
    )
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["parity"]["max_scaled_diff_vs_torch"] < 1e-5
    assert (repository / "digits_copy" / "2" / "model.onnx").is_file()
