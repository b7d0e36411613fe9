"""`rnnserve bench` (and `python -m rnnserve_bench`): parse the options, run, print the report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rnnserve.errors import CommandError, ServiceError
from rnnserve.models import bundled_repository


def build_parser(prog: str = "rnnserve bench") -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(
        prog=prog,
        description="In one run on this machine: ONNX Runtime in-process on the model file "
        "(the compute limit), rnnserve over gRPC on loopback with N concurrent sequences "
        "(stream and unary) through its native transport (`rnnserve`) and through grpc.aio "
        "(`rnnserve-grpcio`), the real Triton beside both point by point, a bare gRPC server "
        "answering same-size responses with the same client (the transport limit), "
        "perf_analyzer against each server, and a scale point of 4,096 streams. Writes "
        "results.json, results.md (led by the ratios to Triton against the targets) and plots, "
        "and prints the report and the headline ratios last.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="about two minutes: fewer, shorter points"
    )
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
    bench.add_argument(
        "--steps", type=_numbers, default=(1, 32), help="time steps per request (1,32)"
    )
    bench.add_argument(
        "--duration", type=float, help="seconds measured per point and round (3; quick 1)"
    )
    bench.add_argument("--warmup", type=float, help="seconds before each point (0.5; quick 0.2)")
    bench.add_argument(
        "--repeats",
        type=int,
        help="measurements of each point per server, alternating their order; the report "
        "gives the median and the range (3; quick 1)",
    )
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
    bench.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the peers: Triton, TorchServe, perf_analyzer (rnnserve's two series and the "
        "transport ceiling are still measured)",
    )
    bench.add_argument(
        "--scale-streams",
        type=int,
        default=4096,
        metavar="N",
        help="concurrent streams of the scale point on a fresh rnnserve (native): memory per "
        "open stream and per idle sequence, one short window (4096; 0 skips it)",
    )
    bench.add_argument(
        "--triton",
        type=Path,
        metavar="PATH",
        help="Triton's launcher, as `make triton` writes it (build/triton/run in the checkout)",
    )
    return bench


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; CommandError for what the user can fix."""
    from rnnserve_bench import runner
    from rnnserve_bench.options import BenchOptions

    try:
        options = BenchOptions.resolve(
            args.quick,
            sessions=args.sessions,
            batches=args.batches,
            duration_s=args.duration,
            warmup_s=args.warmup,
            repeats=args.repeats,
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
            triton=args.triton,
            scale_streams=args.scale_streams,
        )
        report = runner.run(options)
    except (ValueError, OSError, RuntimeError, ServiceError) as error:
        raise CommandError(str(error), exit_code=1) from error
    print(report.markdown)
    print()
    print("results:", ", ".join(str(path) for path in report.files))
    for line in report.headline:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "rnnserve bench") -> int:
    """Parse `argv` (the arguments after `bench`) and run; the exit code."""
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run(args)
    except CommandError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
