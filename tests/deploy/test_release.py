"""`make release` and `make image-push`, run as a maintainer runs them.

The release is of the commit checked out (an export of HEAD, whatever the working tree holds):
its wheel, sdist, CPU image (a `podman save` archive) and packaged Helm chart, each at the
project's version, with a SHA256SUMS over them. The image is pushed to a real registry (the
CNCF distribution registry, Debian's docker-registry, on a free loopback port) and pulled back
into an empty storage: what arrives is the archive's image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, VERSION
from tests.deploy.test_image import NATIVE, podman
from tests.triton_server import free_ports

WHEEL_SOURCES = ("pyproject.toml", "MANIFEST.in", "README.md", "service", "models")
ARTIFACTS = {
    f"rnnserve-{VERSION}-py3-none-any.whl",
    f"rnnserve-{VERSION}.tar.gz",
    f"rnnserve-{VERSION}-image-cpu.tar",
    f"rnnserve-{VERSION}.tgz",
    *([f"rnnserve_native-{VERSION}-cp311-abi3-linux_x86_64.whl"] if NATIVE else []),
}
"""What a release holds beside SHA256SUMS: the wheel, the sdist, the image and the chart, and
where cargo is, the native transport's wheel (one for every CPython from 3.11)."""
RELEASED_IMAGE = f"localhost/rnnserve:{VERSION}"
REGISTRY_START_TIMEOUT_S = 30.0


def make(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make release`, into a folder of the test's own (DIST) instead of dist/<version>."""
    dist = tmp_path_factory.mktemp("dist")
    done = make("release", f"DIST={dist}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    return dist


def test_release_holds_each_artifact_and_their_checksums(release: Path) -> None:
    assert {path.name for path in release.iterdir()} == {*ARTIFACTS, "SHA256SUMS"}
    listed = [
        line.split(maxsplit=1)[1] for line in (release / "SHA256SUMS").read_text().splitlines()
    ]
    assert sorted(listed) == sorted(ARTIFACTS)
    done = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"],
        capture_output=True, text=True, timeout=120, cwd=release,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_release_is_of_the_commit_not_the_working_tree(release: Path, tmp_path: Path) -> None:
    """The sdist holds the wheel's sources and nothing else, HEAD's, byte for byte, and so is
    what the wheel holds."""
    head = tmp_path / "head"
    head.mkdir()
    archive = subprocess.run(
        ["git", "archive", "HEAD", *WHEEL_SOURCES], capture_output=True, check=True, cwd=ROOT
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
    prefix = f"rnnserve-{VERSION}/"
    generated = ("PKG-INFO", "setup.cfg", "rnnserve.egg-info/")  # by setuptools, into the sdist
    with tarfile.open(release / f"rnnserve-{VERSION}.tar.gz") as sdist:
        files = [m for m in sdist.getmembers() if m.isfile()]
        sources = {
            name: sdist.extractfile(member).read()
            for member in files
            if not (name := member.name.removeprefix(prefix)).startswith(generated)
        }
    assert {"service/server.py", "models/repository/charlm_lstm/1/model.onnx"} <= set(sources)
    assert {name.split("/")[0] for name in sources} == set(WHEEL_SOURCES)  # no tests/, say
    assert {name: (head / name).read_bytes() for name in sources} == sources
    with zipfile.ZipFile(release / f"rnnserve-{VERSION}-py3-none-any.whl") as wheel:
        served = wheel.read("rnnserve/server.py")
    assert served == (head / "service" / "server.py").read_bytes()


def test_released_chart_deploys_the_released_image(release: Path) -> None:
    with tarfile.open(release / f"rnnserve-{VERSION}.tgz") as chart:
        metadata = yaml.safe_load(chart.extractfile("rnnserve/Chart.yaml").read())
    assert (metadata["version"], metadata["appVersion"]) == (VERSION, VERSION)


def test_released_image_loads_with_its_version_and_commit(release: Path) -> None:
    done = podman(
        "load", "--input", str(release / f"rnnserve-{VERSION}-image-cpu.tar"), timeout=300
    )
    assert f"Loaded image: {RELEASED_IMAGE}" in done.stdout + done.stderr
    labels = json.loads(
        podman("image", "inspect", "--format", "{{json .Labels}}", RELEASED_IMAGE).stdout
    )
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] == git("rev-parse", "HEAD")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry of our own on a free loopback port, storing under tmp_path; plain HTTP."""
    (port,) = free_ports(1)
    config = tmp_path / "registry.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    log = (tmp_path / "registry.log").open("w")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, (tmp_path / "registry.log").read_text()
                assert time.monotonic() < deadline, "the registry did not answer"
                time.sleep(0.1)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


def test_image_push_sends_the_released_image_to_a_registry(release: Path, registry: str) -> None:
    pushed = f"{registry}/rnnserve:{VERSION}"
    done = make(
        "image-push", f"REGISTRY={registry}", f"DIST={release}", "PUSH_OPTIONS=--tls-verify=false"
    )
    try:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        with urllib.request.urlopen(
            f"http://{registry}/v2/rnnserve/tags/list", timeout=10
        ) as answer:
            assert json.loads(answer.read())["tags"] == [VERSION]
        released_id = podman(
            "image", "inspect", "--format", "{{.Id}}", RELEASED_IMAGE
        ).stdout.strip()
    finally:
        # Only the name image-push gave the image: `untag` without a name removes them all.
        podman("untag", pushed, pushed, check=False)
    assert podman("image", "exists", RELEASED_IMAGE, check=False).returncode == 0

    # Pulled into an empty storage of the test's own: every layer comes from the registry.
    # (Under /tmp: podman refuses a runroot path over 50 characters.)
    with tempfile.TemporaryDirectory(prefix="rnnserve-pull-") as empty:
        storage = [
            "--root",
            f"{empty}/root",
            "--runroot",
            f"{empty}/run",
            "--storage-driver",
            "vfs",
        ]
        podman(*storage, "pull", "--quiet", "--tls-verify=false", pushed, timeout=300)
        pulled = json.loads(podman(*storage, "image", "inspect", pushed).stdout)[0]
        podman(*storage, "rmi", "--all", "--force", check=False)
    assert pulled["Id"] == released_id
    assert pulled["Config"]["Labels"]["org.opencontainers.image.version"] == VERSION


def test_image_push_refuses_without_a_registry_or_with_a_wrong_checksum(
    release: Path, tmp_path: Path
) -> None:
    done = make("image-push", f"DIST={release}", "REGISTRY=")
    assert done.returncode != 0 and "REGISTRY=" in done.stderr
    # A copy of the release whose SHA256SUMS disagrees with the image (links: no 350 MB copy).
    tampered = tmp_path / "dist"
    tampered.mkdir()
    for path in release.iterdir():
        if path.name != "SHA256SUMS":
            os.link(path, tampered / path.name)
    sums = (release / "SHA256SUMS").read_text().splitlines()
    sums = [("0" * 64 + line[64:]) if line.endswith("-image-cpu.tar") else line for line in sums]
    (tampered / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    done = make("image-push", f"DIST={tampered}", "REGISTRY=127.0.0.1:9")
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
    assert "podman load" not in done.stdout
