"""How much memory idle sequences cost: open N sequences, leave them live, read the server's RSS.

    python -m rnnserve_bench.idle --sequences 100000    (or: make bench-idle)

Prints one JSON object: RSS before and after, bytes of RSS per sequence, and the bytes of
recurrent state each sequence holds, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from rnnserve.models import bundled_repository
from rnnserve_bench.procs import ServerProcess, start_rnnserve
from rnnserve_bench.workload import STREAM_METHOD, STREAM_OK_TAG, Workload, load_workload

STREAMS = 32


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def open_sequences(target: str, requests: Sequence[bytes]) -> int:
    """Send each START request (one step each, never ended) over a few streams; count errors."""

    async def one_stream(channel: grpc.aio.Channel, share: Sequence[bytes]) -> int:
        async def messages() -> AsyncIterator[bytes]:
            for request in share:
                yield request

        call = channel.stream_stream(STREAM_METHOD)(messages())
        return sum([response[0] != STREAM_OK_TAG async for response in call])

    async with grpc.aio.insecure_channel(target) as channel:
        shares = [requests[k::STREAMS] for k in range(STREAMS)]
        return sum(await asyncio.gather(*(one_stream(channel, s) for s in shares)))


def measure(server: ServerProcess, workload: Workload, sequences: int) -> dict[str, Any]:
    requests = [workload.request(i + 1, 1, start=True, end=False) for i in range(sequences)]
    before = rss_bytes(server.pid)
    started = time.perf_counter()
    errors = asyncio.run(open_sequences(server.target, requests))
    seconds = time.perf_counter() - started
    after = rss_bytes(server.pid)
    return {
        "model": workload.model,
        "sequences": sequences,
        "errors": errors,
        "seconds_to_open": round(seconds, 1),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_sequence_bytes": round((after - before) / sequences),
        "state_bytes_per_sequence": sum(4 * math.prod(s.dims) for s in workload.states),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnserve_bench.idle", description=__doc__)
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--model", default="charlm_lstm")
    args = parser.parse_args(argv)
    workload = load_workload(bundled_repository(), args.model)
    with tempfile.TemporaryDirectory() as workdir:
        flags = ["--max-sequences", str(args.sequences), "--log-level", "WARNING"]
        with start_rnnserve(Path(workdir), flags) as server:
            print(json.dumps(measure(server, workload, args.sequences)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
