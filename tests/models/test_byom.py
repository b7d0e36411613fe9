"""Bring your own model: user-style PyTorch modules exported with plain `torch.onnx.export` and
imported (`rnnserve import`), or exported with `export_module` and `rnnserve export --module`;
then served by the real server (and Triton) and compared with the module over whole sequences.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton
from onnx import TensorProto, helper

from rnnserve.cli import main as rnnserve_main
from rnnserve.models import export_module
from rnnserve.models.graph import BATCH, TIME, ExportError, declared_shapes, parse_config
from tests.api.conftest import Stream
from tests.conftest import run_cli
from tests.models import user_modules
from tests.server import RunningServer, serving
from tests.triton_server import MISSING, triton_installed, triton_serving

TOLERANCE = 1e-5


@dataclass(frozen=True)
class Case:
    factory: Callable[[], torch.nn.Module]
    example: torch.Tensor
    """In the module's own layout ([T, B, ...] when time-major)."""
    state: object
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    time_major: bool
    state_shapes: dict[str, list[int]]
    """Each state's per-sequence shape once batch-first, by graph input name (imported)."""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        data = {0: "seq", 1: "batch"} if self.time_major else {0: "batch", 1: "seq"}
        axes = {self.input_names[0]: data, self.output_names[0]: data}
        for name in [*self.input_names[1:], *self.output_names[1:]]:
            axes[name] = {1: "batch"}  # PyTorch's [layers, B, H]
        return axes


CASES = {
    "tagger": Case(
        user_modules.lstm_tagger,
        torch.randn(5, 2, 6),
        (torch.zeros(1, 2, 16), torch.zeros(1, 2, 16)),
        ("input", "h0", "c0"),
        ("output", "hn", "cn"),
        time_major=True,
        state_shapes={"h0": [1, 16], "c0": [1, 16]},
    ),
    "tokens": Case(
        user_modules.token_gru,
        torch.randint(0, 30, (2, 5)),
        torch.zeros(1, 2, 12),
        ("input", "h0"),
        ("output", "hn"),
        time_major=False,
        state_shapes={"h0": [1, 12]},
    ),
    "rnn2": Case(
        user_modules.two_layer_rnn,
        torch.randn(5, 2, 4),
        torch.zeros(2, 2, 10),
        ("input", "h0"),
        ("output", "hn"),
        time_major=True,
        state_shapes={"h0": [2, 10]},
    ),
    "sensor": Case(
        user_modules.sensor_gru,
        torch.randn(5, 2, 3),
        torch.zeros(2, 2, 8),
        ("input", "h0"),
        ("output", "hn"),
        time_major=True,
        state_shapes={"h0": [2, 8]},
    ),
    "stacked": Case(
        user_modules.stacked,
        torch.randn(2, 5, 5),
        ((torch.zeros(1, 2, 9), torch.zeros(1, 2, 9)), torch.zeros(1, 2, 7)),
        ("input", "h1_in", "c1_in", "h2_in"),
        ("output", "h1_out", "c1_out", "h2_out"),
        time_major=False,
        state_shapes={"h1_in": [1, 9], "c1_in": [1, 9], "h2_in": [1, 7]},
    ),
}


def torch_export(
    case: Case,
    path: Path,
    dynamo: bool = False,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """What a user runs: plain torch.onnx.export, PyTorch's names and layout (the legacy
    exporter unless `dynamo`, with its defaults: weights in a `.data` file beside the graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each exporter's notices about itself
        torch.onnx.export(
            case.factory(),
            (case.example, case.state),
            str(path),
            input_names=list(case.input_names),
            output_names=list(case.output_names),
            dynamic_axes=dynamic_axes or case.dynamic_axes(),
            dynamo=dynamo,
        )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case imported (through the command) and exported (through the API)."""
    root = tmp_path_factory.mktemp("byom")
    repo = root / "repository"
    for name, case in CASES.items():
        path = root / f"{name}.onnx"
        torch_export(case, path)
        done = run_cli(
            "import", str(path), "--name", f"{name}_imported", "--model-repository", str(repo)
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["parity"]["max_scaled_diff_vs_original"] <= TOLERANCE
        assert report["states"] == [
            f"{i}:{o}" for i, o in zip(case.input_names[1:], case.output_names[1:], strict=True)
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_module(
                case.factory(), case.example, repo, f"{name}_exported", time_major=case.time_major
            )
    return repo


def whole_sequence(name: str, x: np.ndarray) -> np.ndarray:
    """The module over the whole sequence from its initial state, batch-first [B, T, ...]."""
    case = CASES[name]
    inputs = torch.from_numpy(x)
    with torch.no_grad():
        y, _ = case.factory()(inputs.transpose(0, 1) if case.time_major else inputs)
    return (y.transpose(0, 1) if case.time_major else y).numpy()


def sequence(name: str, steps: int, rng: np.random.Generator) -> np.ndarray:
    example = CASES[name].example
    if not example.is_floating_point():
        return rng.integers(0, 30, size=(1, steps), dtype=np.int64)
    return rng.standard_normal((1, steps, example.shape[-1])).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_makes_states_and_data_batch_first(name: str, repository: Path) -> None:
    case = CASES[name]
    model = repository / f"{name}_imported"
    config = parse_config((model / "config.pbtxt").read_text())
    states = {s.input_name: list(s.dims) for s in config.sequence_batching.state}
    assert states == case.state_shapes
    assert [s.output_name for s in config.sequence_batching.state] == list(case.output_names[1:])
    declared = declared_shapes(model / "1" / "model.onnx")
    for state_in, state_out in zip(case.input_names[1:], case.output_names[1:], strict=True):
        assert declared[state_in] == declared[state_out] == [BATCH, *case.state_shapes[state_in]]
    assert declared["input"][:2] == declared["output"][:2] == [BATCH, TIME]
    transposes = [n for n in onnx.load(str(model / "1" / "model.onnx")).graph.node]
    moved = len(case.state_shapes) * 2 + (2 if case.time_major else 0)
    assert sum(n.op_type == "Transpose" for n in transposes) >= moved
    card = json.loads((model / "model_card.json").read_text())
    assert card["export"]["parity"]["max_scaled_diff_steps_vs_whole"] <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_module_matches_the_import(name: str, repository: Path) -> None:
    exported = parse_config((repository / f"{name}_exported" / "config.pbtxt").read_text())
    imported = parse_config((repository / f"{name}_imported" / "config.pbtxt").read_text())
    assert [list(s.dims) for s in exported.sequence_batching.state] == [
        list(s.dims) for s in imported.sequence_batching.state
    ]
    assert [list(i.dims) for i in exported.input] == [list(i.dims) for i in imported.input]
    assert [list(o.dims) for o in exported.output] == [list(o.dims) for o in imported.output]
    card = json.loads((repository / f"{name}_exported" / "model_card.json").read_text())
    assert card["export"]["parity"]["max_scaled_diff_vs_torch"] <= TOLERANCE


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("byom-server")
    with serving(workdir, "--model-repository", str(repository)) as running:
        yield running


def stream_sequences(
    client: triton.InferenceServerClient, model: str, name: str, base_id: int
) -> dict[int, tuple[np.ndarray, list[np.ndarray]]]:
    """Two sequences on one stream: one step per request, and requests of 1 to 4 steps."""
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    plans = {base_id: [(t, t + 1) for t in range(7)], base_id + 1: [(0, 3), (3, 4), (4, 8)]}
    data = {sid: sequence(name, parts[-1][1], rng) for sid, parts in plans.items()}
    stream = Stream(client)
    try:
        for sid, parts in plans.items():
            for k, (start, end) in enumerate(parts):
                x = data[sid][:, start:end]
                tensor = triton.InferInput("input", list(x.shape), triton_type(x))
                tensor.set_data_from_numpy(x)
                client.async_stream_infer(
                    model,
                    [tensor],
                    request_id=f"{sid}/{k}",
                    sequence_id=sid,
                    sequence_start=k == 0,
                    sequence_end=k == len(parts) - 1,
                )
        results = stream.collect(sum(len(p) for p in plans.values()))
    finally:
        stream.close()
    answers = {}
    for sid, parts in plans.items():
        outputs = []
        for k in range(len(parts)):
            result, error = results[f"{sid}/{k}"]
            assert error is None, error
            outputs.append(result.as_numpy("output"))
        answers[sid] = (data[sid], outputs)
    return answers


def triton_type(x: np.ndarray) -> str:
    return "INT64" if x.dtype == np.int64 else "FP32"


def assert_equals_the_module(name: str, answers: dict) -> None:
    for x, outputs in answers.values():
        np.testing.assert_allclose(
            np.concatenate(outputs, axis=1),
            whole_sequence(name, x),
            rtol=TOLERANCE,
            atol=TOLERANCE,
        )


@pytest.mark.parametrize("how", ["imported", "exported"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_served_streams_equal_the_module(name: str, how: str, server: RunningServer) -> None:
    with triton.InferenceServerClient(server.target) as client:
        base = 100 + 10 * sorted(CASES).index(name) + (5 if how == "exported" else 0)
        assert_equals_the_module(name, stream_sequences(client, f"{name}_{how}", name, base))


def test_triton_serves_imported_models_alike(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not triton_installed():
        pytest.skip(MISSING)
    with (
        triton_serving(tmp_path_factory.mktemp("byom-triton"), repository) as running,
        triton.InferenceServerClient(running.target) as client,
    ):
        for k, name in enumerate(sorted(CASES)):
            assert_equals_the_module(
                name, stream_sequences(client, f"{name}_imported", name, 500 + 10 * k)
            )


def test_export_command_takes_a_module_and_its_weights(tmp_path: Path) -> None:
    module = user_modules.token_gru()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.5)  # weights the factory alone does not make
    weights = tmp_path / "weights.pt"
    torch.save({"model_state_dict": module.state_dict(), "epoch": 3}, weights)
    repo = tmp_path / "repo"
    done = run_cli(
        "export",
        "--module",
        f"{user_modules.__file__}:token_gru",
        "--weights",
        str(weights),
        "--example-shape",
        "2,5",
        "--token-ids",
        "--name",
        "gru_cli",
        "--model-repository",
        str(repo),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["parity"]["max_scaled_diff_vs_torch"] <= TOLERANCE
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / "gru_cli" / "1" / "model.onnx"))
    tokens = np.arange(12, dtype=np.int64).reshape(2, 6)
    (y,) = session.run(["output"], {"input": tokens, "h_in": np.zeros((2, 1, 12), np.float32)})
    with torch.no_grad():
        expected, _ = module(torch.from_numpy(tokens))
    np.testing.assert_allclose(y, expected.numpy(), rtol=TOLERANCE, atol=TOLERANCE)


# Refusals: crafted graphs, each with what rnnserve import must say about it.


def crafted(
    path: Path,
    inputs: list[tuple[str, int, list]],
    outputs: list[tuple[str, int, list]],
    domain: str = "",
) -> Path:
    """A graph of Identity nodes (of `domain`) from each input to the output at the same
    position."""
    nodes = [
        helper.make_node("Identity", [i[0]], [o[0]], domain=domain)
        for i, o in zip(inputs, outputs, strict=True)
    ]
    graph = helper.make_graph(
        nodes,
        "crafted",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
DATA = [("x", FLOAT, ["seq", "batch", 4])]
DATA_OUT = [("y", FLOAT, ["seq", "batch", 4])]
REFUSALS = {
    "no-state": (DATA, DATA_OUT, (), "found no recurrent state"),
    "fixed-batch": (
        [("x", FLOAT, ["seq", 1, 4]), ("h0", FLOAT, [1, 1, 8])],
        [("y", FLOAT, ["seq", 1, 4]), ("hn", FLOAT, [1, 1, 8])],
        (),
        "state h0 has a fixed batch",
    ),
    "mismatched-pair": (
        [*DATA, ("h0", FLOAT, [1, "batch", 8])],
        [*DATA_OUT, ("hn", FLOAT, [1, "batch", 6])],
        (),
        "mismatched pair",
    ),
    "non-float-state": (
        [*DATA, ("h0", INT64, [1, "batch", 8])],
        [*DATA_OUT, ("hn", INT64, [1, "batch", 8])],
        (),
        "is not float32",
    ),
    "runtime-cannot-load": (
        [*DATA, ("h0", FLOAT, [1, "batch", 8])],
        [*DATA_OUT, ("hn", FLOAT, [1, "batch", 8])],
        (),
        "ONNX Runtime cannot load the graph",
    ),
    "ambiguous-axes": (
        [("x", FLOAT, ["a", "b", 4]), ("h0", FLOAT, [1, "c", 8])],
        [("y", FLOAT, ["a", "b", 4]), ("hn", FLOAT, [1, "c", 8])],
        (),
        "pass --batch-first or --time-major",
    ),
    "unknown-state-name": (
        [*DATA, ("h0", FLOAT, [1, "batch", 8])],
        [*DATA_OUT, ("hn", FLOAT, [1, "batch", 8])],
        ("--state", "h0:h_last"),
        "no graph output h_last",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refuses_what_it_cannot_serve(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, outputs, flags, message = REFUSALS[case]
    domain = "com.example" if case == "runtime-cannot-load" else ""
    path = crafted(tmp_path / "m.onnx", inputs, outputs, domain)
    repo = tmp_path / "repo"
    code = rnnserve_main(
        ["import", str(path), "--name", "m", "--model-repository", str(repo), *flags]
    )
    error = capsys.readouterr().err
    assert code == 1
    assert message in error and "\n" not in error.strip(), error
    assert "Traceback" not in error
    assert not (repo / "m" / "1" / "model.onnx").exists()


def test_import_refusal_from_the_command(tmp_path: Path) -> None:
    path = crafted(tmp_path / "m.onnx", DATA, DATA_OUT)
    done = run_cli("import", str(path), "--name", "m", "--model-repository", str(tmp_path / "r"))
    assert done.returncode == 1
    assert "found no recurrent state" in done.stderr and "--state IN:OUT" in done.stderr


class NoState(torch.nn.Module):
    def forward(self, x: torch.Tensor, state: object = None) -> torch.Tensor:
        return x * 2


class SharedState(torch.nn.Module):
    """A 'state' that does not follow the batch: nothing per sequence to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        return x, self.memory * 1.0 if state is None else state


@pytest.mark.parametrize(
    ("module", "example", "options", "message"),
    [
        (NoState(), torch.randn(2, 3, 4), {}, "must return (output, new_state)"),
        (SharedState(), torch.randn(2, 3, 4), {}, "needs one batch axis"),
        (
            user_modules.token_gru(),
            torch.zeros(2, 5, dtype=torch.int64),
            {"state_layout": "batch_first"},
            "state_layout='layers_first'",
        ),
    ],
    ids=["no-state", "no-batch-axis", "wrong-layout"],
)
def test_export_module_refuses_what_does_not_fit(
    module: torch.nn.Module, example: torch.Tensor, options: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportError) as caught:
        export_module(module, example, tmp_path, "m", **options)
    assert message in str(caught.value)
    assert not (tmp_path / "m" / "1" / "model.onnx").exists()


def test_import_needs_no_torch(repository: Path, tmp_path: Path) -> None:
    script = (
        "import sys; from rnnserve.cli import main; "
        f"code = main(['import', {str(repository.parent / 'rnn2.onnx')!r}, '--name', 'm', "
        f"'--repository', {str(tmp_path)!r}]); "
        "assert code == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "1" / "model.onnx").is_file()


def keras_style(path: Path, seed: int = 0) -> Path:
    """Two GRU layers with one [B, H] state per layer, batch-first data transposed inside (as
    tf2onnx writes them), and a Keras/tf2onnx graph's names: `unk__` axes and outputs that pair
    with nothing by name."""
    rng = np.random.default_rng(seed)
    axes = {name: np.array(value, np.int64) for name, value in [("first", [0]), ("second", [1])]}
    weights = [onnx.numpy_helper.from_array(v, n) for n, v in axes.items()]
    nodes = [helper.make_node("Transpose", ["input_1"], ["seq_0"], perm=[1, 0, 2])]
    for k, (features, hidden) in enumerate([(3, 8), (8, 6)], start=1):
        for name, shape in [("W", [1, 3 * hidden, features]), ("R", [1, 3 * hidden, hidden])]:
            values = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
            weights.append(onnx.numpy_helper.from_array(values, f"{name}{k}"))
        nodes += [
            helper.make_node("Unsqueeze", [f"gru_{k}_state", "first"], [f"h0_{k}"]),
            helper.make_node(
                "GRU",
                [f"seq_{k - 1}", f"W{k}", f"R{k}", "", "", f"h0_{k}"],
                [f"y_{k}", f"yh_{k}"],
                hidden_size=hidden,
            ),
            helper.make_node("Squeeze", [f"yh_{k}", "first"], [f"Identity_{k}"]),
            helper.make_node("Squeeze", [f"y_{k}", "second"], [f"seq_{k}"]),
        ]
    weights.append(
        onnx.numpy_helper.from_array(rng.uniform(-1, 1, (6, 2)).astype(np.float32), "dense_w")
    )
    nodes += [
        helper.make_node("Transpose", ["seq_2"], ["batch_first"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["batch_first", "dense_w"], ["dense"]),
    ]
    graph = helper.make_graph(
        nodes,
        "keras_style",
        [
            helper.make_tensor_value_info("input_1", FLOAT, ["unk__1", "unk__2", 3]),
            helper.make_tensor_value_info("gru_1_state", FLOAT, ["unk__1", 8]),
            helper.make_tensor_value_info("gru_2_state", FLOAT, ["unk__1", 6]),
        ],
        [
            helper.make_tensor_value_info("dense", FLOAT, ["unk__1", "unk__2", 2]),
            helper.make_tensor_value_info("Identity_1", FLOAT, ["unk__1", 8]),
            helper.make_tensor_value_info("Identity_2", FLOAT, ["unk__1", 6]),
        ],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_import_keeps_per_layer_states_named_with_state(tmp_path: Path, server_dir: Path) -> None:
    import onnxruntime as ort

    source = keras_style(tmp_path / "keras.onnx")
    repo = tmp_path / "repo"
    base = ["import", str(source), "--name", "keras_gru", "--model-repository", str(repo)]
    assert rnnserve_main(base) == 1, "nothing pairs by name: the states must be named"
    flags = ["--state", "gru_1_state:Identity_1", "--state", "gru_2_state:Identity_2"]
    assert rnnserve_main([*base, *flags]) == 0
    config = parse_config((repo / "keras_gru" / "config.pbtxt").read_text())
    assert [(s.input_name, list(s.dims)) for s in config.sequence_batching.state] == [
        ("gru_1_state", [8]),
        ("gru_2_state", [6]),
    ]
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 9, 3)).astype(np.float32)
    zero = {
        "gru_1_state": np.zeros((1, 8), np.float32),
        "gru_2_state": np.zeros((1, 6), np.float32),
    }
    (whole,) = original.run(["dense"], {"input_1": x, **zero})
    with (
        serving(server_dir, "--model-repository", str(repo)) as running,
        triton.InferenceServerClient(running.target) as client,
    ):
        outputs = []
        for t in range(9):
            tensor = triton.InferInput("input_1", [1, 1, 3], "FP32")
            tensor.set_data_from_numpy(x[:, t : t + 1])
            result = client.infer(
                "keras_gru",
                [tensor],
                sequence_id=77,
                sequence_start=t == 0,
                sequence_end=t == 8,
            )
            outputs.append(result.as_numpy("dense"))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), whole, rtol=TOLERANCE, atol=TOLERANCE
    )


@pytest.fixture
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keras-server")


def test_import_refuses_a_file_that_is_not_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.onnx"
    path.write_text("not a graph\n")
    assert (
        rnnserve_main(["import", str(path), "--name", "m", "--model-repository", str(tmp_path)])
        == 1
    )
    assert "not an ONNX model" in capsys.readouterr().err
