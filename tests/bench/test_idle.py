"""The idle-sequence memory measurement runs end to end (no figure is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_idle_sequences_measurement() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve_bench.idle", "--sequences", "300",
         "--model", "sensor_gru"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sequences"] == 300 and result["errors"] == 0
    assert result["state_bytes_per_sequence"] == 2 * 64 * 4
    assert result["rss_after_mib"] > 0
