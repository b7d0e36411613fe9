"""Model execution: the Runtime protocol and its ONNX Runtime implementation.

Nothing here knows about gRPC, sequences or metrics.
"""

from rnnserve.runtime.base import Runtime, TensorInfo

__all__ = ["Runtime", "TensorInfo"]
