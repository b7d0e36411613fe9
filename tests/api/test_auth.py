"""Bearer-token authentication (`--auth-tokens`) on the real server, through tritonclient.

Every call but the health service needs a token the file names; a refusal is UNAUTHENTICATED
with one message whatever was asked (nothing about which models or sequences exist), and is
counted by reason. The file is read again when it changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.api.auth import MESSAGE, PRINCIPAL, Authentication
from rnnserve.auth import RELOAD_CHECK_S, TokenFile
from rnnserve.client import Client, Unauthenticated
from tests.api.conftest import OUTPUTS, Reference, infer_input, sequence_data
from tests.api.fuzzing import examples, seeded
from tests.conftest import run_cli
from tests.server import serving

MODEL = "sensor_gru"
ALICE, BOB = "alice-token-0123", "bob-token-4567"


def line(principal: str, token: str) -> str:
    return f"{principal} {hashlib.sha256(token.encode()).hexdigest()}\n"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("# principal, sha256 of the token\n" + line("alice", ALICE))
    return path


@pytest.fixture(scope="module")
def server(tokens: Path, tmp_path_factory: pytest.TempPathFactory, serving_transport: str):
    workdir = tmp_path_factory.mktemp("server")
    flags = ("--auth-tokens", str(tokens))
    with serving(workdir, *flags, transport=serving_transport) as running:
        yield running


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_known_token_is_served_and_health_needs_none(server, reference: Reference) -> None:
    x = sequence_data(MODEL, 3, np.random.default_rng(1))
    with triton.InferenceServerClient(server.target) as client:
        result = client.infer(
            MODEL,
            [infer_input(MODEL, x)],
            sequence_id=7,
            sequence_start=True,
            headers=bearer(ALICE),
        )
        np.testing.assert_allclose(
            result.as_numpy(OUTPUTS[MODEL]), reference.run(MODEL, x), rtol=1e-5, atol=1e-5
        )
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with triton.InferenceServerClient(server.target) as client:  # liveness and readiness too
        assert client.is_server_live() and client.is_server_ready()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [(None, "missing"), ({"authorization": "Basic abc"}, "malformed"), (bearer(BOB), "unknown")],
)
def test_every_other_call_without_a_known_token_is_unauthenticated_alike(
    server, headers, reason
) -> None:
    before = server.counts_by_reason("rnnserve_auth_failures").get(reason, 0.0)
    x = sequence_data(MODEL, 1, np.random.default_rng(2))
    inputs = [infer_input(MODEL, x)]
    calls = {
        "infer": lambda c: c.infer(MODEL, inputs, headers=headers),
        "infer on an unknown model": lambda c: c.infer("nosuch", inputs, headers=headers),
        "metadata": lambda c: c.get_model_metadata(MODEL, headers=headers),
        "metadata of an unknown model": lambda c: c.get_model_metadata("nosuch", headers=headers),
        "model ready": lambda c: c.is_model_ready(MODEL, headers=headers),
        "repository": lambda c: c.get_model_repository_index(headers=headers),
    }  # fmt: skip
    with triton.InferenceServerClient(server.target) as client:
        for name, call in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                call(client)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED", name
            assert refused.value.message() == MESSAGE, name  # the same, whatever was asked
    assert server.counts_by_reason("rnnserve_auth_failures")[reason] == before + len(calls)


def test_a_stream_without_a_token_is_refused_and_one_with_it_is_served(server) -> None:
    x = sequence_data(MODEL, 1, np.random.default_rng(3))
    for headers, expected in ((None, "StatusCode.UNAUTHENTICATED"), (bearer(ALICE), None)):
        answers: list[object] = []
        with triton.InferenceServerClient(server.target) as client:
            client.start_stream(
                callback=lambda result, error, answers=answers: answers.append(error or result),
                headers=headers,
            )
            try:
                client.async_stream_infer(
                    MODEL, [infer_input(MODEL, x)], sequence_id=11, sequence_start=True,
                    sequence_end=True,
                )  # fmt: skip
            except InferenceServerException:
                # The server may end a refused stream before the request is sent: tritonclient
                # then refuses to send it, and the stream's status reaches the callback.
                if expected is None:
                    raise
            deadline = time.monotonic() + 10
            while not answers and time.monotonic() < deadline:
                time.sleep(0.01)
            client.stop_stream()
        assert answers, headers
        if expected is None:
            assert isinstance(answers[0], triton.InferResult), answers[0]
        else:
            assert isinstance(answers[0], InferenceServerException), answers[0]
            assert answers[0].status() == expected


def test_tokens_are_added_and_revoked_without_a_restart(server, tokens: Path) -> None:
    with triton.InferenceServerClient(server.target) as client:
        assert client.is_model_ready(MODEL, headers=bearer(ALICE))
        tokens.write_text(line("bob", BOB))  # alice revoked, bob added
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.is_model_ready(MODEL, headers=bearer(BOB))
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, "the new token file was not read"
                time.sleep(0.2)
        with pytest.raises(InferenceServerException) as refused:
            client.is_model_ready(MODEL, headers=bearer(ALICE))
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        tokens.write_text("alice not-a-digest\n")  # a bad rewrite keeps the tokens loaded
        time.sleep(1.2)
        assert client.is_model_ready(MODEL, headers=bearer(BOB))
        tokens.write_text(line("alice", ALICE))


async def test_a_stream_whose_token_is_revoked_is_refused_at_its_next_request(
    tmp_path: Path, serving_transport: str
) -> None:
    """A stream authenticates once, as it opens; the revocation reaches it all the same."""
    tokens = tmp_path / "tokens"
    tokens.write_text(line("alice", ALICE) + line("bob", BOB))
    x = sequence_data(MODEL, 2, np.random.default_rng(4))
    flags = ("--auth-tokens", str(tokens))
    with serving(tmp_path / "server", *flags, transport=serving_transport) as server:
        async with (
            Client(server.target, token=ALICE) as alice,
            Client(server.target, token=BOB) as bob,
        ):
            theirs = [await c.session(MODEL).open() for c in (alice, bob)]
            for session in theirs:
                await session.step(x[:, :1])
            tokens.write_text(line("bob", BOB))  # alice revoked, her stream still open
            await asyncio.sleep(RELOAD_CHECK_S + 0.5)
            with pytest.raises(Unauthenticated, match="authentication required"):
                await theirs[0].step(x[:, 1:])
            await theirs[1].step(x[:, 1:], end=True)


def test_a_token_file_that_cannot_be_used_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text(line("alice", ALICE) + "bob deadbeef\n")
    done = run_cli(
        "serve", "--grpc-port", "0", "--metrics-port", "off", "--auth-tokens", str(bad), timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert f"--auth-tokens {bad}, line 2" in done.stderr and "Traceback" not in done.stderr
    missing = run_cli(
        "serve", "--grpc-port", "0", "--auth-tokens", str(tmp_path / "none"), timeout=60
    )
    assert missing.returncode == 1 and "No such file" in missing.stderr, missing.stderr


@seeded
@settings(max_examples=examples(60), deadline=None)
@given(
    st.one_of(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6000),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(
            lambda token: "Bearer " + token
        ),
        st.sampled_from(["Bearer", "bearer ", "Bearer  ", "BEARER " + ALICE[:-1], ALICE]),
    ),
    st.sampled_from(["ModelInfer", "ModelMetadata", "RepositoryIndex"]),
)
def test_any_authorization_value_but_a_known_token_is_refused_alike(
    server, value: str, method: str
) -> None:
    """Whatever a client puts in `authorization` (empty, huge, a near miss of a real token),
    the call ends UNAUTHENTICATED with the one message, or is served for a known token."""
    requests = {
        "ModelInfer": pb.ModelInferRequest(model_name=MODEL),
        "ModelMetadata": pb.ModelMetadataRequest(name=MODEL),
        "RepositoryIndex": pb.RepositoryIndexRequest(),
    }
    request = requests[method]
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=lambda data: data,
        )
        try:
            call(request, metadata=(("authorization", value),), timeout=30)
        except grpc.RpcError as error:
            known = value.lower().startswith("bearer ") and value[7:].strip() == ALICE
            if not known:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
                assert error.details() == MESSAGE
            return
        assert value.lower().startswith("bearer ") and value[7:].strip() == ALICE


async def test_concurrent_calls_each_see_their_own_principal(tmp_path: Path) -> None:
    """The principal travels in a context variable: calls of different principals that
    interleave on one event loop (each awaiting mid-call) must never see each other's."""
    names = [f"p{n}" for n in range(8)]
    path = tmp_path / "tokens"
    path.write_text("".join(line(name, f"token-{name}") for name in names))

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen = PRINCIPAL.get()
        await asyncio.sleep(0.001 * (len(request) % 5))  # let other calls run in between
        assert PRINCIPAL.get() == seen
        return seen.encode()

    server = grpc.aio.server(
        interceptors=[Authentication(TokenFile(path), False, lambda why: None)]
    )
    handler = grpc.unary_unary_rpc_method_handler(whoami)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"W": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/W")
            plan = [names[(n * 7) % len(names)] for n in range(400)]
            answers = await asyncio.gather(
                *(
                    call(b"x" * n, metadata=(("authorization", f"Bearer token-{who}"),))
                    for n, who in enumerate(plan)
                )
            )
    finally:
        await server.stop(None)
    assert [a.decode() for a in answers] == plan
