"""torch.onnx's two exporters and rnnserve: nn.LSTM, nn.GRU and nn.RNN modules exported as users
export them, with the default (dynamo) exporter and the legacy one, imported with `rnnserve
import`, and exported with `export_module` and each exporter; then served by the real server
and compared with the module over whole sequences. And what `import` refuses, it leaves nothing
of.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper

from rnnserve.cli import main as rnnserve_main
from rnnserve.models import export_module
from rnnserve.models.export import EXPORTERS
from rnnserve.models.graph import ExportError, checking_session
from tests.conftest import ROOT, run_cli
from tests.models.test_byom import (
    CASES,
    TOLERANCE,
    assert_equals_the_module,
    stream_sequences,
)
from tests.server import RunningServer, serving

CELLS = {"tagger": "LSTM", "sensor": "GRU", "tokens": "GRU", "rnn2": "RNN"}
"""The user modules of test_byom with each recurrent cell: a time-major nn.LSTM, a time-major
2-layer nn.GRU, a batch-first nn.GRU over token ids, a time-major 2-layer nn.RNN."""
EXPORTS = ("dynamo", "legacy")


class TorchRefused(Exception):
    """torch.onnx.export failed; the message is the end of what it printed."""


EXPORT_SCRIPT = """
import json, sys
from pathlib import Path
from tests.models.test_byom import CASES, torch_export
for name, path, dynamo, axes in json.loads(sys.argv[1]):
    axes = {tensor: {int(k): v for k, v in named.items()} for tensor, named in axes.items()}
    torch_export(CASES[name], Path(path), dynamo, axes)
"""


def torch_export(name: str, path: Path, dynamo: bool, dynamic_time: bool = True) -> None:
    """Plain torch.onnx.export, as a user's script calls it: batch (and time) marked dynamic, in
    a process of its own (torch.export keeps state from one export to the next in a process:
    seen with torch 2.13, a batch-first nn.GRU exported after a 2-layer time-major one was
    refused its dynamic time axis). TorchRefused when torch fails."""
    torch_exports([(name, path)], dynamo, dynamic_time)


def torch_exports(jobs: list[tuple[str, Path]], dynamo: bool, dynamic_time: bool = True) -> None:
    """torch_export of each (cell, path) of `jobs`, in one process: for the legacy exporter,
    which keeps no state from one export to the next (each torch import costs seconds)."""
    work = []
    for name, path in jobs:
        case = CASES[name]
        axes = {tensor: dict(named) for tensor, named in case.dynamic_axes().items()}
        if not dynamic_time:
            time_axis = 0 if case.time_major else 1
            for tensor in (case.input_names[0], case.output_names[0]):
                del axes[tensor][time_axis]
        work.append([name, str(path), dynamo, axes])
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, json.dumps(work)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise TorchRefused(done.stderr[-2000:])


def one_step_fails(path: Path, name: str) -> bool:
    """Whether ONNX Runtime refuses the graph for a one-step input (the pinned-length fault)."""
    case = CASES[name]
    session = checking_session(path)
    x = case.example.numpy()
    one = x[:1] if case.time_major else x[:, :1]
    feeds = {case.input_names[0]: one}
    states = case.state if isinstance(case.state, tuple) else (case.state,)
    for input_name, state in zip(case.input_names[1:], states, strict=True):
        feeds[input_name] = state.numpy()
    try:
        session.run(None, feeds)
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
        return True
    return False


@dataclass(frozen=True)
class Made:
    """What one (module, exporter) came to."""

    source: Path
    imported: dict | None
    """`rnnserve import`'s report; None where torch's exporter could not keep the time axis
    dynamic (torch.export unrolls nn.RNN over the example's steps)."""
    export_error: str | None
    """Why export_module with this exporter alone refused the module; None: it published."""


def make(name: str, exporter: str, root: Path, repo: Path, refused: set[str]) -> Made:
    """`refused`: the cells torch's dynamo exporter refused (the exports are made beforehand)."""
    source = root / f"{name}_{exporter}.onnx"
    if exporter == "dynamo" and name in refused:
        imported = None
    else:
        model = f"{name}_{exporter}_imported"
        done = run_cli("import", str(source), "--name", model, "--model-repository", str(repo))
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr  # nothing from ONNX Runtime or torch
        imported = json.loads(done.stdout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            published = export_module(
                CASES[name].factory(),
                CASES[name].example,
                repo,
                f"{name}_{exporter}_exported",
                time_major=CASES[name].time_major,
                exporter=exporter,
            )
    except ExportError as error:
        return Made(source, imported, str(error))
    assert published.exporter == EXPORTERS[exporter]
    return Made(source, imported, None)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Made]:
    """Every cell exported with each exporter by torch and imported by the command, and
    exported by export_module with each exporter, into one repository."""
    root = tmp_path_factory.mktemp("exporters")

    def dynamo(name: str) -> str | None:
        try:
            torch_export(name, root / f"{name}_dynamo.onnx", dynamo=True)
        except TorchRefused:
            return name
        return None

    # The legacy exports in one process; each dynamo export in a process of its own
    # (torch_export), two at a time beside them: each process is mostly torch's import.
    with ThreadPoolExecutor(max_workers=2) as pool:
        dynamo_refused = pool.map(dynamo, CELLS)
        torch_exports([(n, root / f"{n}_legacy.onnx") for n in CELLS], dynamo=False)
        refused = {name for name in dynamo_refused if name is not None}
    repo = root / "repository"
    return {(n, e): make(n, e, root, repo, refused) for n in CELLS for e in EXPORTS}


@pytest.fixture(scope="module")
def repository(made: dict[tuple[str, str], Made]) -> Path:
    return next(iter(made.values())).source.parent / "repository"


@pytest.mark.parametrize("exporter", EXPORTS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_import_repairs_what_pins_the_length(
    name: str, exporter: str, made: dict[tuple[str, str], Made], repository: Path
) -> None:
    """A graph that fails a one-step input as exported (the dynamo exporter's Reshape after
    the recurrent node) is repaired, and says so; the result is held to the original's
    parity. The legacy exporter's graphs need no repair."""
    found = made[name, exporter]
    if found.imported is None:
        assert (name, exporter) == ("rnn2", "dynamo"), "torch refused a dynamic time axis"
        return
    repaired = [r for r in found.imported["rewrites"] if r.startswith("Reshape ")]
    if one_step_fails(found.source, name):
        assert len(repaired) == 1 and "(time 5)" in repaired[0], found.imported
        assert exporter == "dynamo"
    else:
        assert not repaired, found.imported
    parity = found.imported["parity"]
    assert parity["max_scaled_diff_vs_original"] <= TOLERANCE
    assert parity["max_scaled_diff_steps_vs_whole"] <= TOLERANCE
    card = json.loads((repository / f"{name}_{exporter}_imported" / "model_card.json").read_text())
    assert card["rewrites"] == found.imported["rewrites"]


def test_the_dynamo_lstm_export_is_repaired(made: dict[tuple[str, str], Made]) -> None:
    """The fault as reported: nn.LSTM through torch.onnx.export's default exporter fails a
    one-step input in ONNX Runtime (torch 2.13), and imports repaired."""
    found = made["tagger", "dynamo"]
    assert one_step_fails(found.source, "tagger")
    assert found.imported is not None
    assert any("after" in r and "[5, -1, 16]" in r for r in found.imported["rewrites"])


def test_a_dynamo_rnn_with_a_fixed_time_axis_is_refused_saying_what_to_do(
    made: dict[tuple[str, str], Made], tmp_path: Path
) -> None:
    """torch.export unrolls nn.RNN over the example's steps: with the time axis dynamic it
    refuses, and with it fixed `import` refuses the graph, saying how to export it instead."""
    if made["rnn2", "dynamo"].imported is not None:
        pytest.skip("this torch exports nn.RNN with a dynamic time axis")
    source = tmp_path / "rnn_fixed_time.onnx"
    torch_export("rnn2", source, dynamo=True, dynamic_time=False)
    repo = tmp_path / "repo"
    done = run_cli("import", str(source), "--name", "rnn", "--model-repository", str(repo))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "dynamic batch and time axis" in done.stderr and "dynamo=False" in done.stderr
    assert not repo.exists()
    error = made["rnn2", "dynamo"].export_error
    assert error is not None and "exporter='legacy'" in error, error


@pytest.mark.parametrize("exporter", EXPORTS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_export_module_with_each_exporter(
    name: str, exporter: str, made: dict[tuple[str, str], Made], repository: Path
) -> None:
    model = repository / f"{name}_{exporter}_exported"
    if made[name, exporter].export_error is not None:
        assert (name, exporter) == ("rnn2", "dynamo"), made[name, exporter].export_error
        assert not model.exists()
        return
    card = json.loads((model / "model_card.json").read_text())
    assert card["export"]["exporter"] == EXPORTERS[exporter]
    assert card["export"]["parity"]["max_scaled_diff_vs_torch"] <= TOLERANCE
    assert card["export"]["parity"]["max_scaled_diff_steps_vs_whole"] <= TOLERANCE


def test_export_module_says_which_exporter_it_took(tmp_path: Path) -> None:
    case = CASES["rnn2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        published = export_module(case.factory(), case.example, tmp_path, "rnn", time_major=True)
    assert published.exporter == EXPORTERS["legacy"]
    card = json.loads(published.card_path.read_text())
    assert card["export"]["exporter"] == published.exporter


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("exporters-server")
    with serving(workdir, "--model-repository", str(repository)) as running:
        yield running


SERVED = [
    (name, exporter, how)
    for name in sorted(CELLS)
    for exporter in EXPORTS
    for how in ("imported", "exported")
    if (name, exporter) != ("rnn2", "dynamo")  # torch.export cannot keep its time axis dynamic
]


@pytest.mark.parametrize(("name", "exporter", "how"), SERVED)
def test_served_streams_equal_the_module(
    name: str, exporter: str, how: str, server: RunningServer
) -> None:
    with triton.InferenceServerClient(server.target) as client:
        base = 1000 + 10 * SERVED.index((name, exporter, how))
        answers = stream_sequences(client, f"{name}_{exporter}_{how}", name, base)
        assert_equals_the_module(name, answers)


def merged_time_and_batch(path: Path) -> Path:
    """An LSTM whose output is reshaped to [T * B, H] with the example's T * B fixed (2 * 3):
    pinned in a way `import` does not rewrite."""
    rng = np.random.default_rng(0)
    hidden, features = 4, 3
    weights = {
        "W": rng.uniform(-0.5, 0.5, (1, 4 * hidden, features)).astype(np.float32),
        "R": rng.uniform(-0.5, 0.5, (1, 4 * hidden, hidden)).astype(np.float32),
        "flat": np.array([6, hidden], np.int64),
        "back": np.array([-1, 3, hidden], np.int64),
        "axis": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node(
            "LSTM", ["x", "W", "R", "", "", "h0", "c0"], ["y", "hn", "cn"],
            hidden_size=hidden, name="lstm",
        ),
        helper.make_node("Squeeze", ["y", "axis"], ["y3"]),
        helper.make_node("Reshape", ["y3", "flat"], ["rows"], name="pinned_rows"),
        helper.make_node("Reshape", ["rows", "back"], ["out"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "merged",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", features]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", hidden]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, "batch", hidden]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["seq", "batch", hidden]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", hidden]),
            helper.make_tensor_value_info("cn", TensorProto.FLOAT, [1, "batch", hidden]),
        ],
        initializer=[numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_pin_it_cannot_repair_is_refused_saying_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = merged_time_and_batch(tmp_path / "merged.onnx")
    repo = tmp_path / "repo"
    code = rnnserve_main(["import", str(source), "--name", "m", "--model-repository", str(repo)])
    error = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in error and "\n" not in error.strip(), error
    for part in ("merged.onnx", "Reshape pinned_rows after lstm", "[6, 4]", "dynamo=False"):
        assert part in error, error
    assert ".partial" not in error, error
    assert not repo.exists(), sorted(str(p) for p in repo.rglob("*"))


def test_a_refused_import_leaves_an_existing_repository_as_it_was(tmp_path: Path) -> None:
    source = merged_time_and_batch(tmp_path / "merged.onnx")
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "m" / "1").mkdir(parents=True)
    before = sorted(repo.rglob("*"))
    assert (
        rnnserve_main(["import", str(source), "--name", "m", "--model-repository", str(repo)]) == 1
    )
    assert (
        rnnserve_main(["import", str(source), "--name", "n", "--model-repository", str(repo)]) == 1
    )
    assert sorted(repo.rglob("*")) == before
