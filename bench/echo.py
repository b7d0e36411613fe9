"""The transport-only ceiling: a bare grpc.aio server that answers without any model.

    python -m rnnserve_bench.echo --model charlm_lstm --steps 1 --port-file ports.json

It serves ModelStreamInfer and ModelInfer on the same method paths as rnnserve, takes requests
as bytes (no deserialization) and answers each with one response encoded at start-up, of the
size rnnserve gives for the model at `--steps` steps. Driven by the benchmark's client, it
measures what loopback networking and Python gRPC cost alone. Its server options are
rnnserve's defaults, so limits of gRPC's own (such as the C-core server cancelling calls when
more than `grpc.server.max_pending_requests`, 1000, wait to be picked up) apply to both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from rnnserve.models import bundled_repository
from rnnserve_bench.workload import load_workload

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


def handlers(stream_reply: bytes, unary_reply: bytes) -> grpc.GenericRpcHandler:
    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield stream_reply

    async def unary(request: bytes, context: Any) -> bytes:
        return unary_reply

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(unary),
        },
    )


async def serve(host: str, port: int, port_file: Path | None, stream: bytes, unary: bytes) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([handlers(stream, unary)])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if port_file is not None:
        staging = port_file.with_suffix(port_file.suffix + ".tmp")
        staging.write_text(json.dumps({"grpc": bound}))
        staging.replace(port_file)
    logger.info(
        "echo serving %s:%d, responses of %d bytes (stream) and %d (unary)",
        host,
        bound,
        len(stream),
        len(unary),
    )
    await stopping.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnserve_bench.echo", description=__doc__)
    parser.add_argument("--model", default="charlm_lstm", help="whose responses to imitate")
    parser.add_argument("--model-repository", type=Path, default=bundled_repository())
    parser.add_argument("--steps", type=int, default=1, help="time steps per response")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    workload = load_workload(args.model_repository, args.model)
    stream, unary = workload.stream_response(args.steps), workload.unary_response(args.steps)
    asyncio.run(serve(args.host, args.port, args.port_file, stream, unary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
