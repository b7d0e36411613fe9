"""A/B: two builds of the server measured point by point in one run, in alternating order.

    python -m rnnserve_bench.ab --a "/old/venv/bin/python -P -m rnnserve" \\
        --b "/new/venv/bin/python -P -m rnnserve" --sessions 1,64 --rounds 3

Each command is a way to start `<command> serve`; both servers run for the whole run, and each
point of A is measured right next to B's, the order swapped every round, so the machine's drift
(minutes long on a shared VM) falls on both alike. Prints each point's median steps/s and
latency percentiles over the rounds, and B's steps/s relative to A's; a point's errors go to
stderr. What authentication costs: the same build twice, B started with RNNSERVE_AUTH_TOKENS,
and `--token` sent by every call (A ignores it).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from rnnserve.models import bundled_repository
from rnnserve_bench.cli import _numbers
from rnnserve_bench.loadgen import STREAM, UNARY
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import ServerProcess
from rnnserve_bench.runner import Series, _Ids, _point, _sampler
from rnnserve_bench.workload import load_workload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnserve_bench.ab", description=__doc__)
    parser.add_argument("--a", required=True, help="command that starts build A (before `serve`)")
    parser.add_argument("--b", required=True, help="command that starts build B (before `serve`)")
    parser.add_argument("--model", default="charlm_lstm")
    parser.add_argument("--sessions", type=_numbers, default=(1, 64))
    parser.add_argument("--steps", type=_numbers, default=(1,), help="time steps per request")
    parser.add_argument("--unary", action="store_true", help="measure ModelInfer too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("build/ab"))
    parser.add_argument(
        "--token",
        default="",
        help="bearer token every call sends, for servers started with --auth-tokens (e.g. "
        "through RNNSERVE_AUTH_TOKENS in one command, to measure what authentication costs)",
    )
    args = parser.parse_args(argv)
    options = BenchOptions(
        duration_s=args.duration, warmup_s=args.warmup, out=args.out, token=args.token
    )
    workload = load_workload(bundled_repository(), args.model)
    series = [Series(STREAM, t) for t in args.steps] + ([Series(UNARY, 1)] if args.unary else [])
    serve = [
        "serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
        "--metrics-port", "0",
    ]  # fmt: skip
    ids = _Ids()
    figures: dict[tuple[str, str, int], list[tuple[float, float, float, float]]] = {}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                ServerProcess(name, [*shlex.split(command), *serve], args.out / "logs")
            )
            for name, command in (("A", args.a), ("B", args.b))
        }
        for round_ in range(args.rounds):
            for s in series:
                for sessions in args.sessions:
                    order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
                    for name in order:
                        server = servers[name]
                        result = _point(
                            options, workload, server, s, sessions, ids, _sampler(server)
                        )
                        if result.errors:
                            print(
                                f"{name}, {s.label} at {sessions} sequences: {result.errors} "
                                f"errors, the first: {result.first_error}",
                                file=sys.stderr,
                            )
                        figures.setdefault((name, s.label, sessions), []).append(
                            (
                                result.steps_per_s,
                                result.percentile_ms(50),
                                result.percentile_ms(99),
                                # Server CPU per step drifts less than throughput does.
                                result.cpu_per_1000_steps("server_cpu_s") * 1000,
                            )
                        )
    print(
        "| series | sequences | A steps/s | B steps/s | B/A (median of rounds, range) "
        "| A p50/p99 ms | B p50/p99 ms | server CPU us/step A, B |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in series:
        for sessions in args.sessions:
            a = [statistics.median(v) for v in zip(*figures["A", s.label, sessions], strict=True)]
            b = [statistics.median(v) for v in zip(*figures["B", s.label, sessions], strict=True)]
            # Each round's B next to the same round's A: the drift between rounds cancels.
            ratios = [
                pb[0] / pa[0]
                for pa, pb in zip(
                    figures["A", s.label, sessions], figures["B", s.label, sessions], strict=True
                )
            ]
            print(
                f"| {s.label} | {sessions} | {a[0]:,.0f} | {b[0]:,.0f} "
                f"| {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {a[1]:.2f} / {a[2]:.2f} | {b[1]:.2f} / {b[2]:.2f} | {a[3]:.0f}, {b[3]:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
