"""The serving images: linted, built with podman and run as a cluster runs them.

The CPU image is built as `make image` builds it, run read-only as its numeric user with host
networking on free loopback ports, checked against ONNX Runtime run in-process over whole
sequences, and stopped with SIGTERM: it drains and exits 0. The GPU image needs a GPU and a
few gigabytes of CUDA wheels to build: its definition is linted, built up to the stage that
lists its requirements, and those are resolved against PyPI for the image's platform.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.api.conftest import MODELS, OUTPUTS, Reference, Stream, infer_input, sequence_data
from tests.conftest import BUNDLED, ROOT
from tests.triton_server import free_ports

DEPLOY = ROOT / "deploy"
CONTAINERFILES = sorted(DEPLOY.rglob("Containerfile*"))
IMAGE = "localhost/rnnserve:cpu"
"""What `make image` builds (its default IMAGE)."""
BASE_IMAGE = "localhost/rnnserve-base:bookworm"
PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(DEPLOY / "containers" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(DEPLOY / "containers" / "storage.conf"),
}
START_TIMEOUT_S = 90.0
GLIBC = (2, 36)
"""Debian bookworm's, the images' base: the newest manylinux wheels they can install."""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV
    )
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


def test_both_images_are_defined() -> None:
    assert {path.name for path in CONTAINERFILES} == {"Containerfile", "Containerfile.gpu"}


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(containerfile: Path) -> None:
    """Every rule, down to style, with no inline `hadolint ignore` honoured."""
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    done = subprocess.run(
        [str(hadolint), "--format", "json", "--failure-threshold", "style",
         "--disable-ignore-pragma", str(containerfile)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert json.loads(done.stdout) == [], done.stdout
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def base_image() -> str:
    """The images' default base, made with debootstrap unless podman already holds it."""
    done = subprocess.run(
        [str(DEPLOY / "base-image.sh"), BASE_IMAGE],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=PODMAN_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(base_image: str) -> str:
    """The CPU image, built by `make image` (podman's layer cache keeps a rebuild short)."""
    done = subprocess.run(
        ["make", "--no-print-directory", "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={base_image}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    return IMAGE


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@dataclass(frozen=True)
class Container:
    name: str
    grpc_port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def events(self) -> list[dict]:
        """The server's log events, in order (JSON lines, on the container's stderr; ONNX
        Runtime's own lines are text)."""
        lines = podman("logs", self.name).stderr.splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def status(self) -> str:
        return podman("container", "inspect", "--format", "{{.State.Status}}", self.name).stdout

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with triton.InferenceServerClient(self.target) as client:
            while True:
                try:
                    if client.is_server_ready():
                        return
                except InferenceServerException:
                    pass  # not listening yet
                status = self.status().strip()
                if status != "running" or time.monotonic() > deadline:
                    pytest.fail(f"{self.name} is {status}, not serving:\n{self.logs()[-6000:]}")
                time.sleep(0.25)


@contextmanager
def running(image: str, *options: str) -> Iterator[Container]:
    """`image` run as a restricted pod runs it: read-only root filesystem and no writable
    mount at all (the server needs none), its own numeric user, the ports from RNNSERVE_
    variables on loopback. Removed afterwards, whatever happened."""
    grpc_port, metrics_port = free_ports(2)
    name = f"rnnserve-test-{uuid.uuid4().hex[:12]}"
    podman(
        "run", "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
        "--network", "host", "--cap-drop", "all", "--security-opt", "no-new-privileges",
        "--env", "RNNSERVE_HOST=127.0.0.1",
        "--env", f"RNNSERVE_GRPC_PORT={grpc_port}",
        "--env", f"RNNSERVE_METRICS_PORT={metrics_port}",
        *options, image,
    )  # fmt: skip
    try:
        container = Container(name, grpc_port, metrics_port)
        container.wait_until_serving()
        yield container
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def stream_sequences(
    target: str, sequences: dict[str, np.ndarray], cuts: list[int]
) -> dict[str, np.ndarray]:
    """Each model's sequence sent over one stream in requests cut at `cuts`, interleaved."""
    parts = list(zip(cuts[:-1], cuts[1:], strict=True))
    with triton.InferenceServerClient(target) as client:
        stream = Stream(client)
        try:
            for index, (start, end) in enumerate(parts):
                for number, (model, x) in enumerate(sequences.items()):
                    client.async_stream_infer(
                        model,
                        [infer_input(model, x[:, start:end])],
                        request_id=f"{model}/{index}",
                        sequence_id=7000 + number,
                        sequence_start=index == 0,
                        sequence_end=index == len(parts) - 1,
                    )
            results = stream.collect(len(parts) * len(sequences))
        finally:
            stream.close()
    outputs = {}
    for model in sequences:
        pieces = []
        for index in range(len(parts)):
            result, error = results[f"{model}/{index}"]
            assert error is None, error
            pieces.append(result.as_numpy(OUTPUTS[model]))
        outputs[model] = np.concatenate(pieces, axis=1)
    return outputs


def test_cpu_image_serves_sequences_read_only_and_drains_on_sigterm(
    image: str, reference: Reference
) -> None:
    config = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert config == "10001:10001", "the image must run as a numeric, non-root user"
    rng = np.random.default_rng(14)
    sequences = {model: sequence_data(model, 12, rng) for model in MODELS}
    with running(image) as container:
        # The image's HEALTHCHECK asks the gRPC health service, as a cluster's probes do.
        health = podman("healthcheck", "run", container.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        outputs = stream_sequences(container.target, sequences, [0, 3, 4, 9, 12])
        for model, x in sequences.items():
            np.testing.assert_allclose(
                outputs[model], reference.run(model, x), rtol=1e-5, atol=1e-5
            )
        url = f"http://127.0.0.1:{container.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"rnnserve_request_duration_seconds" in response.read()

        # `podman stop` sends the image's STOPSIGNAL, as a kubelet sends SIGTERM, and kills
        # only after --time: a drain that hung would show as exit code 137.
        podman("stop", "--time", "40", container.name, timeout=60)
        code = podman(
            "container", "inspect", "--format", "{{.State.ExitCode}}", container.name
        ).stdout.strip()
        log = container.logs()
        messages = [event["message"] for event in container.events()]
    assert code == "0", f"exit code {code}:\n{log}"
    draining = next(i for i, m in enumerate(messages) if m.startswith("draining"))
    assert messages[-1] == "stopped" and draining < len(messages) - 1, messages


def test_a_volume_replaces_the_bundled_repository(
    image: str, reference: Reference, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(BUNDLED / "sensor_gru", repository / "sensor_gru")
    x = sequence_data("sensor_gru", 5, np.random.default_rng(15))
    with running(image, "--volume", f"{repository}:/models:ro") as container:
        with triton.InferenceServerClient(container.target) as client:
            names = {
                model["name"] for model in client.get_model_repository_index(as_json=True)["models"]
            }
            result = client.infer(
                "sensor_gru",
                [infer_input("sensor_gru", x)],
                sequence_id=1,
                sequence_start=True,
                sequence_end=True,
            )
    assert names == {"sensor_gru"}
    np.testing.assert_allclose(
        result.as_numpy("forecast"), reference.run("sensor_gru", x), rtol=1e-5, atol=1e-5
    )


def test_serving_image_holds_no_compiler_pip_or_torch(image: str) -> None:
    probe = (
        "import importlib.util, shutil; "
        "print([n for n in ('gcc', 'cc', 'c++', 'pip', 'pip3') if shutil.which(n)], "
        "[m for m in ('torch', 'pip', 'rnnserve_bench') if importlib.util.find_spec(m)])"
    )
    done = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", probe
    )  # fmt: skip
    assert done.stdout.strip() == "[] []", done.stdout


def test_gpu_image_definition_builds_to_its_requirements_which_resolve(
    base_image: str, tmp_path: Path
) -> None:
    """The stage that lists the GPU image's requirements is built, and pip resolves them to
    wheels for the image's Python and glibc: onnxruntime-gpu and NVIDIA's CUDA and cuDNN
    wheels, never the CPU onnxruntime beside it. (podman skips the stages a target does not
    need, unparsed; hadolint, above, reads them all.)"""
    iid = tmp_path / "iid"
    podman(
        "build", "--format", "docker", "--layers", "-f", str(DEPLOY / "Containerfile.gpu"),
        "--target", "requirements", "--build-arg", f"BASE={base_image}",
        "--iidfile", str(iid), str(ROOT),
        timeout=300,
    )  # fmt: skip
    listed = podman(
        "run", "--rm", "--network", "none", iid.read_text().strip(), "cat", "/src/requirements.txt"
    ).stdout  # fmt: skip
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(listed)
    assert any(line.startswith("onnxruntime-gpu[cuda,cudnn]") for line in listed.splitlines())

    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, GLIBC[1] + 1)]
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "--only-binary=:all:", "--python-version", "3.11",
         "--implementation", "cp", *(f"--platform={p}" for p in platforms),
         "--requirement", str(requirements)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names, names
    for library in ("nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-ml-py"):
        assert any(name.startswith(library) for name in names), (library, names)


def serving_stage(containerfile: Path) -> dict[str, list[str]]:
    """The last stage's instructions by keyword, continuation lines joined, comments dropped;
    ENV split into one `NAME=value` per setting."""
    text = re.sub(r"\\\n\s*", " ", containerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    stage = [line for line in lines if not line.startswith("#")]
    last_from = max(i for i, line in enumerate(stage) if line.startswith("FROM "))
    instructions: dict[str, list[str]] = {}
    for line in stage[last_from + 1 :]:
        keyword, _, rest = line.partition(" ")
        values = rest.split() if keyword == "ENV" else [rest]
        instructions.setdefault(keyword, []).extend(values)
    return instructions


def test_gpu_image_runs_as_the_cpu_image_does() -> None:
    """The GPU image, which no test builds whole, starts, runs, is probed and stops as the
    CPU image the tests run: only its NVIDIA settings, its CUDA libraries' loader path and
    its health check's start period differ."""
    cpu = serving_stage(DEPLOY / "Containerfile")
    gpu = serving_stage(DEPLOY / "Containerfile.gpu")
    for keyword in ("USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT"):
        assert gpu[keyword] == cpu[keyword], keyword
    # The same probe; the GPU image may take longer to start (CUDA initialises first).
    (cpu_probe,), (gpu_probe,) = cpu["HEALTHCHECK"], gpu["HEALTHCHECK"]
    assert gpu_probe.split(" CMD ")[1] == cpu_probe.split(" CMD ")[1]
    assert [e for e in gpu["ENV"] if not e.startswith("NVIDIA_")] == cpu["ENV"]
    assert {"NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"} <= set(
        gpu["ENV"]
    )
    assert [c for c in gpu["COPY"] if "ld.so.conf.d" not in c] == cpu["COPY"]
    assert gpu["RUN"] == [*cpu["RUN"], "ldconfig"]
