"""`rnnserve train`, `rnnserve export` and `rnnserve import`.

The top-level command (`rnnserve.cli`) imports this module to build its parser, so it must stay
light: torch and the training code load only when one of these commands runs. It raises
`rnnserve.errors.CommandError` for what the person at the terminal can fix.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rnnserve.errors import CommandError

logger = logging.getLogger(__name__)

BUNDLED = ("charlm_lstm", "sensor_gru", "digits_lstm")
CHECKPOINT_FORMAT = "rnnserve-checkpoint/1"


def add_commands(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train a bundled model and publish it into a model repository",
        description="Train one of the bundled models on CPU, check its ONNX export and write "
        "it, with its config.pbtxt and model card, into the model repository.",
    )
    train.add_argument(
        "model", metavar="MODEL", choices=BUNDLED, help=f"one of {', '.join(BUNDLED)}"
    )
    add_target_arguments(train)
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("build/checkpoints"),
        help="where the PyTorch checkpoint goes (default build/checkpoints)",
    )
    train.add_argument(
        "--max-epochs", type=int, help="override the recipe's epoch cap (for a quick run)"
    )
    train.add_argument("--seed", type=int, help="override the recipe's seed")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_run_train)

    export = sub.add_parser(
        "export",
        help="export a checkpoint or any PyTorch recurrent module to ONNX with parity checks",
        description="Export a PyTorch checkpoint written by `rnnserve train`, or any recurrent "
        "module (--module FILE.py:FACTORY with --weights), to ONNX with its recurrent state as "
        "explicit, batch-first inputs and outputs, check parity with PyTorch, and write it into "
        "a model repository. A module's forward takes (input, state=None) and returns (output, "
        "new_state).",
    )
    export.add_argument(
        "checkpoint", type=Path, nargs="?", help="a .pt file written by `rnnserve train`"
    )
    add_target_arguments(export)
    export.add_argument("--name", help="model name in the repository (default: the checkpoint's)")
    export.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry state between requests (default: yes for unidirectional networks)",
    )
    module = export.add_argument_group("any PyTorch module (instead of a checkpoint)")
    module.add_argument(
        "--module",
        metavar="FILE.py:FACTORY",
        help="a Python file and the function in it that returns the nn.Module (no arguments)",
    )
    module.add_argument(
        "--weights",
        type=Path,
        help="its state dict, or a checkpoint holding one under 'state_dict' or "
        "'model_state_dict' (torch.save; loaded with weights_only=True)",
    )
    module.add_argument(
        "--example-shape",
        metavar="B,T[,F...]",
        help="shape of an example input, e.g. 2,5,8 ([T,B,...] with --time-major)",
    )
    module.add_argument(
        "--token-ids", action="store_true", help="the input is int64 token ids, not float features"
    )
    module.add_argument(
        "--time-major",
        action="store_true",
        help="the module takes [T, B, ...] (nn.LSTM's default); the server still sends [B, T, ...]",
    )
    module.add_argument(
        "--state-layout",
        choices=["auto", "layers_first", "batch_first"],
        default="auto",
        help="where the states' batch axis is (default: found by running the module)",
    )
    module.add_argument("--input-name", default="input", help="graph input name (default input)")
    module.add_argument(
        "--output-name", default="output", help="graph output name (default output)"
    )
    module.add_argument(
        "--state-names", help="comma-separated state names (default h, or h,c for an LSTM)"
    )
    module.add_argument(
        "--exporter",
        choices=["auto", "legacy", "dynamo"],
        default="auto",
        help="torch.onnx's exporter: legacy (dynamo=False), dynamo (its graph repaired where it "
        "pins the example's length), or auto: the first whose graph passes the checks, legacy "
        "first (default auto; the report says which)",
    )
    export.set_defaults(run=_run_export)

    imports = sub.add_parser(
        "import",
        help="import a third-party ONNX recurrent graph to serve it statefully",
        description="Rewrite an ONNX graph that carries its recurrent state as inputs and "
        "outputs (any names; PyTorch's h0/hn [layers, B, H], per-layer [B, H] states) so every "
        "state and data tensor is batch-first, check it against the original and step-by-step "
        "against whole-sequence, and publish it with a sequence-batching config.",
    )
    imports.add_argument("onnx_file", type=Path, metavar="MODEL.onnx", help="the ONNX graph")
    imports.add_argument("--name", required=True, help="model name in the repository")
    add_target_arguments(imports)
    imports.add_argument(
        "--state",
        action="append",
        metavar="IN:OUT",
        help="a state pair: the graph input and output of one state (repeat for each; "
        "default: paired by name, h0:hn, h_in:h_out, ...)",
    )
    layout = imports.add_mutually_exclusive_group()
    layout.add_argument(
        "--time-major",
        dest="layout",
        action="store_const",
        const="time_major",
        help="data inputs and outputs are [T, B, ...] (default: read from the axes' names)",
    )
    layout.add_argument(
        "--batch-first",
        dest="layout",
        action="store_const",
        const="batch_first",
        help="data inputs and outputs are [B, T, ...]",
    )
    imports.add_argument("--description", default="", help="the config's description")
    imports.set_defaults(run=_run_import, layout="auto")


class _DeprecatedSpelling(argparse.Action):
    """An option's old name: it still works, with a warning naming the new one."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        sys.stderr.write(f"rnnserve: warning: {option_string} is deprecated: use {self.new}\n")
        setattr(namespace, self.dest, values)


WRITE_REPOSITORY = Path("model_repository")
"""Where train, export and import write by default: a folder of the current directory, never the
repository committed with rnnserve (`--model-repository models/repository` writes there)."""


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a command that writes a model puts it: `--model-repository` (the name `serve` and
    `models` give a repository too; `--repository`, the old spelling, still works), the
    version, and `--overwrite`."""
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=WRITE_REPOSITORY,
        metavar="DIR",
        help=f"model repository to write into (default ./{WRITE_REPOSITORY})",
    )
    parser.add_argument(
        "--repository",
        dest="model_repository",
        type=Path,
        action=_DeprecatedSpelling,
        new="--model-repository",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--version", type=int, default=1, help="version folder to write (default 1)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the version if the repository already holds it (default: refuse)",
    )


def check_target(args: argparse.Namespace, name: str) -> None:
    """Refuse (CommandError, exit 2) to write a version the repository already holds, unless
    --overwrite; checked before any training or export is spent on it."""
    if args.version < 1:
        raise CommandError(f"--version {args.version}: versions are 1 or more")
    published = args.model_repository / name / str(args.version) / "model.onnx"
    if args.overwrite or not published.exists():
        return
    taken = [
        int(p.name)
        for p in (args.model_repository / name).iterdir()
        if p.name.isdigit() and (p / "model.onnx").exists()
    ]
    raise CommandError(
        f"{published.parent} already holds version {args.version} of {name}: pass --version "
        f"{max(taken) + 1} to add a version, or --overwrite to replace it"
    )


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise CommandError(
            "training and export need PyTorch: pip install 'rnnserve[train]'"
        ) from error


def _run_train(args: argparse.Namespace) -> int:
    _require_torch()
    import dataclasses

    import torch

    from rnnserve.models.publish import publish
    from rnnserve.models.training import evaluate, fit, settings_card
    from rnnserve.models.zoo import TASKS

    check_target(args, args.model)
    task = TASKS[args.model]()
    settings = task.settings
    if args.max_epochs is not None:
        settings = dataclasses.replace(settings, max_epochs=args.max_epochs)
    if args.seed is not None:
        settings = dataclasses.replace(settings, seed=args.seed)
    logger.info("training %s: %s", args.model, settings)
    result = fit(task, settings, progress=not args.no_progress)
    metrics = evaluate(task, result.model)
    card = {
        "data": task.data_card(),
        "training": {
            "settings": settings_card(settings),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
            "history": result.history,
            "torch_version": torch.__version__,
        },
        "metrics": metrics,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    checkpoint = args.checkpoint_dir / f"{args.model}.pt"
    save_checkpoint(checkpoint, args.model, result.model, task.signature, card)
    try:
        published = publish(
            result.model,
            task.signature,
            args.model_repository,
            args.model,
            args.version,
            card=card,
        )
    except OSError as error:
        raise CommandError(
            f"cannot write to repository {args.model_repository}: {error}"
        ) from error
    print(
        json.dumps(
            {
                "model": args.model,
                "metrics": metrics,
                "seconds": round(result.seconds, 1),
                "onnx": str(published.onnx_path),
                "checkpoint": str(checkpoint),
            },
            indent=2,
        )
    )
    return 0


def save_checkpoint(path: Path, name: str, net: Any, signature: Any, card: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    signature_dict = asdict(signature)
    signature_dict["parameters"] = [list(p) for p in signature.parameters]
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "name": name,
            "spec": asdict(net.spec),
            "signature": signature_dict,
            "state_dict": net.state_dict(),
            "card": json.dumps(card),
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[str, Any, Any, dict[str, Any]]:
    import pickle

    import torch

    from rnnserve.models.architectures import RecurrentNet, RecurrentSpec
    from rnnserve.models.signature import Signature

    if not path.is_file():
        raise CommandError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CommandError(f"{path} is not a PyTorch checkpoint: {error}") from error
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CommandError(
            f"{path} was not written by `rnnserve train` (no {CHECKPOINT_FORMAT!r} format tag)"
        )
    try:
        net = RecurrentNet(RecurrentSpec(**blob["spec"]))
        net.load_state_dict(blob["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CommandError(
            f"{path}: the checkpoint does not describe a valid network: {error}"
        ) from error
    raw_signature = dict(blob["signature"])
    raw_signature["parameters"] = tuple(tuple(p) for p in raw_signature["parameters"])
    return blob["name"], net, Signature(**raw_signature), json.loads(blob["card"])


def _run_export(args: argparse.Namespace) -> int:
    if args.module is not None:
        return _run_export_module(args)
    if args.checkpoint is None:
        raise CommandError("export needs a checkpoint, or --module FILE.py:FACTORY")
    _require_torch()
    from rnnserve.models.export import ExportError
    from rnnserve.models.publish import publish

    name, net, signature, card = load_checkpoint(args.checkpoint)
    check_target(args, args.name or name)
    streamable = net.spec.streamable if args.streaming is None else args.streaming
    started = time.perf_counter()
    try:
        published = publish(
            net,
            signature,
            args.model_repository,
            args.name or name,
            args.version,
            streamable,
            card,
        )
    except ExportError as error:
        exit_code = 2 if streamable and not net.spec.streamable else 1
        raise CommandError(str(error), exit_code) from error
    except OSError as error:
        raise CommandError(
            f"cannot write to repository {args.model_repository}: {error}"
        ) from error
    _report(args.name or name, published, started)
    return 0


def _report(name: str, published: Any, started: float, **extra: Any) -> None:
    print(
        json.dumps(
            {
                "model": name,
                "onnx": str(published.onnx_path),
                "parity": published.parity.as_card(),
                "seconds": round(time.perf_counter() - started, 2),
                **extra,
            },
            indent=2,
        )
    )


def load_module(spec: str, weights: Path | None) -> Any:
    """The nn.Module FACTORY() of FILE.py:FACTORY, with `weights` loaded into it."""
    import importlib.util

    import torch

    file_name, _, factory_name = spec.rpartition(":")
    path = Path(file_name)
    if not file_name or not factory_name:
        raise CommandError(f"--module {spec}: expected FILE.py:FACTORY")
    if not path.is_file():
        raise CommandError(f"--module {spec}: {path} not found")
    loader_spec = importlib.util.spec_from_file_location(f"rnnserve_user_{path.stem}", path)
    if loader_spec is None or loader_spec.loader is None:
        raise CommandError(f"--module {spec}: {path} is not a Python file")
    code = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(code)
    except Exception as error:
        raise CommandError(f"--module {spec}: {path} failed to load: {error!r}") from error
    factory = getattr(code, factory_name, None)
    if not callable(factory):
        raise CommandError(f"--module {spec}: {path} has no function {factory_name}")
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise CommandError(
            f"--module {spec}: {factory_name}() returned {type(module).__name__}, not an nn.Module"
        )
    if weights is not None:
        _load_weights(module, weights, factory_name)
    return module


def _load_weights(module: Any, weights: Path, factory_name: str) -> None:
    import pickle

    import torch

    if not weights.is_file():
        raise CommandError(f"--weights {weights}: not found")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CommandError(f"--weights {weights}: not a PyTorch state dict: {error}") from error
    for key in ("state_dict", "model_state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    try:
        module.load_state_dict(blob)
    except (TypeError, RuntimeError) as error:
        raise CommandError(f"--weights {weights} does not fit {factory_name}(): {error}") from error


def _run_export_module(args: argparse.Namespace) -> int:
    _require_torch()
    import torch

    from rnnserve.models.graph import ExportError
    from rnnserve.models.module_export import export_module

    if args.checkpoint is not None:
        raise CommandError("give a checkpoint or --module, not both")
    if not args.name or not args.example_shape:
        raise CommandError("--module needs --name and --example-shape")
    try:
        shape = [int(d) for d in args.example_shape.split(",")]
    except ValueError as error:
        raise CommandError(f"--example-shape {args.example_shape}: {error}") from error
    check_target(args, args.name)
    module = load_module(args.module, args.weights)
    torch.manual_seed(0)
    example = torch.zeros(shape, dtype=torch.int64) if args.token_ids else torch.randn(shape)
    started = time.perf_counter()
    try:
        published = export_module(
            module,
            example,
            args.model_repository,
            args.name,
            args.version,
            state_layout=args.state_layout,
            time_major=args.time_major,
            input_name=args.input_name,
            output_name=args.output_name,
            state_names=args.state_names.split(",") if args.state_names else None,
            exporter=args.exporter,
        )
    except ExportError as error:
        raise CommandError(str(error), exit_code=1) from error
    except OSError as error:
        raise CommandError(
            f"cannot write to repository {args.model_repository}: {error}"
        ) from error
    _report(
        args.name, published, started, exporter=published.exporter, repairs=list(published.repairs)
    )
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from rnnserve.models.graph import ExportError
    from rnnserve.models.onnx_import import import_onnx

    pairs = None
    if args.state:
        pairs = []
        for text in args.state:
            state_in, sep, state_out = text.partition(":")
            if not sep or not state_in or not state_out:
                raise CommandError(f"--state {text}: expected IN:OUT (graph input:graph output)")
            pairs.append((state_in, state_out))
    if not args.onnx_file.is_file():
        raise CommandError(f"{args.onnx_file}: not found")
    check_target(args, args.name)
    started = time.perf_counter()
    try:
        published, found = import_onnx(
            args.onnx_file,
            args.model_repository,
            args.name,
            args.version,
            pairs=pairs,
            layout=args.layout,
            description=args.description,
        )
    except ExportError as error:
        raise CommandError(str(error), exit_code=1) from error
    except OSError as error:
        raise CommandError(
            f"cannot write to repository {args.model_repository}: {error}"
        ) from error
    states = [f"{s.input_name}:{s.output_name}" for s in found.interface.states]
    _report(args.name, published, started, states=states, rewrites=list(found.notes))
    return 0
