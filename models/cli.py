"""`rnnserve train` and `rnnserve export`.

The top-level command (`rnnserve.cli`) imports this module to build its parser, so it must stay
light: torch and the training code load only when one of these commands runs. It raises
`rnnserve.errors.CommandError` for what the person at the terminal can fix.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rnnserve.errors import CommandError
from rnnserve.models import bundled_repository

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
    train.add_argument(
        "--repository",
        type=Path,
        default=bundled_repository(),
        help="model repository to write into (default: the bundled one)",
    )
    train.add_argument("--version", type=int, default=1, help="version folder to write (default 1)")
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
        help="export a checkpoint to ONNX with parity checks",
        description="Export a PyTorch checkpoint written by `rnnserve train` to ONNX with its "
        "recurrent state as explicit inputs and outputs, check parity with PyTorch, and write "
        "it into a model repository.",
    )
    export.add_argument("checkpoint", type=Path, help="a .pt file written by `rnnserve train`")
    export.add_argument(
        "--repository",
        type=Path,
        default=bundled_repository(),
        help="model repository to write into (default: the bundled one)",
    )
    export.add_argument("--name", help="model name in the repository (default: the checkpoint's)")
    export.add_argument(
        "--version", type=int, default=1, help="version folder to write (default 1)"
    )
    export.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry state between requests (default: yes for unidirectional networks)",
    )
    export.set_defaults(run=_run_export)


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
            result.model, task.signature, args.repository, args.model, args.version, card=card
        )
    except OSError as error:
        raise CommandError(f"cannot write to repository {args.repository}: {error}") from error
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
    _require_torch()
    from rnnserve.models.export import ExportError
    from rnnserve.models.publish import publish

    name, net, signature, card = load_checkpoint(args.checkpoint)
    streamable = net.spec.streamable if args.streaming is None else args.streaming
    started = time.perf_counter()
    try:
        published = publish(
            net, signature, args.repository, args.name or name, args.version, streamable, card
        )
    except ExportError as error:
        exit_code = 2 if streamable and not net.spec.streamable else 1
        raise CommandError(str(error), exit_code) from error
    except OSError as error:
        raise CommandError(f"cannot write to repository {args.repository}: {error}") from error
    print(
        json.dumps(
            {
                "model": args.name or name,
                "onnx": str(published.onnx_path),
                "parity": published.parity.as_card(),
                "seconds": round(time.perf_counter() - started, 2),
            },
            indent=2,
        )
    )
    return 0
