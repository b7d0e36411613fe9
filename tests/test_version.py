"""One version, defined once (pyproject's [project].version), reaches every place that names it:
the installed distribution, `rnnserve --version`, the server's start line and ServerMetadata,
the Helm chart, the KServe runtime, the kustomize base and GPU overlay, and CHANGELOG.md; and
`make version VERSION=X.Y.Z` moves all of them at once. (The wheel's version is checked in
tests/test_packaging.py, the images' tags and label in tests/deploy.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import tritonclient.grpc as triton
import yaml

import rnnserve
from tests.conftest import ROOT, VERSION, project_version, run_cli
from tests.server import serving

SET_VERSION_FILES = (
    "Makefile",
    "pyproject.toml",
    "CHANGELOG.md",
    "deploy/set-version.py",
    "deploy/helm/rnnserve",
    "deploy/kserve",
    "deploy/kustomize",
    "native/Cargo.toml",
    "native/Cargo.lock",
    "tests/tools/install-helm.sh",
)
"""What `make version` reads and writes: the tree a copy needs to run it."""
HELM = ROOT / "build" / "helm" / "bin" / "helm"
CRATE = "rnnserve-native"
"""The native transport's crate, released under the same version."""


def tag(image: str) -> str:
    """The tag of an image reference `name:tag`."""
    return image.rpartition(":")[2]


def manifest_versions(root: Path = ROOT) -> dict[str, str]:
    """What each file under `root` that carries a copy of the version says it is."""
    chart = yaml.safe_load((root / "deploy/helm/rnnserve/Chart.yaml").read_text())
    (runtime,) = yaml.safe_load_all((root / "deploy/kserve/servingruntime.yaml").read_text())
    base = list(yaml.safe_load_all((root / "deploy/kustomize/base/rnnserve.yaml").read_text()))
    (deployment,) = (d for d in base if d["kind"] == "Deployment")
    overlay = yaml.safe_load(
        (root / "deploy/kustomize/overlays/gpu/kustomization.yaml").read_text()
    )
    (gpu_image,) = overlay["images"]
    labels = {d["metadata"]["labels"]["app.kubernetes.io/version"] for d in base}
    (label,) = labels  # one version across the base's objects
    with (root / "native" / "Cargo.toml").open("rb") as file:
        crate = tomllib.load(file)["package"]["version"]
    with (root / "native" / "Cargo.lock").open("rb") as file:
        (locked,) = (p["version"] for p in tomllib.load(file)["package"] if p["name"] == CRATE)
    changelog = (root / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    return {
        "pyproject.toml": project_version(root),
        "Chart.yaml version": str(chart["version"]),
        "Chart.yaml appVersion": chart["appVersion"],
        "kserve runtime image": tag(runtime["spec"]["containers"][0]["image"]),
        "kustomize base image": tag(
            deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        ),
        "kustomize base label": label,
        "kustomize gpu overlay tag": gpu_image["newTag"].removesuffix("-gpu"),
        "CHANGELOG.md latest release": released[0],
        "native/Cargo.toml": crate,
        "native/Cargo.lock": locked,
    }


def test_every_manifest_names_the_project_version() -> None:
    versions = manifest_versions()
    assert versions == dict.fromkeys(versions, VERSION), "run `make version VERSION=...`"


def test_changelog_keeps_an_unreleased_section_on_top() -> None:
    headings = re.findall(r"^## .*$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "## [Unreleased]", headings


def test_installed_package_reports_the_project_version() -> None:
    """The metadata of the installed (editable) distribution is written at install time: a
    version changed since is stale until `make install-test` installs it again."""
    assert metadata.version("rnnserve") == VERSION, "reinstall: `make install-test`"
    assert rnnserve.__version__ == VERSION
    done = run_cli("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rnnserve {VERSION}"


def test_server_names_its_version_on_start_and_in_its_metadata(tmp_path: Path) -> None:
    with serving(tmp_path, "--metrics-port", "off") as server:
        with triton.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}") as client:
            served = client.get_server_metadata().version
        (start,) = (line for line in server.log_text().splitlines() if "msg=serving " in line)
    assert served == VERSION
    assert f"msg=serving version={VERSION} transport=" in start, start


def test_make_version_sets_every_copy_and_dates_the_unreleased_changes(tmp_path: Path) -> None:
    """`make version` in a copy of the files it touches: every copy of the version moves, the
    kustomize base is rendered again, and the Unreleased entries become the new version's."""
    for name in SET_VERSION_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tmp_path / name)
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    unreleased = (ROOT / "CHANGELOG.md").read_text().split("## [Unreleased]\n")[1]
    new = "9.18.27"
    done = subprocess.run(
        ["make", "--no-print-directory", "version", f"VERSION={new}", f"HELM={HELM}",
         f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    versions = manifest_versions(tmp_path)
    assert versions == dict.fromkeys(versions, new)
    changelog = (tmp_path / "CHANGELOG.md").read_text()
    assert re.search(
        rf"^## \[Unreleased\]\n\n## \[{new}\] - \d{{4}}-\d{{2}}-\d{{2}}\n", changelog, re.M
    )
    assert changelog.split(f"## [{new}] - ")[1].split("\n", 1)[1] == unreleased
    # Everything else is left as it was.
    before = (ROOT / "deploy/helm/rnnserve/Chart.yaml").read_text()
    after = (tmp_path / "deploy/helm/rnnserve/Chart.yaml").read_text()
    assert after == before.replace(VERSION, new)

    again = subprocess.run(
        ["make", "--no-print-directory", "version", f"VERSION={new}", f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode != 0 and f"the version is {new} already" in again.stderr


@pytest.mark.parametrize("wrong", ["1.2", "1.0.0rc1", "1.0.0-rc.1", "v1.2.3"])
def test_make_version_takes_only_a_release_number(wrong: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "set-version.py"), wrong, "/nonexistent"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "X.Y.Z" in done.stderr
