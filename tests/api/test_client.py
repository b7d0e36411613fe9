"""rnnserve.client against the real server: shared stream, explicit state, the blocking
wrapper, errors, and retries across a server killed mid-session (state in a real Redis).

Outputs are checked against the committed graph run in-process over each whole sequence."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from rnnserve.client import (
    Client,
    ClientError,
    InvalidArgument,
    NotFound,
    OutputLost,
    RetryPolicy,
    SequenceClient,
    SyncClient,
    Unavailable,
)
from tests.api.conftest import MODELS, Reference, infer_input, sequence_data
from tests.redis_server import RunningRedis, free_port
from tests.server import start_server

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def cut(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """`x` [1, T, ...] in parts of 1 to 4 time steps."""
    parts, start = [], 0
    while start < x.shape[1]:
        stop = start + int(rng.integers(1, 5))
        parts.append(x[:, start:stop])
        start = stop
    return parts


async def test_concurrent_sessions_share_one_stream(server, reference: Reference) -> None:
    rng = np.random.default_rng(15)
    work = [(MODELS[i % 3], sequence_data(MODELS[i % 3], 12, rng)) for i in range(24)]
    async with Client(server.target) as client:
        opened = []
        open_stream = client._open_stream
        client._open_stream = lambda metadata: opened.append(metadata) or open_stream(metadata)

        async def run(model: str, x: np.ndarray) -> tuple[np.ndarray, int | None]:
            async with client.session(model) as session:
                outputs = [await session.step(part) for part in cut(x, rng)]
                return np.concatenate(outputs, axis=1), session.sequence_version

        results = await asyncio.gather(*(run(model, x) for model, x in work))
    assert len(opened) == 1  # 24 sequences, one stream
    for (model, x), (output, version) in zip(work, results, strict=True):
        np.testing.assert_allclose(output, reference.run(model, x), **TOLERANCE)
        assert version is not None and version >= 3


async def test_explicit_state_saved_and_restored(server, reference: Reference) -> None:
    x = sequence_data("digits_lstm", 8, np.random.default_rng(1))
    x = np.concatenate([x, x[:, ::-1]])  # a batch of 2: explicit state has no batch limit
    expected = reference.run("digits_lstm", x)
    async with Client(server.target) as client:
        async with client.session("digits_lstm", explicit_state=True) as session:
            assert session.sequence_id is None and session.state is None
            first = await session.step(x[:, :3])
            saved = session.state
            assert saved is not None and saved["h_in"].shape == (2, 1, 128)
            rest = await session.step(x[:, 3:])
            session.state = saved
            again = await session.step(x[:, 3:])
        # A saved state continues anywhere: in another session too.
        async with client.session("digits_lstm", explicit_state=True) as other:
            other.state = saved
            elsewhere = await other.step(x[:, 3:])
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), expected, **TOLERANCE)
    np.testing.assert_array_equal(again, rest)
    np.testing.assert_array_equal(elsewhere, rest)


def test_sync_client_from_plain_code(server, reference: Reference) -> None:
    x = sequence_data("charlm_lstm", 10, np.random.default_rng(2))
    with SyncClient(server.target, token="secret-token") as client:
        assert client.health().ready
        with client.session("charlm_lstm") as session:
            outputs = [session.step(x[0, :4]), session.step(x[:, 4:], end=True)]
            assert session.sequence_version == 2
        with pytest.raises(NotFound, match="unknown model"):
            client.session("no_such_model")
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), reference.run("charlm_lstm", x), **TOLERANCE
    )


async def test_models_and_health(server) -> None:
    async with Client(server.target) as client:
        health = await client.health()
        found = {info.name: info for info in await client.models()}
    assert (health.live, health.ready, health.serving) == (True, True, "SERVING")
    assert set(found) == set(MODELS)
    gru = found["sensor_gru"]
    assert gru.ready and gru.streamable and gru.versions == ("1",)
    assert [(i.name, i.datatype, i.dims) for i in gru.inputs] == [("reading", "FP32", (-1, 1))]
    assert [s.input_name for s in found["digits_lstm"].states] == ["h_in", "c_in"]


async def test_errors_carry_their_status(server) -> None:
    async with Client(server.target) as client:
        with pytest.raises(NotFound, match="unknown model 'nope'") as unknown:
            await client.session("nope").open()
        assert unknown.value.code.name == "NOT_FOUND"
        async with client.session("charlm_lstm") as session:
            with pytest.raises(InvalidArgument, match="is \\[B, T\\]"):
                await session.step(np.zeros((1, 2, 3), np.int64))  # refused before sending
            with pytest.raises(InvalidArgument) as outside:
                await session.step(np.array([[10_000]]))  # refused by the server, in-band
            assert outside.value.code.name == "INVALID_ARGUMENT"
            # The refused steps changed nothing: the sequence starts with the next one.
            await session.step(np.array([[5]]))
            assert session.sequence_version == 1


async def test_unreachable_server_fails_fast() -> None:
    started = time.monotonic()
    async with Client(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(Unavailable) as refused:
            await client.session("charlm_lstm").open()
    assert refused.value.code.name == "UNAVAILABLE"
    assert time.monotonic() - started < 10


async def test_sessions_survive_a_server_killed_mid_session(
    redis_server: RunningRedis, reference: Reference, tmp_path
) -> None:
    model, steps, count = "charlm_lstm", 12, 6
    rng = np.random.default_rng(3)
    inputs = [sequence_data(model, steps, rng) for _ in range(count)]
    flags = ("--state-store", redis_server.url, "--state-durability", "step")
    servers = [start_server(tmp_path / "first", *flags, "--metrics-port", "off")]
    try:
        async with Client(
            servers[0].target, retry=RetryPolicy(attempts=100, timeout_s=90)
        ) as client:
            sessions = [await client.session(model).open() for _ in range(count)]
            outputs: list[list[np.ndarray]] = [[] for _ in range(count)]

            async def advance(t: int) -> None:
                async def one(i: int) -> None:
                    outputs[i].append(await sessions[i].step(inputs[i][:, t : t + 1]))

                await asyncio.gather(*(one(i) for i in range(count)))

            for t in range(5):
                await advance(t)
            # Step 5 of session 0 applied with its answer lost: sent by another client with
            # the version session 0 holds, as a retry after a crash would find it.
            with triton.InferenceServerClient(servers[0].target) as other:
                other.infer(
                    model,
                    [infer_input(model, inputs[0][:, 5:6])],
                    sequence_id=sessions[0].sequence_id,
                    parameters={"sequence_version": 5},
                )
            servers[0].process.send_signal(signal.SIGKILL)
            servers[0].process.wait()
            # The next steps meet the dead server and retry while a new one starts.
            starter = threading.Thread(
                target=lambda: servers.append(
                    start_server(tmp_path / "second", *flags, "--metrics-port", "off",
                                 "--grpc-port", str(servers[0].ports.grpc))
                )
            )  # fmt: skip
            starter.start()
            try:
                with pytest.raises(OutputLost, match="step 6 of sequence"):
                    await sessions[0].step(inputs[0][:, 5:6])
                outputs[0].append(np.full_like(outputs[0][0], np.nan))  # that answer is gone
                answers = await asyncio.gather(
                    *(s.step(x[:, 5:6]) for s, x in zip(sessions[1:], inputs[1:], strict=True))
                )
            finally:
                await asyncio.to_thread(starter.join)
            for i, answer in enumerate(answers, start=1):
                outputs[i].append(answer)
            for t in range(6, steps):
                await advance(t)
            assert [s.sequence_version for s in sessions] == [steps] * count
            for session in sessions:
                await session.close()
    finally:
        for server in servers:
            server.stop()
    assert len(servers) == 2
    for i in range(count):
        got = np.concatenate(outputs[i], axis=1)
        expected = reference.run(model, inputs[i])
        keep = [t for t in range(steps) if not (i == 0 and t == 5)]
        np.testing.assert_allclose(got[:, keep], expected[:, keep], **TOLERANCE)


async def test_close_ends_the_sequence_and_own_stream_keeps_apart(
    server, reference: Reference
) -> None:
    x = sequence_data("sensor_gru", 6, np.random.default_rng(5))
    async with Client(server.target) as client:
        opened = []
        open_stream = client._open_stream
        client._open_stream = lambda metadata: (
            opened.append(dict(metadata)) or open_stream(metadata)
        )
        async with client.session("sensor_gru", sequence_id="séance-7", own_stream=True) as s:
            output = np.concatenate([await s.step(x[:, :2]), await s.step(x[:, 2:])], axis=1)
    # Its own stream, carrying the id for a router (percent-encoded: metadata is ASCII).
    assert opened == [{"x-sequence-id": "s%C3%A9ance-7"}]
    np.testing.assert_allclose(output, reference.run("sensor_gru", x), **TOLERANCE)
    with triton.InferenceServerClient(server.target) as other:
        with pytest.raises(InferenceServerException, match="séance-7") as ended:
            other.infer("sensor_gru", [infer_input("sensor_gru", x[:, :1])], sequence_id="séance-7")
    assert ended.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_sequence_client_refuses_characters_outside_the_vocabulary(server) -> None:
    with SequenceClient(server.target, "charlm_lstm") as lm:
        with pytest.raises(ClientError, match="'ï': not in the vocabulary of model charlm_lstm"):
            lm.generate("naïve", 3)
        assert lm.generate("def ", 3)  # nothing was sent: the stream goes on
