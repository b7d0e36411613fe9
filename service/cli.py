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

    bench = sub.add_parser(
        "bench",
        help="benchmark rnnserve against in-process ONNX Runtime and a bare gRPC server",
        description="In one run on this machine: ONNX Runtime in-process on the model file "
        "(the compute limit), rnnserve over gRPC on loopback with N concurrent sequences "
        "(stream and unary), and a bare gRPC server answering same-size responses with the "
        "same client (the transport limit). Writes results.json, results.md and plots, and "
        "prints the table and the headline ratios last.",
    )
    bench.add_argument("--quick", action="store_true", help="about a minute: fewer, shorter points")
    bench.add_argument("--model", default="charlm_lstm", help="a streaming model (charlm_lstm)")
    bench.add_argument(
        "--model-repository", type=Path, default=bundled_repository(), help="(the bundled one)"
    )
    bench.add_argument("--out", type=Path, default=Path("build/bench"), help="(build/bench)")
    bench.add_argument(
        "--sessions", type=_numbers, help="concurrent sequences (1,16,64,256,1024; quick 1,64,256)"
    )
    bench.add_argument(
        "--batches", type=_numbers, help="in-process batch sizes (1,8,32,64,256; quick 1,64)"
    )
    bench.add_argument("--steps", type=_numbers, default=(1, 32), help="steps per request (1,32)")
    bench.add_argument("--duration", type=float, help="seconds measured per point (5; quick 1)")
    bench.add_argument("--warmup", type=float, help="seconds before each point (0.5; quick 0.2)")
    bench.add_argument(
        "--sessions-per-channel", type=int, default=1024, help="sequences per gRPC channel (1024)"
    )
    bench.add_argument(
        "--provider", default="auto", help="auto (CUDA where there is one), cpu or cuda (auto)"
    )
    bench.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime's (0)")
    bench.add_argument("--inter-op-threads", type=int, default=0, help="ONNX Runtime's (0)")
    bench.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass a flag to `rnnserve serve`, e.g. --server-arg=--max-queue-delay-us=200",
    )
    bench.add_argument("--no-unary", action="store_true", help="skip the ModelInfer points")
    bench.add_argument("--no-peers", action="store_true", help="skip perf_analyzer")
    bench.set_defaults(run=_run_bench)
    return parser


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _run_bench(args: argparse.Namespace) -> int:
    from service.bench import runner
    from service.bench.options import BenchOptions

    try:
        options = BenchOptions.resolve(
            args.quick,
            sessions=args.sessions,
            batches=args.batches,
            duration_s=args.duration,
            warmup_s=args.warmup,
            model=args.model,
            repository=args.model_repository,
            out=args.out,
            steps=args.steps,
            sessions_per_channel=args.sessions_per_channel,
            provider=args.provider,
            intra_op_threads=args.intra_op_threads,
            inter_op_threads=args.inter_op_threads,
            server_args=tuple(args.server_arg),
            unary=not args.no_unary,
            peers=not args.no_peers,
        )
        report = runner.run(options)
    except (ValueError, OSError, RuntimeError, ServiceError) as error:
        raise model_commands.CommandError(str(error), exit_code=1) from error
    print(report.markdown)
    print()
    print("results:", ", ".join(str(path) for path in report.files))
    for line in report.headline:
        print(line)
    return 0


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
