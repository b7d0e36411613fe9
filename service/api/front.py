"""The server's front door: the transport that serves the gRPC port, behind one interface.

Two transports serve the same services with the same meaning (`InferenceServicer.submit`
decides what every inference request means, whichever carries it):
- `native`: the Rust transport (tonic on tokio, `rnnserve_native`), handing the engine its
  requests in batches; built where cargo was present at install (`api.native`);
- `grpcio`: Python's grpc.aio, for platforms without the extension (`api.grpcio`).
"""

from __future__ import annotations

import enum
import importlib.util
from typing import Protocol


class Transport(enum.Enum):
    """Which transport serves the gRPC port."""

    AUTO = "auto"
    """native where the extension is installed, else grpcio."""
    NATIVE = "native"
    GRPCIO = "grpcio"


def native_installed() -> bool:
    """Whether the native transport's extension (the rnnserve-native distribution) is there."""
    try:
        return importlib.util.find_spec("rnnserve_native") is not None
    except ValueError:  # a module set to None in sys.modules: blocked
        return False


class Front(Protocol):
    """A started transport's life: `start`, `serve`, then on shutdown `drain` and `stop`."""

    name: str
    """The transport's name, as the start line gives it (native or grpcio)."""

    async def start(self) -> int:
        """Listen and serve; the port bound. Raises OSError when the address cannot be bound,
        UnusableCredentials when a TLS file cannot be used."""
        ...

    async def serve(self) -> None:
        """Health turns SERVING."""
        ...

    async def drain(self) -> None:
        """Health turns NOT_SERVING, for good: a drain has begun."""
        ...

    async def stop(self, grace_s: float) -> None:
        """Take no new calls; calls in flight get `grace_s` seconds, then are cut off."""
        ...
