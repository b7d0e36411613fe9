"""The README's quick start and Security commands, run as a reader runs them, so the README
cannot drift from what works.

The blocks marked `<!-- tested by tests/test_readme.py -->` in each section run in order in one
bash (`set -euo pipefail`), in an empty folder laid out as a clone (`.venv` and `examples/`
link to this checkout's), against the server one of the blocks starts, on loopback. What the
test changes, and only that:
- a line that starts a server (`make serve`, `rnnserve serve`) runs in the background, as in
  a terminal of its own, and the next line waits for its port file (`RNNSERVE_PORT_FILE`);
  `make serve` runs the command its recipe runs, without installing again;
- the server listens on free ports (`RNNSERVE_GRPC_PORT`, `RNNSERVE_HTTP_PORT`; metrics on
  another), so address `:8001` reads the gRPC port and `:8000` the HTTP port, and
  `--host 0.0.0.0` reads 127.0.0.1 (tests bind loopback only);
- client commands without `--url` dial `$RNNSERVE_URL`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.redis_server import free_port

MARK = "<!-- tested by tests/test_readme.py -->"
SERVER = re.compile(r"^(make serve|(\.venv/bin/)?rnnserve serve)\b")


def marked_blocks(readme: str, heading: str) -> list[list[str]]:
    """The marked sh blocks of the section under `heading`, each as its commands (a line with
    its backslash continuations joined)."""
    section = readme.split(f"\n{heading}\n", 1)[1]
    section = re.split(r"\n#{1,3} ", section, maxsplit=1)[0]
    blocks = re.findall(re.escape(MARK) + r"\n```sh\n(.*?)\n```", section, re.DOTALL)
    return [block.replace("\\\n", " ").splitlines() for block in blocks]


def make_serve() -> str:
    """The command `make serve` runs once installed (its recipe's line)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None, "the Makefile has no serve target"
    return recipe.group(1).replace("$(BIN)", ".venv/bin")


def script(blocks: list[list[str]], port: int, http_port: int) -> str:
    """The blocks' commands as one bash script, with the changes the module lists."""
    lines = [
        "set -euo pipefail",
        "SERVER=",
        'trap \'[ -z "$SERVER" ] || { kill -TERM "$SERVER"; wait "$SERVER"; }\' EXIT',
    ]
    for block in blocks:
        for command in block:
            command = (
                command.replace(":8001", f":{port}")
                .replace(":8000", f":{http_port}")
                .replace("--host 0.0.0.0", "--host 127.0.0.1")
            )
            if not SERVER.match(command):
                lines.append(command)
                continue
            if command.startswith("make serve"):
                command = make_serve()
            lines += [
                f"{command.split('#')[0]} > serve.log 2>&1 &",
                "SERVER=$!",
                "for _ in $(seq 1200); do [ -s ports.json ] && break; "
                'kill -0 "$SERVER" || { cat serve.log; exit 3; }; sleep 0.1; done',
            ]
    return "\n".join(lines) + "\n"


def run_section(
    heading: str, tmp_path: Path, activated: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the section's blocks (in a shell with the virtualenv activated, when `activated`:
    as the README says its commands run after the quick start)."""
    blocks = marked_blocks((ROOT / "README.md").read_text(), heading)
    assert blocks, f"no block of {heading} is marked {MARK}"
    if activated:
        blocks = [[". .venv/bin/activate"], *blocks]
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    port, http_port = free_port(), free_port()
    environment = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RNNSERVE_GRPC_PORT": str(port),
        "RNNSERVE_HTTP_PORT": str(http_port),
        "RNNSERVE_METRICS_PORT": "0",
        "RNNSERVE_PORT_FILE": str(tmp_path / "ports.json"),
        "RNNSERVE_URL": f"127.0.0.1:{port}",
    }
    done = subprocess.run(
        ["bash", "-c", script(blocks, port, http_port)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = tmp_path / "serve.log"
    assert done.returncode == 0, (done.stdout, done.stderr, log.exists() and log.read_text())
    return done


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    done = run_section("## Two commands", tmp_path)
    out = done.stdout
    assert out.startswith("def "), out  # generate's, first
    assert re.search(r"^sensor_gru\tversions 1\tREADY\tstreaming\t", out, re.MULTILINE)
    assert "live, ready, health SERVING" in out
    assert re.search(r"RMSE of 73 forecasts: \d+\.\d+", out), out
    assert "predicted " in out
    # The two HTTP steps of one sequence: its version counts them.
    assert '"sequence_version":1' in out and '"sequence_version":2' in out, out
    assert (tmp_path / "sst.png").read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in done.stderr


def test_the_security_section_runs_as_written(tmp_path: Path) -> None:
    done = run_section("### Security", tmp_path, activated=True)
    out = done.stdout
    assert re.search(r"^charlm_lstm\tversions 1\tREADY", out, re.MULTILINE), out
    # generate's 80 characters took 82 requests, past the principal's burst of 50: any rate
    # refusal was waited out (set -e: a command that failed stopped the script).
    assert "\ndef " in out, out
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("heading", ["## Two commands", "### Security"])
def test_each_section_marks_what_it_runs(heading: str) -> None:
    blocks = marked_blocks((ROOT / "README.md").read_text(), heading)
    assert sum(bool(SERVER.match(c)) for block in blocks for c in block) == 1
