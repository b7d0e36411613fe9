"""`rnnserve bench`: how close the server comes to its two limits, measured in one run.

The limits are ONNX Runtime called in-process on the same model file (what the hardware can
compute) and a bare gRPC server answering pre-encoded responses of the same size (what the
network and Python gRPC cost alone). rnnserve is measured between them with the same load
generator as the transport ceiling: an asyncio client sending pre-encoded requests.

This package is tooling on top of the server; nothing in the server imports it.
"""
