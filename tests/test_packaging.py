"""Serving never imports torch, and the command lists the bundled models."""

from __future__ import annotations

import subprocess
import sys


def test_serving_code_does_not_import_torch() -> None:
    code = (
        "import sys, rnnserve.cli, rnnserve.repository.layout, rnnserve._pb.grpc_service_pb2_grpc; "
        "rnnserve.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_command_lists_the_bundled_models(cli) -> None:
    done = cli("models")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["charlm_lstm", "digits_lstm", "sensor_gru"]
    assert all("streaming" in line and "versions 1" in line for line in lines)


def test_help_explains_every_command(cli) -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("train", "export", "models"):
        assert command in done.stdout
