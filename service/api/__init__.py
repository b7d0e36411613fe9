"""The protocol edge: Open Inference Protocol (KServe v2) messages <-> the engine's values.

- `servicer`: inference.GRPCInferenceService, with Triton's extensions, over the model
  registry; it decodes, hands the request to the engine and encodes the outcome.
- `codec`: ModelInferRequest and response wire bytes <-> InferenceRequest and InferenceResult,
  tensors as numpy arrays.
- `status`: errors -> gRPC status codes and messages, in one place.

Nothing here touches ONNX Runtime, the state arena or a batch.
"""
