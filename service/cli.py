"""The `rnnserve` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models import cli as model_commands
from service import __version__
from service.errors import ServiceError
from service.repository.layout import scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve",
        description="Serve recurrent networks (LSTM, GRU, RNN) with server-side streaming state.",
    )
    parser.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_commands.add_commands(sub)
    models = sub.add_parser("models", help="list the models of a repository")
    models.add_argument(
        "--model-repository",
        type=Path,
        default=model_commands.bundled_repository(),
        help="model repository (default: the bundled one)",
    )
    models.set_defaults(run=_run_models)
    return parser


def _run_models(args: argparse.Namespace) -> int:
    try:
        entries = scan(args.model_repository)
    except ServiceError as error:
        raise model_commands.CommandError(str(error)) from error
    for entry in entries:
        kind = "streaming" if entry.streamable else "whole-sequence"
        inputs = ", ".join(i.name for i in entry.config.input)
        outputs = ", ".join(o.name for o in entry.config.output)
        versions = ",".join(map(str, entry.versions)) or "none"
        print(f"{entry.name}\tversions {versions}\t{kind}\t{inputs} -> {outputs}")  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return model_commands.run(args)
