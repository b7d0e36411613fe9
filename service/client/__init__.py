"""rnnserve's client: stateful streaming sessions over gRPC, without torch.

    import asyncio
    from rnnserve.client import Client

    async def main():
        async with Client("127.0.0.1:8001") as client:
            async with client.session("sensor_gru") as s:
                print(await s.step([[24.1], [24.3]]))  # [T=2, 1] readings -> [1, 2, 1]

    asyncio.run(main())

`SyncClient` is the same with blocking methods; `SequenceClient` is the older one-stream-per-
sequence client (kept for code that uses it). Errors are ClientError subclasses, each with
the gRPC status code: see rnnserve.client.errors.
"""

from rnnserve.client.aio import (
    Client,
    Health,
    ModelInfo,
    RetryPolicy,
    Session,
    StateInfo,
    TensorInfo,
)
from rnnserve.client.errors import (
    Aborted,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OutputLost,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from rnnserve.client.sequence import SEQUENCE_ID_HEADER, SequenceClient, sequence_id_header
from rnnserve.client.sync import SyncClient, SyncSession

__all__ = [
    "SEQUENCE_ID_HEADER",
    "Aborted",
    "Client",
    "ClientError",
    "DeadlineExceeded",
    "Health",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "OutputLost",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SequenceClient",
    "Session",
    "StateInfo",
    "SyncClient",
    "SyncSession",
    "TensorInfo",
    "Unauthenticated",
    "Unavailable",
    "sequence_id_header",
]
