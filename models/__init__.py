"""Recurrent networks for rnnserve: architectures, training, ONNX export and the bundled models.

Importing this package is cheap and needs no torch; its modules that train or export load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bundled_repository() -> Path:
    """The model repository committed with rnnserve (`models/repository/` in the source tree),
    in Triton's layout: `<model>/config.pbtxt`, `<model>/<version>/model.onnx`."""
    return Path(__file__).resolve().parent / "repository"


def __getattr__(name: str) -> Any:
    # `from rnnserve.models import export_module` loads torch only when it is asked for.
    if name == "export_module":
        from rnnserve.models.module_export import export_module

        return export_module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
