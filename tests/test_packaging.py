"""What ships: the wheel holds the server and its bundled models under one import name and no
benchmark, at the project's version; the sdist and wheel `make wheels` builds are the same
bytes from any copy of the sources, and the sdist leaves nothing out; serving never imports
torch; the command lists the bundled models and says how to get the benchmark where it is not
installed."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, VERSION

WHEEL_SOURCES = ("pyproject.toml", "MANIFEST.in", "README.md", "service", "models")
"""All the wheel is built from: the build needs no more."""
MAPPED = {"service": "rnnserve", "models": "rnnserve/models"}
"""pyproject.toml's package-dir: source folder -> path in the wheel."""
BUNDLED_FILES = ("config.pbtxt", "model_card.json", "1/model.onnx")


def copy_sources(target: Path) -> Path:
    """WHEEL_SOURCES copied under `target` (fresh modification times), without bytecode."""
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rnnserve wheel, built for real (offline, with this environment's setuptools).

    It is built from a copy of its sources: setuptools builds in the source tree and keeps
    what it copied into build/lib, so a module deleted from service/ would still ship from a
    checkout built before.
    """
    root = tmp_path_factory.mktemp("wheel")
    source = copy_sources(root / "source")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (root / "dist").glob("rnnserve-*.whl")
    return built


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """The sdist and the wheel `make wheels` builds (the wheel from the sdist, as a release
    and the images have them), twice, from two copies of the sources made a second apart."""
    builds = []
    for copy in ("a", "b"):
        source = copy_sources(tmp_path_factory.mktemp(copy))
        done = subprocess.run(
            ["make", "--no-print-directory", "wheels", f"SOURCE={source}",
             "SOURCE_DATE_EPOCH=1700000000"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        (sdist,) = (source / "build" / "sdist").glob("*.tar.gz")
        (built,) = (source / "build" / "wheels").glob("*.whl")
        builds.append((sdist, built))
        time.sleep(1.1)  # so the second copy's files are dated otherwise
    return builds


def test_sdist_and_wheel_are_reproducible(released: list[tuple[Path, Path]]) -> None:
    """Byte for byte, whatever the files' dates: SOURCE_DATE_EPOCH dates every member."""
    (sdist_a, wheel_a), (sdist_b, wheel_b) = released
    assert sdist_a.name == f"rnnserve-{VERSION}.tar.gz"
    assert sdist_a.read_bytes() == sdist_b.read_bytes()
    assert wheel_a.read_bytes() == wheel_b.read_bytes()
    with tarfile.open(sdist_a) as archive:
        assert {member.mtime for member in archive.getmembers()} == {1700000000}
    with zipfile.ZipFile(wheel_a) as archive:
        assert {info.date_time for info in archive.infolist()} == {(2023, 11, 14, 22, 13, 20)}


def test_wheel_from_the_sdist_holds_what_the_tree_builds(
    released: list[tuple[Path, Path]], wheel: Path
) -> None:
    """The sdist leaves nothing out: the wheel built from it holds the same files as the one
    built from the source tree."""
    (_, from_sdist), _ = released
    assert wheel_names(from_sdist) == wheel_names(wheel)


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_wheel_installs_one_import_name(wheel: Path) -> None:
    names = wheel_names(wheel)
    tops = {name.split("/")[0] for name in names}
    (dist_info,) = (top for top in tops if top.endswith(".dist-info"))
    assert tops - {dist_info} == {"rnnserve"}
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(f"{dist_info}/top_level.txt").decode().split() == ["rnnserve"]


def test_wheel_holds_no_benchmark(wheel: Path) -> None:
    words = ("bench", "torchserve", "loadgen")  # rnnserve_bench, bench/, benchmark.py, ...
    benchmark = [name for name in wheel_names(wheel) if any(w in name.lower() for w in words)]
    assert benchmark == []


def test_wheel_holds_every_module_of_the_source_tree(wheel: Path) -> None:
    """A subpackage missing from pyproject's explicit `packages` list would not ship."""
    names = wheel_names(wheel)
    expected = {
        f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, installed in MAPPED.items()
        for pattern in ("*.py", "*.pyi")
        for path in (ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert {
        "rnnserve/cli.py",
        "rnnserve/_pb/model_config_pb2.pyi",
        "rnnserve/models/zoo.py",
    } < expected
    assert expected - names == set()


def test_wheel_holds_the_bundled_models(wheel: Path) -> None:
    names = wheel_names(wheel)
    models = sorted(p.name for p in (ROOT / "models" / "repository").iterdir() if p.is_dir())
    assert models == ["charlm_lstm", "digits_lstm", "sensor_gru"]
    for model in models:
        for file in BUNDLED_FILES:
            assert f"rnnserve/models/repository/{model}/{file}" in names


def test_wheel_carries_the_project_version(wheel: Path) -> None:
    assert wheel.name == f"rnnserve-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"rnnserve-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in metadata


def test_wheel_declares_the_rnnserve_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = (n for n in archive.namelist() if n.endswith("/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    assert parser.sections() == ["console_scripts"]
    assert dict(parser["console_scripts"]) == {"rnnserve": "rnnserve.cli:main"}


def test_installed_wheel_lists_its_bundled_models(wheel: Path, tmp_path: Path) -> None:
    """The unpacked wheel, ahead of the checkout's editable install, runs on its own files."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    code = (
        "import rnnserve, rnnserve.cli; print(rnnserve.__file__); "
        "raise SystemExit(rnnserve.cli.main(['models']))"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    location, *models = done.stdout.splitlines()
    assert Path(location).is_relative_to(tmp_path), location
    assert [line.split("\t")[0] for line in models] == ["charlm_lstm", "digits_lstm", "sensor_gru"]


def test_bench_command_without_the_benchmark_says_how_to_install_it() -> None:
    # None in sys.modules makes every import of the package fail, as where it is not installed.
    code = (
        "import sys; sys.modules['rnnserve_bench'] = None; import rnnserve.cli; "
        "raise SystemExit(rnnserve.cli.main(['bench', '--quick']))"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "rnnserve bench: error: the benchmark is not installed" in done.stderr
    assert "pip install -e ./bench" in done.stderr and "make install" in done.stderr
    assert "Traceback" not in done.stderr


def test_serving_code_does_not_import_torch() -> None:
    code = (
        "import sys, rnnserve.cli, rnnserve.repository.layout, rnnserve._pb.grpc_service_pb2_grpc; "
        "rnnserve.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_command_lists_the_bundled_models(cli) -> None:
    done = cli("models")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["charlm_lstm", "digits_lstm", "sensor_gru"]
    assert all("streaming" in line and "versions 1" in line for line in lines)


def test_help_explains_every_command(cli) -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("train", "export", "models"):
        assert command in done.stdout
