"""Sequence ownership and admin calls on the real server, through tritonclient.

A sequence belongs to the principal that started it (a bearer token's, or a client
certificate's under mutual TLS): another principal naming the same id gets the answer an id
never started gets, and never reads or moves its state. With Redis the owner is part of the
record's key, so a second replica adopts a sequence for its owner only. Loading and
unloading models needs a principal of --auth-admins.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve.sessions.store import StateKey
from tests.api.conftest import OUTPUTS, Reference, bearer, infer_input, sequence_data
from tests.api.fuzzing import examples, inputs_for, seeded, valid_request
from tests.certs import Authority
from tests.server import RunningServer, serving

MODEL = "sensor_gru"


@pytest.fixture(scope="module")
def server(token_file: Path, tmp_path_factory, serving_transport: str) -> Iterator[RunningServer]:
    flags = ("--auth-tokens", str(token_file), "--auth-admins", "root")
    with serving(tmp_path_factory.mktemp("owned"), *flags, transport=serving_transport) as running:
        yield running


def step(
    client: triton.InferenceServerClient,
    principal: str,
    sequence_id: int | str,
    x: np.ndarray,
    start: bool = False,
    end: bool = False,
    headers: dict[str, str] | None = None,
) -> np.ndarray:
    result = client.infer(
        MODEL,
        [infer_input(MODEL, x)],
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
        headers=headers if headers is not None else bearer(principal),
    )
    return result.as_numpy(OUTPUTS[MODEL])


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


@pytest.mark.parametrize("sequence_id", [4242, "chat-4242"])
def test_another_principal_cannot_reach_a_sequence_by_its_id(
    server, reference: Reference, sequence_id
) -> None:
    x = sequence_data(MODEL, 6, np.random.default_rng(5))
    y = sequence_data(MODEL, 2, np.random.default_rng(6))
    never = 9191 if isinstance(sequence_id, int) else "chat-9191"
    with triton.InferenceServerClient(server.target) as client:
        first = step(client, "alice", sequence_id, x[:, :3], start=True)
        # bob continues alice's id: the answer an id never started gets, to the letter.
        taken = refusal(lambda: step(client, "bob", sequence_id, y[:, :1]))
        unknown = refusal(lambda: step(client, "bob", never, y[:, :1]))
        assert taken.status() == unknown.status() == "StatusCode.INVALID_ARGUMENT"
        assert taken.message() == unknown.message().replace(repr(never), repr(sequence_id))
        # bob starts and ends his own sequence of the same id: from the zero state...
        np.testing.assert_allclose(
            step(client, "bob", sequence_id, y, start=True, end=True),
            reference.run(MODEL, y),
            rtol=1e-5,
            atol=1e-5,
        )
        # ...and alice's went on untouched, as if bob had never been there.
        rest = step(client, "alice", sequence_id, x[:, 3:], end=True)
    np.testing.assert_allclose(
        np.concatenate([first, rest], axis=1), reference.run(MODEL, x), rtol=1e-5, atol=1e-5
    )


def test_an_end_from_another_principal_ends_nothing_of_the_owner(server, reference) -> None:
    x = sequence_data(MODEL, 4, np.random.default_rng(7))
    with triton.InferenceServerClient(server.target) as client:
        first = step(client, "alice", 77, x[:, :2], start=True)
        refused = refusal(lambda: step(client, "bob", 77, x[:, :1], end=True))
        assert refused.status() == "StatusCode.INVALID_ARGUMENT"
        rest = step(client, "alice", 77, x[:, 2:], end=True)
    np.testing.assert_allclose(
        np.concatenate([first, rest], axis=1), reference.run(MODEL, x), rtol=1e-5, atol=1e-5
    )


def test_loading_and_unloading_needs_an_admin(server) -> None:
    with triton.InferenceServerClient(server.target) as client:
        for call in (
            lambda: client.load_model(MODEL, headers=bearer("alice")),
            lambda: client.unload_model(MODEL, headers=bearer("alice")),
        ):
            refused = refusal(call)
            assert refused.status() == "StatusCode.PERMISSION_DENIED"
            assert "--auth-admins" in refused.message() and "'alice'" in refused.message()
        assert client.is_model_ready(MODEL, headers=bearer("alice"))  # the unload did nothing
        client.load_model(MODEL, headers=bearer("root"))  # a reload, by an admin
        assert client.is_model_ready(MODEL, headers=bearer("root"))


Step = tuple[str, int, bool, bool, np.ndarray]
_runs = itertools.count(1)


@st.composite
def interleavings(draw: st.DrawFn) -> list[Step]:
    """Steps of two principals on the same two ids, in random order: (principal, which id,
    start, end, data)."""
    step = st.tuples(
        st.sampled_from(["alice", "bob"]),
        st.integers(0, 1),
        st.booleans(),
        st.booleans(),
        st.integers(1, 3).flatmap(lambda steps: inputs_for(MODEL, steps)),
    )
    return draw(st.lists(step, min_size=1, max_size=10))


@seeded
@settings(max_examples=examples(40), deadline=None)
@given(interleavings())
def test_principals_sharing_ids_at_random_each_see_their_own_sequences(
    server, reference: Reference, steps: list[Step]
) -> None:
    """Every step is answered as if the other principal did not exist: each (principal, id)
    is its own sequence, started, continued and ended by its owner alone."""
    run = next(_runs)
    ids = [5 * 10**12 + 10 * run + n for n in range(2)]
    live: dict[tuple[str, int], np.ndarray] = {}  # data since the start
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for principal, which, start, end, x in steps:
            message = valid_request(MODEL, x, ids[which], start, end, "")
            owned = (principal, which)
            try:
                answer = infer(message, metadata=tuple(bearer(principal).items()), timeout=30)
            except grpc.RpcError as error:
                assert not start and owned not in live, error.details()
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                continue
            assert start or owned in live, "a continuation of a sequence that is not its own"
            before = np.empty_like(x[:, :0]) if start else live[owned]
            whole = np.concatenate([before, x], axis=1)
            live[owned] = whole
            got = np.frombuffer(answer.raw_output_contents[0], np.float32)
            want = reference.run(MODEL, whole)[:, before.shape[1] :]
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
            if end:
                del live[owned]
        for principal, which in live:  # end what is left, so the next example starts clean
            message = valid_request(MODEL, x[:, :1], ids[which], False, True, "")
            infer(message, metadata=tuple(bearer(principal).items()), timeout=30)


# ---------------------------------------------------------------------- mutual TLS principals
@pytest.fixture(scope="module")
def mtls(
    token_file: Path, tmp_path_factory, serving_transport: str
) -> Iterator[tuple[RunningServer, Authority, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority("rnnserve-ca", folder)
    server_cert = ca.issue("rnnserve")
    flags = (
        "--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key),
        "--tls-client-ca", str(ca.path), "--auth-tokens", str(token_file),
        "--auth-admins", "root",
    )  # fmt: skip
    with serving(tmp_path_factory.mktemp("mtls"), *flags, transport=serving_transport) as running:
        yield running, ca, folder


def tls_client(server: RunningServer, ca: Authority, who: str) -> triton.InferenceServerClient:
    issued = ca.issue(who, client=True)
    return triton.InferenceServerClient(
        server.target,
        ssl=True,
        root_certificates=str(ca.path),
        private_key=str(issued.key),
        certificate_chain=str(issued.cert),
    )


def test_client_certificates_name_principals_that_own_sequences(mtls, reference) -> None:
    server, ca, _ = mtls
    x = sequence_data(MODEL, 4, np.random.default_rng(8))
    no_token: dict[str, str] = {}
    with tls_client(server, ca, "carol") as carol, tls_client(server, ca, "dave") as dave:
        first = step(carol, "", 5, x[:, :2], start=True, headers=no_token)
        refused = refusal(lambda: step(dave, "", 5, x[:, :1], headers=no_token))
        assert refused.status() == "StatusCode.INVALID_ARGUMENT"
        assert "not live" in refused.message()
        # A token names its own principal on any connection: dave's connection with alice's
        # token is alice, who does not own carol's sequence either...
        refused = refusal(lambda: step(dave, "alice", 5, x[:, :1]))
        assert refused.status() == "StatusCode.INVALID_ARGUMENT"
        # ...and a token the file does not know is refused, certificate or not.
        refused = refusal(lambda: step(carol, "", 5, x[:, :1], headers={"authorization": "x"}))
        assert refused.status() == "StatusCode.UNAUTHENTICATED"
        rest = step(carol, "", 5, x[:, 2:], end=True, headers=no_token)
        refused = refusal(lambda: carol.load_model(MODEL))
        assert refused.status() == "StatusCode.PERMISSION_DENIED"
    np.testing.assert_allclose(
        np.concatenate([first, rest], axis=1), reference.run(MODEL, x), rtol=1e-5, atol=1e-5
    )
    with tls_client(server, ca, "root") as root:  # an admin by certificate
        root.load_model(MODEL)
    assert " auth=tokens+certificates " in server.log_text()  # the operator sees how


# ---------------------------------------------------------------------- Redis: owner in the key
@pytest.fixture(scope="module")
def replicas(redis_server, token_file: Path, tmp_path_factory, serving_transport: str):
    flags = ("--auth-tokens", str(token_file), "--state-store", redis_server.url)
    with (
        serving(tmp_path_factory.mktemp("a"), *flags, transport=serving_transport) as a,
        serving(tmp_path_factory.mktemp("b"), *flags, transport=serving_transport) as b,
    ):
        yield a, b


def test_with_redis_the_owner_is_in_the_key_and_only_the_owner_adopts(
    replicas, redis_server, reference
) -> None:
    a, b = replicas
    x = sequence_data(MODEL, 6, np.random.default_rng(9))
    key = str(StateKey(MODEL, 1, 31337, "alice"))
    assert key == f"rnnserve:{MODEL}:1:alice:i31337"
    with (
        triton.InferenceServerClient(a.target) as on_a,
        triton.InferenceServerClient(b.target) as on_b,
    ):
        first = step(on_a, "alice", 31337, x[:, :2], start=True)
        with redis_server.client() as store:
            assert store.exists(key)
            assert not store.keys(f"rnnserve:{MODEL}:1:-:i31337")
        # bob on replica b: nothing of alice's is read, taken or moved.
        refused = refusal(lambda: step(on_b, "bob", 31337, x[:, :1]))
        assert refused.status() == "StatusCode.INVALID_ARGUMENT", refused.message()
        with redis_server.client() as store:
            assert store.exists(key)
        # alice on replica b adopts her sequence from the store and goes on.
        middle = step(on_b, "alice", 31337, x[:, 2:4])
        rest = step(on_a, "alice", 31337, x[:, 4:], end=True)
    np.testing.assert_allclose(
        np.concatenate([first, middle, rest], axis=1),
        reference.run(MODEL, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_an_owner_with_a_colon_cannot_shift_the_key_fields() -> None:
    # SPIFFE ids hold colons; unescaped, "x:sy" + "z" would be the key of "x" + "y:sz".
    assert str(StateKey("m", 1, "z", "x:sy")) != str(StateKey("m", 1, "y:sz", "x"))
    assert str(StateKey("m", 1, 5, "spiffe://a/b")) == "rnnserve:m:1:spiffe%3A%2F%2Fa%2Fb:i5"
    assert str(StateKey("m", 1, 5, "-")) != str(StateKey("m", 1, 5, ""))
