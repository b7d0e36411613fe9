"""The `rnnserve` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

# gRPC's core logs lines of its own on stderr, unformatted ("I1207 ... Handshake failed" beside
# the one line a command prints for an error, or amid --log-format json); it still logs errors.
# It reads the variable once, as it is imported by the modules below.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from rnnserve import __version__
from rnnserve.client import cli as client_commands
from rnnserve.config import Settings, environment
from rnnserve.errors import CommandError, ServiceError
from rnnserve.logging import LogFormat, LogLevel
from rnnserve.logging import configure as configure_logging
from rnnserve.models import cli as model_commands
from rnnserve.server import serve

logger = logging.getLogger(__name__)

COMMANDS_GROUP = "rnnserve.commands"
"""Entry points that add commands to `rnnserve` (the benchmark's `bench`)."""


def build_parser() -> argparse.ArgumentParser:
    """The `rnnserve` parser: --version, --log-level, and one subcommand per job (serve, bench,
    the model commands of `rnnserve.models.cli` and the client commands of
    `rnnserve.client.cli`: models, health, generate, forecast, classify)."""
    parser = argparse.ArgumentParser(
        prog="rnnserve",
        description="Serve recurrent networks (LSTM, GRU, RNN) with server-side streaming state.",
    )
    parser.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    parser.add_argument(
        "--log-level",
        dest="global_log_level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of every command (`serve --log-level` and RNNSERVE_LOG_LEVEL too)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_commands.add_commands(sub)
    client_commands.add_commands(sub)

    serve = sub.add_parser(
        "serve",
        help=f"serve a model repository over gRPC (port {Settings.grpc_port}) with metrics "
        f"(port {Settings.metrics_port})",
        description="Serve the models of a repository over the Open Inference Protocol (gRPC), "
        "holding each sequence's recurrent state between requests. Every option can also be "
        "set through the environment variable shown in brackets.",
    )
    Settings.add_arguments(serve)
    serve.set_defaults(run=_run_serve)

    bench = sub.add_parser(
        "bench",
        help="benchmark rnnserve against its compute and transport limits (needs rnnserve-bench)",
        description="The benchmark, from the rnnserve-bench package (bench/ in a clone of "
        "rnnserve; `make install` installs it). `rnnserve bench --help` lists its options.",
        add_help=False,
    )
    bench.set_defaults(run=_run_bench)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    # The benchmark is a plug-in (entry point group `rnnserve.commands`), never a dependency:
    # the server installs and runs without it.
    how = (
        "the benchmark is not installed: it is the rnnserve-bench package, in the bench/ folder "
        "of a clone of rnnserve; install it with `pip install -e ./bench` there (or run "
        "`make install`)"
    )
    found = entry_points(group=COMMANDS_GROUP, name="bench")
    if not found:
        raise CommandError(how, exit_code=1)
    try:
        bench_main = next(iter(found)).load()
    except ImportError as error:
        raise CommandError(f"{how} ({error})", exit_code=1) from error
    code: int = bench_main(args.bench_args)
    return code


def _run_serve(args: argparse.Namespace) -> int:
    if args.log_level is None:
        # `rnnserve --log-level X serve`: the flag before the command counts as one after it.
        args.log_level = args.global_log_level
    try:
        settings = Settings.from_sources(args, environment())
    except ValueError as error:
        raise CommandError(str(error)) from error
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ServiceError, OSError) as error:
        message = str(error) if isinstance(error, ServiceError) else f"cannot serve: {error}"
        if settings.log_format is LogFormat.JSON:
            # Where logs are JSON lines (the container), why the server stopped is one more:
            # a log pipeline that parses every line keeps it.
            logger.error("%s", message)
            return 1
        raise CommandError(message, exit_code=1) from error
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `rnnserve` command: parse `argv`, configure logging once, run the subcommand.

    Returns the exit code: 0, 1 when the job failed, 2 for a usage error (a CommandError's
    message is printed on stderr without a traceback).
    """
    parser = build_parser()
    # The benchmark parses its own options (`rnnserve bench --help` is its help).
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command != "serve":  # `serve` configures logging from its settings
        configure_logging(LogLevel(args.global_log_level or "INFO"))
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except CommandError as error:
        print(f"rnnserve {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # Whoever read stdout stopped (`rnnserve forecast ... | head`): what is left to print
        # has nowhere to go, and the exit's own flush must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


BROKEN_PIPE = 141
"""The exit code when stdout's reader went away: 128 + SIGPIPE, as a shell reports a command
that a closed pipe ended (`yes | head`)."""
