"""The benchmark's peer does the real work: TorchServe, with the bench's handler and settings,
answers each sequence's steps with the logits of the model run step by step, its state carried
between requests, while several sequences share its batches.

`make test` installs TorchServe and Java; elsewhere the test skips.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from rnnserve_bench import torchserve
from rnnserve_bench.workload import load_workload
from tests.conftest import BUNDLED
from tests.serving.test_model import MODEL, TOLERANCE, VOCAB, reference

found = torchserve.find()
pytestmark = pytest.mark.skipif(isinstance(found, str), reason=str(found))


async def test_torchserve_answers_each_sequence_as_the_model_run_alone(tmp_path) -> None:
    assert not isinstance(found, str)
    binary, archiver = found
    workload = load_workload(BUNDLED, MODEL)
    store = torchserve.package(workload, archiver, tmp_path, max_batch=8)
    rng = np.random.default_rng(17)
    tokens = rng.integers(0, VOCAB, size=(4, 5, 2), dtype=np.int64)  # sequences, requests, T
    with torchserve.TorchServe(binary, store, tmp_path) as server:
        answers = await stream_all(server.target, tokens)
        assert server.cpu_seconds() > 0
    for s in range(len(tokens)):
        expected = reference(tokens[s])
        for t, answer in enumerate(answers[s]):
            assert answer[0] == torchserve.STREAM.ok_tag, torchserve.STREAM.describe(answer)
            logits = np.frombuffer(prediction(answer), dtype=np.float32).reshape(1, 2, VOCAB)
            np.testing.assert_allclose(logits, expected[t], atol=TOLERANCE, rtol=0)


async def stream_all(target: str, tokens: np.ndarray) -> list[list[bytes]]:
    async with grpc.aio.insecure_channel(target) as channel:
        return list(await asyncio.gather(*(one(channel, s, tokens[s]) for s in range(len(tokens)))))


async def one(channel: grpc.aio.Channel, sequence: int, tokens: np.ndarray) -> list[bytes]:
    call = channel.stream_stream(torchserve.STREAM.method)()
    answers = []
    for t, step in enumerate(tokens):
        last = t == len(tokens) - 1
        request = torchserve.request(
            7000 + sequence, {"tokens": step.reshape(1, -1)}, start=t == 0, end=last
        )
        await call.write(request)
        answers.append(await call.read())
    await call.done_writing()
    return answers


def prediction(reply: bytes) -> bytes:
    """Field 1 of a PredictionResponse: a tag byte, a varint length, then the bytes."""
    length, shift, position = 0, 0, 1
    while True:
        byte = reply[position]
        length |= (byte & 0x7F) << shift
        position += 1
        shift += 7
        if byte < 0x80:
            return reply[position : position + length]
