"""Bad input to `rnnserve train` and `rnnserve export`: a clear message and exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnserve.cli import build_parser
from rnnserve.models.architectures import RecurrentNet, RecurrentSpec
from rnnserve.models.cli import save_checkpoint
from rnnserve.models.signature import Signature


def assert_clean_failure(done, code: int, *needles: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr


def test_unknown_model(cli) -> None:
    done = cli("train", "transformer_xl")
    assert_clean_failure(done, 2, "invalid choice: 'transformer_xl'", "charlm_lstm")


def test_missing_checkpoint(cli, tmp_path: Path) -> None:
    done = cli("export", str(tmp_path / "nope.pt"), "--model-repository", str(tmp_path))
    assert_clean_failure(done, 2, "checkpoint not found", "nope.pt")


def test_file_that_is_not_a_checkpoint(cli, tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x00not a checkpoint\xff" * 10)
    done = cli("export", str(bogus), "--model-repository", str(tmp_path))
    assert_clean_failure(done, 2, "is not a PyTorch checkpoint")


def test_foreign_torch_file(cli, tmp_path: Path) -> None:
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    done = cli("export", str(foreign), "--model-repository", str(tmp_path))
    assert_clean_failure(done, 2, "not written by `rnnserve train`")


def test_bidirectional_streaming_request(cli, tmp_path: Path) -> None:
    spec = RecurrentSpec(cell="gru", input_size=3, hidden_size=4, output_size=2, bidirectional=True)
    checkpoint = tmp_path / "bi.pt"
    save_checkpoint(
        checkpoint, "bi_gru", RecurrentNet(spec), Signature("x", "y", "bidirectional test"), {}
    )
    done = cli("export", str(checkpoint), "--model-repository", str(tmp_path), "--streaming")
    assert_clean_failure(done, 2, "bidirectional", "without --streaming")
    assert not (tmp_path / "bi_gru" / "1" / "model.onnx").exists()

    whole = cli("export", str(checkpoint), "--model-repository", str(tmp_path))
    assert whole.returncode == 0, whole.stderr
    assert 'string_value: "false"' in (tmp_path / "bi_gru" / "config.pbtxt").read_text()


def test_unwritable_repository(cli, tmp_path: Path) -> None:
    spec = RecurrentSpec(cell="rnn", input_size=2, hidden_size=3, output_size=1)
    checkpoint = tmp_path / "rnn.pt"
    save_checkpoint(checkpoint, "tiny", RecurrentNet(spec), Signature("x", "y", "t"), {})
    blocker = tmp_path / "file"
    blocker.write_text("a file where the repository should be")
    done = cli("export", str(checkpoint), "--model-repository", str(blocker))
    assert_clean_failure(done, 2, "cannot write")


def test_a_version_held_is_replaced_only_with_overwrite(cli, tmp_path: Path) -> None:
    spec = RecurrentSpec(cell="rnn", input_size=2, hidden_size=3, output_size=1)
    checkpoint = tmp_path / "rnn.pt"
    save_checkpoint(checkpoint, "tiny", RecurrentNet(spec), Signature("x", "y", "t"), {})
    repository = tmp_path / "repo"
    first = cli("export", str(checkpoint), "--model-repository", str(repository))
    assert first.returncode == 0, first.stderr
    again = cli("export", str(checkpoint), "--model-repository", str(repository))
    assert_clean_failure(
        again, 2, f"{repository / 'tiny' / '1'} already holds version 1 of tiny", "--version 2"
    )
    # The old spelling still works, saying what replaces it.
    replaced = cli("export", str(checkpoint), "--repository", str(repository), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "--repository is deprecated: use --model-repository" in replaced.stderr
    added = cli("export", str(checkpoint), "--model-repository", str(repository), "--version", "2")
    assert added.returncode == 0, added.stderr
    assert (repository / "tiny" / "2" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "command", [["train", "charlm_lstm"], ["export", "x.pt"], ["import", "x.onnx", "--name", "x"]]
)
def test_commands_that_write_a_model_default_to_a_repository_of_their_own(command) -> None:
    """Never the repository committed with rnnserve (models/repository), which serve reads."""
    assert build_parser().parse_args(command).model_repository == Path("model_repository")
