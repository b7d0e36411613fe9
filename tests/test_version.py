"""One version, defined once (pyproject's [project].version), reaches every place that names it:
the installed distribution, `rnnserve --version`, the server's start line and ServerMetadata,
the Helm chart, the KServe runtime, and the kustomize base and GPU overlay."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tritonclient.grpc as triton
import yaml

import rnnserve
from tests.conftest import ROOT, VERSION, project_version, run_cli
from tests.server import serving


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
    }


def test_every_manifest_names_the_project_version() -> None:
    versions = manifest_versions()
    assert versions == dict.fromkeys(versions, VERSION)


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
    assert f"msg=serving version={VERSION} grpc=127.0.0.1:" in start, start
