"""What durability costs: steps/s and latency of each state store and durability level.

    python -m rnnserve_bench.durability [--model charlm_lstm] [--sequences 1 64]
                                        [--seconds 10] [--redis-url redis://...] [--no-ha]

For each configuration (memory; one Redis at none, end and step; Redis behind Sentinel (a
primary, a replica, one Sentinel) and a Redis Cluster (three shards of a primary and a
replica) at step, each without and with the replica wait `--state-min-replicas 1`) it starts a
fresh server on loopback, drives `--sequences` concurrent sequences closed-loop (each sequence
sends its next one-step request as soon as the previous answer arrives) over a few
ModelStreamInfer streams for `--seconds` after a one-second warm-up, measures each request's
latency at the client and prints a Markdown table. It starts the Redis servers it needs
(Debian's `redis-server` and `redis-cli`); `--redis-url` names an existing one instead, and
`--no-ha` leaves Sentinel and Cluster out. A benchmark, not a test: figures depend on the
machine, and client and servers share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve._pb import model_config_pb2 as mc
from rnnserve_bench.procs import PYTHON
from rnnserve_bench.redis_servers import (
    RunningRedis,
    start_cluster,
    start_redis,
    start_sentinel,
    wait_for_replicas,
)

CONFIGURATIONS = (
    ("memory", "none", 0),
    ("redis", "none", 0),
    ("redis", "end", 0),
    ("redis", "step", 0),
    ("sentinel", "step", 0),
    ("sentinel", "step", 1),
    ("cluster", "step", 0),
    ("cluster", "step", 1),
)
"""(store, durability, replicas each write must reach) of each run."""
HA_STORES = ("sentinel", "cluster")
WARM_UP_S = 1.0


@dataclass(frozen=True)
class Outcome:
    store: str
    durability: str
    min_replicas: int
    steps_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rnnserve_bench.durability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="charlm_lstm", help="a bundled streaming model")
    parser.add_argument(
        "--sequences", type=int, nargs="+", default=[1, 64], help="concurrent sequences (loads)"
    )
    parser.add_argument("--streams", type=int, default=4, help="gRPC streams they share")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--redis-url", help="an existing Redis (default: start one)")
    parser.add_argument("--no-ha", action="store_true", help="leave Sentinel and Cluster out")
    args = parser.parse_args(argv)
    configurations = [c for c in CONFIGURATIONS if not (args.no_ha and c[0] in HA_STORES)]
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as folder, ExitStack() as stack:
        workdir = Path(folder)
        urls = {"memory": "memory", "redis": args.redis_url}
        if not args.redis_url:
            urls["redis"] = stack.enter_context(_started(start_redis(workdir / "redis"))).url
        if not args.no_ha:
            urls["sentinel"] = stack.enter_context(_sentinel(workdir / "sentinel"))
            urls["cluster"] = stack.enter_context(_cluster(workdir / "cluster"))
        tables, failed = [], False
        for sequences in args.sequences:
            outcomes: list[Outcome] = []
            for store, durability, replicas in configurations:
                run = workdir / f"{sequences}-{store}-{durability}-{replicas}"
                with _server(run, urls[store], durability, replicas) as address:
                    outcome = asyncio.run(
                        _drive(address, args, sequences, store, durability, replicas)
                    )
                outcomes.append(outcome)
                print(f"{sequences} sequences: {_row(outcome, outcomes[0])}", file=sys.stderr)
                failed = failed or outcome.errors > 0
            tables.append(_table(outcomes, args, sequences))
    print("\n\n".join(tables))
    return 1 if failed else 0


def _table(outcomes: list[Outcome], args: argparse.Namespace, sequences: int) -> str:
    lines = [
        f"{args.model}, {sequences} concurrent sequences, one time step per request, "
        f"{args.seconds:g} s per run",
        "",
        "| store | durability | min replicas | steps/s | p50 ms | p99 ms | throughput vs memory "
        "| p99 vs memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(o, outcomes[0]) for o in outcomes]
    return "\n".join(lines)


def _row(o: Outcome, base: Outcome) -> str:
    return (
        f"| {o.store} | {o.durability} | {o.min_replicas} | {o.steps_per_s:,.0f} "
        f"| {o.p50_ms:.2f} | {o.p99_ms:.2f} "
        f"| {o.steps_per_s / base.steps_per_s:.0%} | {o.p99_ms / base.p99_ms:.1f}x |"
        + (f" {o.errors} errors" if o.errors else "")
    )


@contextmanager
def _started(server: RunningRedis) -> Iterator[RunningRedis]:
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def _sentinel(workdir: Path) -> Iterator[str]:
    """A primary, its replica and one Sentinel; the store URL that names them."""
    with ExitStack() as stack:
        primary = stack.enter_context(_started(start_redis(workdir / "primary")))
        replica = start_redis(workdir / "replica", "--replicaof", "127.0.0.1", str(primary.port))
        stack.enter_context(_started(replica))
        wait_for_replicas(primary, 1)
        sentinel = start_sentinel(workdir / "sentinel", primary, "states", 1)
        stack.callback(sentinel.stop)
        yield f"redis+sentinel://127.0.0.1:{sentinel.port}/states/0"


@contextmanager
def _cluster(workdir: Path) -> Iterator[str]:
    cluster = start_cluster(workdir)
    try:
        yield cluster.url
    finally:
        cluster.stop()


@contextmanager
def _server(workdir: Path, store: str, durability: str, replicas: int) -> Iterator[str]:
    workdir.mkdir(parents=True)
    port_file = workdir / "ports.json"
    command = [
        *PYTHON, "-m", "rnnserve", "serve", "--grpc-port", "0", "--http-port", "off",
        "--metrics-port", "off",
        "--port-file", str(port_file), "--log-level", "WARNING",
        "--state-store", store, "--state-durability", durability,
        *(["--state-min-replicas", str(replicas)] if replicas else []),
    ]  # fmt: skip
    with (workdir / "server.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {(workdir / 'server.log').read_text()}")
            time.sleep(0.05)
        yield f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


async def _drive(
    address: str,
    args: argparse.Namespace,
    sequences: int,
    store: str,
    durability: str,
    replicas: int,
) -> Outcome:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name=args.model))).config
        per_stream = [list(range(k + 1, sequences + 1, args.streams)) for k in range(args.streams)]
        started = time.perf_counter()
        measure_from = started + WARM_UP_S
        until = measure_from + args.seconds
        results = await asyncio.gather(
            *(
                _stream(stub, config, args.model, ids, measure_from, until)
                for ids in per_stream
                if ids
            )
        )
    latencies = np.concatenate([r[0] for r in results]) * 1e3
    errors = sum(r[1] for r in results)
    return Outcome(
        store,
        durability,
        replicas,
        len(latencies) / args.seconds,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
        errors,
    )


def _requests(
    model: str, config: mc.ModelConfig, ids: list[int]
) -> dict[int, pb.ModelInferRequest]:
    """One ready message per sequence (its flags are set per request)."""
    model_input = config.input[0]
    rng = np.random.default_rng(ids[0])
    messages = {}
    for sid in ids:
        if model_input.data_type == mc.TYPE_INT64:  # token ids
            x = rng.integers(1, 64, size=(1, 1), dtype=np.int64)
            datatype = "INT64"
        else:
            x = rng.standard_normal((1, 1, *model_input.dims[1:])).astype(np.float32)
            datatype = "FP32"
        message = pb.ModelInferRequest(model_name=model, id=str(sid))
        message.inputs.add(name=model_input.name, datatype=datatype, shape=x.shape)
        message.raw_input_contents.append(x.tobytes())
        message.parameters["sequence_id"].int64_param = sid
        messages[sid] = message
    return messages


class _ClosedLoop:
    """One stream's sequences: each answer sends that sequence's next step until time is up,
    then an END, so nothing is left behind in the store."""

    def __init__(
        self, messages: dict[int, pb.ModelInferRequest], measure_from: float, until: float
    ) -> None:
        self.messages = messages
        self.measure_from = measure_from
        self.until = until
        self.outbox: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self.sent: dict[int, float] = {}
        self.ending: set[int] = set()
        self.latencies: list[float] = []
        self.errors = 0

    def send(self, sid: int, start: bool = False, end: bool = False) -> None:
        request = pb.ModelInferRequest()
        request.CopyFrom(self.messages[sid])
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
        self.sent[sid] = time.perf_counter()
        self.outbox.put_nowait(request)

    async def requests(self) -> AsyncIterator[pb.ModelInferRequest]:
        for sid in self.messages:
            self.send(sid, start=True)
        while (request := await self.outbox.get()) is not None:
            yield request

    def answered(self, response: pb.ModelStreamInferResponse) -> None:
        now = time.perf_counter()
        sid = int(response.infer_response.id)
        if response.error_message:
            self.errors += 1
            if self.errors == 1:
                print(f"error: {response.error_message}", file=sys.stderr)
        elif self.measure_from <= now < self.until and sid not in self.ending:
            self.latencies.append(now - self.sent[sid])
        if sid in self.ending:
            self.ending.discard(sid)
            if not self.ending:
                self.outbox.put_nowait(None)
        elif now < self.until:
            self.send(sid)
        else:
            self.ending.add(sid)
            self.send(sid, end=True)


async def _stream(
    stub: pb_grpc.GRPCInferenceServiceStub,
    config: mc.ModelConfig,
    model: str,
    ids: list[int],
    measure_from: float,
    until: float,
) -> tuple[np.ndarray, int]:
    loop = _ClosedLoop(_requests(model, config, ids), measure_from, until)
    async for response in stub.ModelStreamInfer(loop.requests()):
        loop.answered(response)
    return np.asarray(loop.latencies), loop.errors


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
