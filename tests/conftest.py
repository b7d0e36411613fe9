"""Shared fixtures: the repository root and a way to run the real `rnnserve` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "repository"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def cli():
    return run_cli
