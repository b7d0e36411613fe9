"""The same-run A/B tool end to end with tiny settings, here with authentication on for B only
(what `--token` is for: both builds get the token; A does not ask for it)."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys


def test_ab_measures_a_server_that_authenticates(tmp_path) -> None:
    token = "ab-test-token"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"bench {hashlib.sha256(token.encode()).hexdigest()}\n")
    server = f"{shlex.quote(sys.executable)} -P -m rnnserve"
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve_bench.ab", "--a", server,
            "--b", f"env RNNSERVE_AUTH_TOKENS={shlex.quote(str(tokens))} {server}",
            "--token", token, "--sessions", "1", "--unary", "--rounds", "1",
            "--duration", "0.3", "--warmup", "0.1", "--out", str(tmp_path / "ab"),
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| stream")]
    rows += [line.split("|") for line in done.stdout.splitlines() if line.startswith("| unary")]
    assert len(rows) == 2, done.stdout
    for row in rows:
        a, b = (float(cell.replace(",", "")) for cell in row[3:5])
        assert a > 0 and b > 0, row  # B answered: the token reached it
    log = (tmp_path / "ab" / "logs" / "B.log").read_text()
    assert "auth=tokens " in log and "UNAUTHENTICATED" not in done.stdout
