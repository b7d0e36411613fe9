"""The dependency rules of the package, read from its source: one-way layers and no cycles.

`api -> serving (the engine) -> batching (scheduling) -> sessions / runtime` (../shared/STYLE.md):
the API never touches a batch, the arena or ONNX Runtime; the batcher only schedules; the
runtime knows nothing of gRPC or Prometheus; metrics read the engine's snapshots only.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE_DIRS = {"rnnserve": ROOT / "service", "rnnserve.models": ROOT / "models"}


def _module_name(path: Path) -> str:
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda p: -len(str(p[1]))):
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join((package, *parts))
    raise AssertionError(path)


def _imports(path: Path, module: str) -> set[str]:
    """Every module `module` imports, absolute, wherever in the file the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in (ROOT / "service").rglob("*.py") if "_pb" not in p.parts]
    files += list((ROOT / "models").rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    return {name: _imports(path, name) for name, path in modules.items()}


GRAPH = _graph()


def _internal(imports: set[str]) -> set[str]:
    """The imported names that are modules of the package (`from a import b` may name either)."""
    return {name for name in imports if name in GRAPH}


def _of(prefix: str) -> dict[str, set[str]]:
    return {m: i for m, i in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def test_the_graph_is_read() -> None:
    assert "rnnserve.serving.model" in GRAPH and "rnnserve.models.export" in GRAPH
    assert "rnnserve.batching.batcher" in GRAPH["rnnserve.serving.model"]


def test_no_import_cycles() -> None:
    edges = {m: _internal(i) - {m} for m, i in GRAPH.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(edges[module]):
            # A package's __init__ is imported with any module of it: not an edge of its own.
            if not module.startswith(target + "."):
                visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("rnnserve.api", ("rnnserve.batching", "rnnserve.runtime", "rnnserve.sessions",
                          "onnxruntime", "rnnserve.serving.execution")),
        ("rnnserve.batching", ("rnnserve.serving", "rnnserve.sessions", "rnnserve.runtime",
                               "rnnserve.api", "grpc", "prometheus_client", "numpy")),
        ("rnnserve.serving", ("rnnserve.api", "grpc", "prometheus_client", "rnnserve.metrics")),
        ("rnnserve.sessions", ("rnnserve.serving", "rnnserve.batching", "rnnserve.api", "grpc",
                               "prometheus_client")),
        ("rnnserve.runtime", ("grpc", "prometheus_client", "rnnserve.serving",
                              "rnnserve.batching", "rnnserve.sessions", "rnnserve.api")),
        ("rnnserve.repository", ("rnnserve.serving", "rnnserve.batching", "rnnserve.api")),
        ("rnnserve.models", ("rnnserve.serving", "rnnserve.api", "rnnserve.batching",
                             "rnnserve.sessions", "rnnserve.cli", "rnnserve.config")),
        ("rnnserve", ("torch", "rnnserve_bench", "tests")),
    ],
)  # fmt: skip
def test_layers_import_only_downward(layer: str, forbidden: tuple[str, ...]) -> None:
    modules = _of(layer)
    if layer == "rnnserve":  # the server: the training code may import torch
        modules = {m: i for m, i in modules.items() if not m.startswith("rnnserve.models")}
    assert modules
    for module, imports in modules.items():
        bad = sorted(i for i in imports if any(i == f or i.startswith(f + ".") for f in forbidden))
        assert not bad, f"{module} imports {bad}"


def test_metrics_read_only_the_engines_snapshots() -> None:
    engine = {i for i in GRAPH["rnnserve.metrics"] if i.startswith("rnnserve.")}
    assert engine and all(i.startswith("rnnserve.serving.snapshot") for i in engine), engine


def test_the_servicer_sees_no_work_item() -> None:
    source = (ROOT / "service" / "api" / "servicer.py").read_text()
    assert "Work" not in source.split() and "Step" not in source.split()
