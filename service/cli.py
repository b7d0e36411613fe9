"""The `rnnserve` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models import cli as model_commands
from service import __version__
from service.config import Settings, bundled_repository, environment
from service.errors import ServiceError
from service.logging import configure as configure_logging
from service.repository.layout import scan
from service.server import serve


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
        default=bundled_repository(),
        help="model repository (default: the bundled one)",
    )
    models.set_defaults(run=_run_models)

    serve = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (port 8001) with metrics (port 8002)",
        description="Serve the models of a repository over the Open Inference Protocol (gRPC), "
        "holding each sequence's recurrent state between requests. Every option can also be "
        "set through the environment variable shown in brackets.",
    )
    Settings.add_arguments(serve)
    serve.set_defaults(run=_run_serve)

    generate = sub.add_parser(
        "generate",
        help="stream a prompt through a character model and print its continuation",
        description="A streaming client: feeds the prompt one character per request on one "
        "gRPC stream (the server carries the LSTM state), then continues the text.",
    )
    generate.add_argument("prompt", help="text to start from")
    generate.add_argument("--url", default="127.0.0.1:8001", help="server address (host:port)")
    generate.add_argument("--model", default="charlm_lstm", help="a model with a vocabulary")
    generate.add_argument("--length", type=int, default=80, help="characters to generate")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 for the likeliest character"
    )
    generate.set_defaults(run=_run_generate)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    import grpc

    from service.client import ClientError, SequenceClient

    try:
        with SequenceClient(args.url, args.model) as client:
            text = client.generate(args.prompt, args.length, args.temperature)
    except grpc.RpcError as error:
        raise model_commands.CommandError(
            f"{args.url}: {error.code().name}: {error.details()}", exit_code=1
        ) from error
    except ClientError as error:
        raise model_commands.CommandError(str(error), exit_code=1) from error
    print(args.prompt + text)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_sources(args, environment())
    except ValueError as error:
        raise model_commands.CommandError(str(error)) from error
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except ServiceError as error:
        raise model_commands.CommandError(str(error), exit_code=1) from error
    except OSError as error:
        raise model_commands.CommandError(f"cannot serve: {error}", exit_code=1) from error
    return 0


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
