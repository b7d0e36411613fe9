"""Compile the project's locks from pyproject's requirements with uv (`make lock`).

  python3 requirements/lock.py UV [--upgrade]

Each environment the project makes gets one lock of exact versions, for Python 3.11 and up on
every platform (uv's universal resolution: one file, markers where versions differ):

- test.txt:       the test and lint environment (test.in); every other lock is constrained by
                  it, so what serves is what the tests ran.
- serve.txt:      the serving install, `make install` and `make serve` (serve.in).
- image-cpu.txt:  the CPU serving image's dependencies, with hashes (deploy/Containerfile).
- image-gpu.txt:  the GPU image's, with hashes: onnxruntime-gpu and its CUDA wheels in place of
                  onnxruntime, everything else as in image-cpu.txt (deploy/Containerfile.gpu).
- minimums.txt:   the test environment with rnnserve's own requirements (and its `train`
                  extra's) at their lower bounds, for `make test-minimums`.

The clone's own distributions (rnnserve, rnnserve-bench) are never pinned: they are installed
from the clone. Without --upgrade, uv keeps every pin a lock already holds that still fits;
with it, every pin moves to the newest release that fits.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "requirements"
PYTHON = "3.11"
"""The oldest Python the project supports (pyproject's requires-python)."""
MINIMUM_EXTRAS = ("train",)
"""Extras whose lower bounds minimums.txt tests beside the dependencies: what users install.
The `test` extra's are the project's own tools, pinned by test.txt."""


def compile_lock(
    uv: str,
    source: str | Path,
    output: str,
    *options: str,
    stdin: str | None = None,
    universal: bool = True,
) -> None:
    """Compile `source` (a requirements file, or "-" with `stdin`) into requirements/`output`:
    for every platform and Python from PYTHON on (`universal`), else for the Python running
    this on Linux with glibc 2.36 (Debian bookworm)."""
    # Not universal: for the Python running this (its patch level decides markers such as
    # async-timeout's `python_full_version < '3.11.3'`).
    here = ".".join(map(str, sys.version_info[:3]))
    target = (
        ["--universal", "--python-version", PYTHON]
        if universal
        else ["--python-platform", "x86_64-manylinux_2_36", "--python-version", here]
    )
    command = [
        uv, "pip", "compile", str(source), "--output-file", str(HERE / output),
        *target, "--quiet",
        "--custom-compile-command", "make lock",
        "--no-emit-package", "rnnserve", "--no-emit-package", "rnnserve-bench",
        *options,
    ]  # fmt: skip
    subprocess.run(command, input=stdin, text=True, check=True, cwd=ROOT)


def image_requirements(flavour: str) -> str:
    """deploy/image-requirements.py's lines for `flavour` (cpu or gpu)."""
    script = ROOT / "deploy" / "image-requirements.py"
    return subprocess.run(
        [sys.executable, str(script), flavour, str(ROOT / "pyproject.toml")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def lower_bounds(project: dict) -> list[str]:
    """`name==minimum` for each requirement of rnnserve (and MINIMUM_EXTRAS) with a `>=`."""
    requirements = list(project["dependencies"])
    for extra in MINIMUM_EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = {}
    for requirement in requirements:
        name, _, rest = requirement.partition(">=")
        if rest:
            bare = name.split("[")[0].strip()
            pins[bare] = f"{bare}=={rest.split(',')[0].strip()}"
    return sorted(pins.values())


def main(argv: list[str]) -> None:
    if not argv or argv[1:] not in ([], ["--upgrade"]):
        sys.exit(__doc__)
    uv, upgrade = argv[0], argv[1:]
    test = ["--constraints", str(HERE / "test.txt")]
    compile_lock(uv, HERE / "test.in", "test.txt", *upgrade)
    compile_lock(uv, HERE / "serve.in", "serve.txt", *test, *upgrade)
    hashes = "--generate-hashes"
    compile_lock(uv, "-", "image-cpu.txt", hashes, *test, *upgrade, stdin=image_requirements("cpu"))
    cpu = ["--constraints", str(HERE / "image-cpu.txt")]
    compile_lock(uv, "-", "image-gpu.txt", hashes, *cpu, *upgrade, stdin=image_requirements("gpu"))
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    # Constraints, not overrides: a lower bound that the rest of the test environment cannot
    # install beside (or that rnnserve's own code outgrew) fails the lock here, instead of
    # writing a lock pip then refuses to install.
    bounds = HERE / "minimums.constraints"
    bounds.write_text("".join(line + "\n" for line in lower_bounds(project)))
    try:
        # test.in less its exact torch pin: torch comes from the train extra, at its bound.
        lines = (HERE / "test.in").read_text().splitlines(keepends=True)
        source = "".join(line for line in lines if not line.startswith("torch=="))
        # For the Python and platform the suite runs on: the oldest releases never supported
        # the newest Pythons (numpy 1.26 and 3.13).
        compile_lock(
            uv, "-", "minimums.txt", "--constraints", str(bounds), *upgrade,
            stdin=source, universal=False,
        )  # fmt: skip
    finally:
        bounds.unlink()


if __name__ == "__main__":
    main(sys.argv[1:])
