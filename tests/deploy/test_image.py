"""The serving images: linted, built with podman and run as a cluster runs them.

The CPU image is built as `make image` builds it (from the wheels built on the host and the
image's lock), run read-only as its numeric user with host networking on free loopback ports,
checked against ONNX Runtime run in-process over whole sequences, and stopped with SIGTERM: it
drains and exits 0. What it installed is exactly its lock's pins and the wheel, and its tags
and label name the project's version. The GPU image needs a GPU and a few gigabytes of CUDA
wheels to build: its definition is linted, held to the CPU one's but for its NVIDIA parts, and
its lock is resolved against PyPI for the image's platform.
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
from packaging.utils import canonicalize_name
from tritonclient.utils import InferenceServerException

from tests.api.conftest import MODELS, OUTPUTS, Reference, Stream, infer_input, sequence_data
from tests.conftest import BUNDLED, ROOT, VERSION
from tests.test_locks import read_lock
from tests.triton_server import free_ports

DEPLOY = ROOT / "deploy"
CONTAINERFILES = sorted(DEPLOY.rglob("Containerfile*"))
IMAGE = "localhost/rnnserve:cpu"
"""What `make image` builds (its default IMAGE)..."""
VERSIONED = f"localhost/rnnserve:{VERSION}"
"""...and tags with the project's version, the tag the Helm chart deploys."""
LOCKS = {"Containerfile": "image-cpu.txt", "Containerfile.gpu": "image-gpu.txt"}
"""The lock each image installs."""
BASE_IMAGE = "localhost/rnnserve-base:bookworm"
PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(DEPLOY / "containers" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(DEPLOY / "containers" / "storage.conf"),
}
START_TIMEOUT_S = 90.0
NATIVE = shutil.which("cargo") is not None
"""`make wheels` builds the native transport's wheel where cargo is, and the image installs it."""
OWN_WHEELS = ("rnnserve", "rnnserve-native") if NATIVE else ("rnnserve",)
TRANSPORT = "native" if NATIVE else "grpcio"
"""What the image serves through: the native transport wherever it was built."""
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
    http_port: int

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
    grpc_port, metrics_port, http_port = free_ports(3)
    name = f"rnnserve-test-{uuid.uuid4().hex[:12]}"
    podman(
        "run", "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
        "--network", "host", "--cap-drop", "all", "--security-opt", "no-new-privileges",
        "--env", "RNNSERVE_HOST=127.0.0.1",
        "--env", f"RNNSERVE_GRPC_PORT={grpc_port}",
        "--env", f"RNNSERVE_METRICS_PORT={metrics_port}",
        "--env", f"RNNSERVE_HTTP_PORT={http_port}",
        *options, image,
    )  # fmt: skip
    try:
        container = Container(name, grpc_port, metrics_port, http_port)
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
        # The HTTP port, what KServe's serverless mode exposes and probes.
        url = f"http://127.0.0.1:{container.http_port}/v2/models/sensor_gru/ready"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200

        # `podman stop` sends the image's STOPSIGNAL, as a kubelet sends SIGTERM, and kills
        # only after --time: a drain that hung would show as exit code 137.
        podman("stop", "--time", "40", container.name, timeout=60)
        code = podman(
            "container", "inspect", "--format", "{{.State.ExitCode}}", container.name
        ).stdout.strip()
        log = container.logs()
        messages = [event["message"] for event in container.events()]
    assert code == "0", f"exit code {code}:\n{log}"
    (started,) = (m for m in messages if m.startswith("serving "))
    assert f"transport={TRANSPORT}" in started, started
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


IMAGE_ENVIRONMENT = """
import importlib.metadata, json, os, platform, sys
print(json.dumps({
    "environment": {
        "implementation_name": sys.implementation.name,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_python_implementation": platform.python_implementation(),
        "platform_system": platform.system(),
        "python_full_version": platform.python_version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
    "installed": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
    "lock": open("/opt/rnnserve/requirements.lock").read(),
}))
"""
"""What the image's Python is (the markers' variables), what it has installed and the lock it
keeps (one container: each `podman run` here takes about 20 s to come back)."""


def test_image_installs_exactly_its_lock_and_the_wheel(image: str) -> None:
    """Every distribution in the image is a pin of requirements/image-cpu.txt that applies to
    the image's Python, at that version, or one of the project's wheels (rnnserve, and the
    native transport where cargo built it), at the project's version; every
    such pin is installed. So two builds of one commit install the same versions. The lock
    itself is in the image, as installed."""
    done = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python", image,
        "-c", IMAGE_ENVIRONMENT,
    )  # fmt: skip
    probe = json.loads(done.stdout)
    installed = {canonicalize_name(n): v for n, v in probe["installed"].items()}
    lock = ROOT / "requirements" / "image-cpu.txt"
    pins = {p.name: str(p.version) for p in read_lock(lock) if p.applies(probe["environment"])}
    assert installed == {**pins, **dict.fromkeys(OWN_WHEELS, VERSION)}
    # A marker that picks by Python version is evaluated, not skipped: bookworm's 3.11.2 needs
    # the backport the lock pins for Pythons before 3.11.3.
    assert probe["environment"]["python_full_version"] == "3.11.2"
    assert "async-timeout" in installed
    assert probe["lock"] == lock.read_text()


def test_image_is_tagged_and_labelled_with_the_project_version(image: str) -> None:
    """`make image` tags the version beside IMAGE, and labels the image with the version and
    the commit it was built from."""
    ids = {
        ref: podman("image", "inspect", "--format", "{{.Id}}", ref).stdout
        for ref in (image, VERSIONED)
    }
    assert ids[image] == ids[VERSIONED]
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout)
    assert labels["org.opencontainers.image.version"] == VERSION
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert labels["org.opencontainers.image.revision"] in (head, f"{head}-dirty")


def test_revision_label_is_the_build_s_not_the_layer_cache_s(image: str) -> None:
    """Two builds of one tree for two commits, every layer from the cache: each image is
    labelled with its own (a LABEL instruction would be served from the cache as it was)."""
    repository = f"localhost/rnnserve-test-{uuid.uuid4().hex[:12]}"
    try:
        for revision in ("first", "second"):
            done = subprocess.run(
                ["make", "--no-print-directory", "image", f"IMAGE_REPOSITORY={repository}",
                 f"IMAGE={repository}:{revision}", f"REVISION={revision}"],
                capture_output=True, text=True, timeout=600, cwd=ROOT,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
            label = '{{index .Labels "org.opencontainers.image.revision"}}'
            inspected = podman("image", "inspect", "--format", label, f"{repository}:{revision}")
            assert inspected.stdout.strip() == revision
    finally:
        for tag in ("first", "second", VERSION):
            podman("rmi", f"{repository}:{tag}", check=False)


def test_build_context_holds_only_what_the_images_copy(
    image: str, base_image: str, tmp_path: Path
) -> None:
    """.dockerignore lets through the wheels, the locks, the bundled models and the health
    check, and no sources: a build that lists its context sees only those."""
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text(
        f"FROM {base_image}\nCOPY . /context\nRUN cd /context && find . -type f | sort\n"
    )
    iid = tmp_path / "iid"
    done = podman(
        "build", "--no-cache", "--network", "none", "--iidfile", str(iid),
        "-f", str(containerfile), str(ROOT),
        timeout=300,
    )  # fmt: skip
    podman("rmi", iid.read_text().strip(), check=False)  # an image of no use once listed
    files = {line[2:] for line in done.stdout.splitlines() if line.startswith("./")}
    wheels = {f for f in files if f.startswith("build/wheels/")}
    assert wheels and all(f.endswith(".whl") for f in wheels), wheels
    models = {f for f in files if f.startswith("models/repository/")}
    assert {f"models/repository/{m}/1/model.onnx" for m in MODELS} <= models
    assert files - wheels - models == {
        "requirements/image-cpu.txt",
        "requirements/image-gpu.txt",
        "deploy/healthcheck.py",
    }


def build_stage(containerfile: Path) -> list[str]:
    """The first stage's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", containerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    stage = [line for line in lines if not line.startswith("#")]
    froms = [i for i, line in enumerate(stage) if line.startswith("FROM ")]
    return stage[froms[0] + 1 : froms[1]]


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda path: path.name)
def test_images_install_their_lock_with_hashes_then_the_wheels(containerfile: Path) -> None:
    """The lock first, with --require-hashes and wheels only, then every wheel of
    build/wheels/ without dependencies and offline; nothing is built from sources."""
    stage = build_stage(containerfile)
    lock = f"COPY requirements/{LOCKS[containerfile.name]} /opt/rnnserve/requirements.lock"
    wheels = "COPY build/wheels/ /tmp/wheels/"
    assert lock in stage and wheels in stage
    install_lock, install_wheels = (
        next(line for line in stage[stage.index(copy) :] if line.startswith("RUN "))
        for copy in (lock, wheels)
    )
    assert stage.index(lock) < stage.index(wheels)
    for option in ("--require-hashes", "--only-binary=:all:", "/opt/rnnserve/requirements.lock"):
        assert option in install_lock
    for option in ("--no-deps", "--no-index", "/tmp/wheels/*.whl", " check "):
        assert option in install_wheels
    assert not any(
        line.startswith(("COPY service", "COPY pyproject", "COPY models ")) for line in stage
    )


def test_gpu_image_builds_as_the_cpu_image_does() -> None:
    """The two build stages are the same but for the lock and the CUDA libraries' list."""
    cpu = build_stage(DEPLOY / "Containerfile")
    gpu = build_stage(DEPLOY / "Containerfile.gpu")
    cuda = [line for line in gpu if "rnnserve-cuda.conf" in line]
    assert len(cuda) == 1
    as_cpu = [line.replace("image-gpu.txt", "image-cpu.txt") for line in gpu if line not in cuda]
    assert as_cpu == cpu


def test_gpu_lock_resolves_for_the_image_platform(tmp_path: Path) -> None:
    """pip resolves the GPU image's lock, hashes required, to wheels for the image's Python and
    glibc: onnxruntime-gpu and NVIDIA's CUDA and cuDNN wheels, never the CPU onnxruntime beside
    it. (The GPU image itself is never built here: gigabytes of CUDA wheels, and no GPU.)"""
    lock = ROOT / "requirements" / "image-gpu.txt"
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, GLIBC[1] + 1)]
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "--require-hashes", "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp",
         *(f"--platform={p}" for p in platforms), "--requirement", str(lock)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs
    }
    # pip picks wheels for the platform and Python asked for, but evaluates the lock's markers
    # for the Python that runs it: the pins that apply here are those it resolved.
    assert resolved == {p.name: str(p.version) for p in read_lock(lock) if p.applies()}
    assert "onnxruntime-gpu" in resolved and "onnxruntime" not in resolved, resolved
    for library in ("nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-ml-py"):
        assert any(name.startswith(library) for name in resolved), (library, resolved)


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
    # HTTP (KServe v2 REST), gRPC, metrics: the ports the chart's container declares.
    assert cpu["EXPOSE"] == ["8000 8001 8002"]
    # The same probe; the GPU image may take longer to start (CUDA initialises first).
    (cpu_probe,), (gpu_probe,) = cpu["HEALTHCHECK"], gpu["HEALTHCHECK"]
    assert gpu_probe.split(" CMD ")[1] == cpu_probe.split(" CMD ")[1]
    assert [e for e in gpu["ENV"] if not e.startswith("NVIDIA_")] == cpu["ENV"]
    assert {"NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"} <= set(
        gpu["ENV"]
    )
    assert [c for c in gpu["COPY"] if "ld.so.conf.d" not in c] == cpu["COPY"]
    assert gpu["RUN"] == [*cpu["RUN"], "ldconfig"]
    assert gpu["LABEL"] == cpu["LABEL"] and gpu["ARG"] == cpu["ARG"]
