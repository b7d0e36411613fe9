"""The locks (requirements/*.txt): each pins, within pyproject's ranges, every requirement of
the environment it is for, and the environment the tests run in is exactly its lock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

LOCKS = ROOT / "requirements"
OWN = {"rnnserve", "rnnserve-bench", "rnnserve-native"}
"""The clone's own distributions: installed from the clone, never pinned."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashed: bool

    def applies(self, environment: dict[str, str] | None = None) -> bool:
        return self.marker is None or self.marker.evaluate(environment)


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock as uv writes it: `name==version[ ; marker][ \\]`, hashes and `# via`
    annotations on the lines below."""
    pins = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.startswith(" "), f"{path.name}: unexpected continuation {line!r}"
        spec, _, marker = line.split("--hash")[0].partition(";")
        name, equals, version = spec.strip().partition("==")
        assert equals, f"{path.name}: {line!r} is not an exact pin"
        pins.append(
            Pin(
                canonicalize_name(name),
                Version(version.strip()),
                Marker(marker.strip()) if marker.strip() else None,
                "--hash=sha256:" in line,
            )
        )
    return pins


def project(path: Path) -> dict:
    with path.open("rb") as file:
        return tomllib.load(file)["project"]


RNNSERVE = project(ROOT / "pyproject.toml")
BENCH = project(ROOT / "bench" / "pyproject.toml")


def requirements(table: dict, *extras: str) -> list[Requirement]:
    lines = list(table["dependencies"])
    for extra in extras:
        lines += table["optional-dependencies"][extra]
    return [
        Requirement(line) for line in lines if canonicalize_name(Requirement(line).name) not in OWN
    ]


def image_requirements(flavour: str) -> list[Requirement]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "image-requirements.py"), flavour],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return [Requirement(line) for line in done.stdout.splitlines()]


ENVIRONMENTS = {
    "test.txt": lambda: [
        *requirements(RNNSERVE, "train", "test"),
        *requirements(BENCH, "peers"),
        Requirement("torch==2.13.0"),
    ],
    "serve.txt": lambda: [*requirements(RNNSERVE), *requirements(BENCH)],
    "image-cpu.txt": lambda: image_requirements("cpu"),
    "image-gpu.txt": lambda: image_requirements("gpu"),
}
"""Each lock and what pyproject requires of its environment."""


def test_every_lock_is_checked() -> None:
    assert {p.name for p in LOCKS.glob("*.txt")} == {*ENVIRONMENTS, "minimums.txt"}


@pytest.mark.parametrize("lock", sorted(ENVIRONMENTS))
def test_lock_pins_every_requirement_within_its_range(lock: str) -> None:
    """A requirement with no pin, or a pin outside its range, fails: `make lock` is owed."""
    pins = read_lock(LOCKS / lock)
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    problems = []
    for requirement in ENVIRONMENTS[lock]():
        name = canonicalize_name(requirement.name)
        if name not in by_name:
            problems.append(f"{requirement} has no pin")
        for pin in by_name.get(name, []):
            # prereleases=True: the lock decides; a range never excludes what it pinned.
            if not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{name}=={pin.version} is outside {requirement}")
    assert problems == [], f"{lock} disagrees with pyproject (run `make lock`): {problems}"


@pytest.mark.parametrize("lock", sorted(ENVIRONMENTS))
def test_lock_holds_exact_versions_only_once_per_environment(lock: str) -> None:
    """A name pinned twice is pinned for disjoint environments (Python versions, platforms)."""
    pins = read_lock(LOCKS / lock)
    for python in ("3.11.2", "3.11.7", "3.12.0", "3.13.0"):
        environment = {"python_full_version": python, "python_version": python[:4]}
        names = [p.name for p in pins if p.applies(environment)]
        assert len(names) == len(set(names)), (lock, python)


def test_image_locks_carry_hashes_and_the_test_lock_none() -> None:
    """The images install with --require-hashes; the test environment cannot: torch comes from
    a local CPU wheel on some machines and from the registry on others, one pin for both."""
    for lock in ("image-cpu.txt", "image-gpu.txt"):
        assert all(pin.hashed for pin in read_lock(LOCKS / lock)), lock
    test = read_lock(LOCKS / "test.txt")
    assert not any(pin.hashed for pin in test)
    (torch,) = (pin for pin in test if pin.name == "torch")
    # A local label (2.13.0+cpu) satisfies the pin, as PEP 440 says of `==` without one.
    assert Requirement(f"torch=={torch.version}").specifier.contains("2.13.0+cpu")


def test_the_serving_and_image_locks_agree_with_the_test_lock() -> None:
    """What serves is what the tests ran: every version the serving install and the CPU image
    share with the test environment is the same."""
    test = {(p.name, str(p.marker)): p.version for p in read_lock(LOCKS / "test.txt")}
    for lock in ("serve.txt", "image-cpu.txt"):
        for pin in read_lock(LOCKS / lock):
            assert test.get((pin.name, str(pin.marker)), pin.version) == pin.version, (lock, pin)


def test_minimums_pin_each_claimed_lower_bound() -> None:
    pins = {p.name: p.version for p in read_lock(LOCKS / "minimums.txt")}
    for requirement in requirements(RNNSERVE, "train"):
        for spec in requirement.specifier:
            if spec.operator == ">=":
                assert pins[canonicalize_name(requirement.name)] == Version(spec.version), spec


def via(lock: Path) -> dict[str, set[str]]:
    """uv's annotations: each pinned name -> the names that require it."""
    required_by: dict[str, set[str]] = {}
    current = None
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            current = canonicalize_name(re.split(r"[=; \\]", line, maxsplit=1)[0])
            required_by[current] = set()
        elif current and (match := re.match(r"\s+#\s+(?:via\s+)?([A-Za-z0-9._-]+)(\s|$)", line)):
            if match.group(1) not in ("via", "-r", "-c"):
                required_by[current].add(canonicalize_name(match.group(1)))
    return required_by


def only_through(root: str, required_by: dict[str, set[str]]) -> set[str]:
    """Names the lock holds only because `root` requires them, directly or not."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, parents in required_by.items():
            if name not in found and parents and parents <= {root, *found}:
                found.add(name)
                changed = True
    return found


def test_the_installed_environment_is_its_lock() -> None:
    """`pip freeze` of this environment against its lock (test.txt; RNNSERVE_TEST_LOCK names
    another): every distribution installed is pinned at the version installed, and every pin
    for this Python and platform is installed, but for what only the registry's CUDA build of
    torch pulls in where a CPU build (2.13.0+cpu) was installed instead."""
    lock = ROOT / os.environ.get("RNNSERVE_TEST_LOCK", "requirements/test.txt")
    pins = {p.name: p.version for p in read_lock(lock) if p.applies()}
    # setuptools (71 and later) appends its _vendor folder to sys.path when imported (torch 2.4
    # imports it): what lies there is part of setuptools, not installed.
    path = [entry for entry in sys.path if Path(entry).name != "_vendor"]
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in metadata.distributions(path=path)
    }
    stray = {
        name: str(version)
        for name, version in installed.items()
        if name not in OWN and (name not in pins or Version(version.public) != pins[name])
    }
    assert stray == {}, f"installed, not as {lock.name} pins (`make clean install-test`)"
    missing = set(pins) - set(installed)
    torch = installed.get("torch")
    if torch is not None and torch.local:
        missing -= only_through("torch", via(lock))
    assert missing == set(), f"pinned in {lock.name}, not installed"
