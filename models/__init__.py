"""Recurrent networks for rnnserve: architectures, training, ONNX export and the bundled models.

Importing this package is cheap and needs no torch; its modules that train or export load torch.
"""

from __future__ import annotations

from pathlib import Path


def bundled_repository() -> Path:
    """The model repository committed with rnnserve (`models/repository/` in the source tree),
    in Triton's layout: `<model>/config.pbtxt`, `<model>/<version>/model.onnx`."""
    return Path(__file__).resolve().parent / "repository"
