"""The first client: one sequence over one ModelStreamInfer stream, blocking (Client and
SyncClient share one stream between many sequences, and retry).

    from rnnserve.client import SequenceClient
    with SequenceClient("localhost:8001", "charlm_lstm") as lm:
        print(lm.generate("def ", 60))

The server keeps the sequence's state; each `step` sends only the new time steps. For a server
with TLS, the options are tritonclient's (file paths):

    SequenceClient("rnnserve:8001", "charlm_lstm", ssl=True, root_certificates="ca.pem",
                   private_key="client.key", certificate_chain="client.pem")
"""

from __future__ import annotations

import queue
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve.client.closing import Closing
from rnnserve.client.errors import ClientError, from_stream_error
from rnnserve.repository.signature import WIRE_DTYPES, wire_name

SEQUENCE_ID_HEADER = "x-sequence-id"
"""The gRPC metadata key a consistent-hash router keeps a sequence's requests together by."""


def sequence_id_header(sequence_id: int | str) -> str:
    """The header's value for `sequence_id`: the id percent-encoded, so integer ids and ids of
    letters, digits and -._~ go unchanged (gRPC metadata values are printable ASCII, and a
    router needs a stable value, not the id itself)."""
    return urllib.parse.quote(str(sequence_id), safe="")


class SequenceClient(Closing):
    """One sequence of `model` on one ModelStreamInfer stream to `url` (host:port); blocking.

    Reads the model's config (ModelConfig) first and uses its first input and first output; the
    first `step` starts the sequence (Triton's sequence extension), `close` ends it. A random
    non-zero integer id is chosen when `sequence_id` is not given. Transport failures raise
    grpc.RpcError; a step the server refuses raises ClientError.

    The stream carries the id in the SEQUENCE_ID_HEADER header as well: a proxy reads headers,
    not request bodies, and routes on it (see deploy/envoy/envoy.yaml).

    With `ssl` the channel speaks TLS and verifies the server against `root_certificates` (a
    PEM file; default: the system's CAs); `private_key` and `certificate_chain` (PEM files)
    are the client's certificate, for a server that asks for one (mutual TLS).
    """

    def __init__(
        self,
        url: str,
        model: str,
        sequence_id: int | str | None = None,
        *,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
    ) -> None:
        self.model = model
        self.sequence_id = sequence_id or secrets.randbits(62) + 1
        if ssl:
            credentials = grpc.ssl_channel_credentials(
                *(
                    Path(path).read_bytes() if path is not None else None
                    for path in (root_certificates, private_key, certificate_chain)
                )
            )
            self._channel = grpc.secure_channel(url, credentials)
        else:
            self._channel = grpc.insecure_channel(url)
        stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self.config = stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
        model_input = self.config.input[0]
        self._input_name = model_input.name
        self._datatype = wire_name(model_input.data_type)
        self._output_name = self.config.output[0].name
        self.vocabulary = self.config.parameters["vocabulary"].string_value
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._responses: Iterator[pb.ModelStreamInferResponse] = stub.ModelStreamInfer(
            iter(self._requests.get, None),
            metadata=((SEQUENCE_ID_HEADER, sequence_id_header(self.sequence_id)),),
        )
        self._started = False
        self._ended = False

    def step(self, x: np.ndarray, end: bool = False) -> np.ndarray:
        """Send [T, ...] (or [1, T, ...]) new steps; return the output for them, batch removed."""
        x = np.asarray(x, dtype=WIRE_DTYPES[self._datatype])
        if x.ndim == len(self.config.input[0].dims):
            x = x[None]
        request = pb.ModelInferRequest(model_name=self.model)
        request.inputs.add(name=self._input_name, datatype=self._datatype, shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        if isinstance(self.sequence_id, str):
            request.parameters["sequence_id"].string_param = self.sequence_id
        else:
            request.parameters["sequence_id"].int64_param = self.sequence_id
        request.parameters["sequence_start"].bool_param = not self._started
        request.parameters["sequence_end"].bool_param = end
        self._requests.put(request)
        reply = next(self._responses)
        if reply.error_message:
            raise from_stream_error(reply.error_message)
        self._started, self._ended = True, end
        response = reply.infer_response
        output = response.outputs[0]
        array = np.frombuffer(response.raw_output_contents[0], WIRE_DTYPES[output.datatype])
        result: np.ndarray = array.reshape(tuple(output.shape))[0]
        return result

    def encode(self, text: str) -> np.ndarray:
        """`text` as int64 token ids [T] of the model's vocabulary. Raises ClientError naming
        the characters outside it (they were once sent as id 0, a character of their own)."""
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        unknown = sorted({ch for ch in text if ch not in index})
        if unknown:
            raise ClientError(
                f"{', '.join(map(repr, unknown))}: not in the vocabulary of model {self.model}"
            )
        return np.array([index[ch] for ch in text], dtype=np.int64)

    def generate(self, prompt: str, length: int, temperature: float = 0.0, seed: int = 0) -> str:
        """Feed `prompt` one character per request, then let the model continue it."""
        if not self.vocabulary:
            raise ClientError(f"model {self.model} has no vocabulary: it is not a text model")
        rng = np.random.default_rng(seed)
        logits = np.zeros(len(self.vocabulary), np.float32)
        for token in self.encode(prompt):
            logits = self.step(np.array([token]))[-1]
        text = []
        for _ in range(length):
            if temperature > 0:
                weights = np.exp((logits - logits.max()) / temperature)
                token = int(rng.choice(len(weights), p=weights / weights.sum()))
            else:
                token = int(logits.argmax())
            text.append(self.vocabulary[token])
            logits = self.step(np.array([token]))[-1]
        return "".join(text)

    def close(self) -> None:
        """End the sequence if it is open (a step of zeros with sequence_end=true), then close
        the stream and the channel."""
        if self._started and not self._ended:
            # End the sequence so the server frees its state now rather than at idle timeout.
            with_zeros = np.zeros((1, *(max(d, 1) for d in self.config.input[0].dims)))
            self.step(with_zeros, end=True)
        self._requests.put(None)
        self._channel.close()
