"""rnnserve: a stateful gRPC inference server for recurrent networks exported to ONNX."""

__version__ = "0.1.0"
