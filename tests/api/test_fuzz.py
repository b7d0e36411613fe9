"""The real server fuzzed over its gRPC API (hypothesis): every request, however bent, gets a
proper status, never INTERNAL or UNKNOWN, and never a transport error caused by the server's
own answer; a stream answers each request in-band and stays open; sequences whose flags
interleave at random answer what the model computes; afterwards the server still serves a
known-good sequence correctly, and its memory stopped growing during a long run.

Strategies and the seed: tests/api/fuzzing.py. The server's largest message is set low
(--max-message-bytes 2 MiB) so that fields far beyond it stay cheap to generate.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve._pb import grpc_service_pb2_grpc as pb_grpc
from rnnserve.api.status import MAX_MESSAGE_BYTES
from tests.api.conftest import MODELS, OUTPUTS, Reference
from tests.api.fuzzing import (
    at_the_limit,
    bent_bytes,
    bent_requests,
    examples,
    garbage_text,
    inputs_for,
    seeded,
    valid_request,
)
from tests.api.test_stress import rss_mb
from tests.server import RunningServer, serving

# A failing example of megabytes is shown cut: hypothesis warns that it is large.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

LIMIT = 2 * 1024 * 1024
"""The server's --max-message-bytes; the client receives up to as much."""
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,  # a sequence_version that is not the sequence's
}
"""The statuses a bent request may get: each the client's to fix, none the server's fault."""
SERVERS_OWN = ("live sequences", "--max-message-bytes")
"""What the server's own RESOURCE_EXHAUSTED messages say (a full model, an answer too large):
gRPC's own (a message or trailers over a limit) for a request under the limit would be the
server's answer failing in transport."""
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc's malloc, told its threshold, keeps it: every block over 128 KiB is mapped on its own
and given back when freed, so RSS follows what the server holds. By default the threshold
rises to the largest block freed, and freed message buffers of megabytes stay in its pools:
RSS then moved by up to 9 MiB between rounds of the same requests, with no leak."""
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[RunningServer]:
    flags = ("--max-message-bytes", str(LIMIT), "--max-queue-delay-us", "0")
    with serving(tmp_path_factory.mktemp("fuzz"), *flags, env=STEADY_MALLOC) as running:
        yield running


@pytest.fixture(scope="module")
def channel(fuzz_server: RunningServer) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_receive_message_length", LIMIT),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),  # bent requests go over LIMIT
    ]
    with grpc.insecure_channel(fuzz_server.target, options=options) as connection:
        yield connection


def unary(channel: grpc.Channel, data: bytes) -> pb.ModelInferResponse | grpc.RpcError:
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    try:
        return call(data, timeout=30)
    except grpc.RpcError as error:
        return error


def stream(channel: grpc.Channel, requests: list[bytes]) -> list[pb.ModelStreamInferResponse]:
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    return list(call(iter(requests), timeout=60))


def check_unary(channel: grpc.Channel, data: bytes) -> str:
    """Send `data` as one ModelInfer; the status's name, checked to be a proper one."""
    answer = unary(channel, data)
    if isinstance(answer, pb.ModelInferResponse):
        return "OK"
    code, details = answer.code(), answer.details() or ""
    assert code in REFUSALS, f"{code.name}: {details}"
    assert details, f"{code.name} without a message"
    # Trailers, where the message travels percent-encoded, are capped at 8 KiB by clients.
    assert len(details.encode()) <= MAX_MESSAGE_BYTES, f"{len(details.encode())} bytes of details"
    if len(data) > LIMIT:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert any(text in details for text in SERVERS_OWN), details
    return code.name


STREAM_ERROR = re.compile(r"\[([A-Z_]+)\] .")


def check_stream(channel: grpc.Channel, requests: list[bytes]) -> list[str]:
    """Send `requests` and a known-good one on one stream: each is answered in-band, the
    stream stays open to answer the last correctly and ends OK; the statuses' names."""
    good_id = f"good-{next(_ids)}"
    x = np.full((1, 2, 1), 24.0, np.float32)
    good = valid_request("sensor_gru", x, good_id, True, True, good_id)
    answers = stream(channel, [*requests, good.SerializeToString()])
    assert len(answers) == len(requests) + 1
    codes = []
    for answer in answers:
        if not answer.error_message:
            codes.append("OK")
            continue
        match = STREAM_ERROR.match(answer.error_message)
        assert match, answer.error_message[:200]
        assert grpc.StatusCode[match[1]] in REFUSALS, answer.error_message[:500]
        if match[1] == "RESOURCE_EXHAUSTED":
            assert any(text in answer.error_message for text in SERVERS_OWN), answer.error_message
        codes.append(match[1])
    last = [a for a in answers if a.infer_response.id == good_id]
    assert len(last) == 1 and not last[0].error_message, last
    assert list(last[0].infer_response.outputs[0].shape) == [1, 2, 1]
    return codes


@seeded
@settings(max_examples=examples(300))
@given(st.one_of(bent_requests(longest=3_000_000), at_the_limit(LIMIT)))
def test_bent_requests_get_a_proper_status(channel, message: pb.ModelInferRequest) -> None:
    check_unary(channel, message.SerializeToString())


@seeded
@settings(max_examples=examples(100))
@given(
    st.lists(
        st.one_of(bent_requests(longest=LIMIT - 4096), at_the_limit(LIMIT)), min_size=1, max_size=6
    )
)
def test_bent_requests_on_a_stream_are_answered_in_band(
    channel, messages: list[pb.ModelInferRequest]
) -> None:
    requests = [m.SerializeToString() for m in messages]
    # A message over the limit ends a stream in gRPC itself, before the server sees it (README).
    check_stream(channel, [r for r in requests if len(r) <= LIMIT])


@seeded
@settings(max_examples=examples(300))
@given(st.lists(bent_bytes(), min_size=1, max_size=4))
def test_bytes_that_are_not_requests_get_a_proper_status(channel, blobs: list[bytes]) -> None:
    for data in blobs:
        check_unary(channel, data)
    check_stream(channel, blobs)


CALLS = {
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "RepositoryModelLoad": lambda name, version: pb.RepositoryModelLoadRequest(model_name=name),
    "RepositoryModelUnload": lambda name, version: pb.RepositoryModelUnloadRequest(model_name=name),
}


@seeded
@settings(max_examples=examples(150))
@given(
    st.sampled_from(sorted(CALLS)),
    st.one_of(st.sampled_from(MODELS), garbage_text(400_000)),
    garbage_text(400_000),
)
def test_other_calls_with_bent_names_get_a_proper_status(
    channel, method: str, name: str, version: str
) -> None:
    # Unloading a bundled model would take it from the other tests.
    assume(method != "RepositoryModelUnload" or name not in MODELS)
    try:
        getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(
            CALLS[method](name=name, version=version), timeout=30
        )
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code().name}: {error.details()}"
        assert 0 < len(error.details().encode()) <= MAX_MESSAGE_BYTES


Step = tuple[int, bool, bool, str, np.ndarray]


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[str, list[Step]]:
    """A model and steps of three sequences in random order: (which sequence, start, end,
    sequence_version sent: none, the sequence's own or another, data)."""
    model = draw(st.sampled_from(MODELS))
    step = st.tuples(
        st.integers(0, 2),
        st.booleans(),
        st.booleans(),
        st.sampled_from(["none", "none", "right", "wrong"]),
        st.integers(1, 3).flatmap(lambda steps: inputs_for(model, steps)),
    )
    return model, draw(st.lists(step, min_size=1, max_size=12))


Expected = dict[str, "str | tuple[np.ndarray, int]"]
"""By request id: a status's name, "ANY" (a proper refusal or an answer), or the outputs and
sequence version of the answer."""


def expectations(
    model: str, steps: list[Step], run: int, ids: list, reference: Reference
) -> tuple[list[bytes], Expected]:
    """The requests of `steps` and what each must get, from a model of the sequences."""
    requests, expected = [], {}
    live: dict[int, tuple[np.ndarray, int]] = {}  # data since the start, version
    # Sequences whose refused END may or may not have run when their next steps came: those
    # steps find the sequence ended, or live again (an END not applied leaves it live).
    doubt: set[int] = set()
    for index, (which, start, end, expect, x) in enumerate(steps):
        rid = f"{run}/{index}"
        message = valid_request(model, x, ids[which], start, end, rid)
        version = live[which][1] if which in live and not start else 0
        if expect != "none":
            sent = version if expect == "right" else version + 1
            message.parameters["sequence_version"].int64_param = sent
        requests.append(message.SerializeToString())
        if start:
            doubt.discard(which)
        elif which in doubt:
            expected[rid] = "ANY"  # a proper status, or answered: its state is unknown
        elif which not in live:
            expected[rid] = "INVALID_ARGUMENT"  # never started, or ended
        elif expect == "wrong":
            expected[rid] = "ABORTED"
            if end:  # not applied, so the sequence lives on, once the END has been refused
                doubt.add(which)
                del live[which]
        if rid in expected:
            continue
        before = np.empty_like(x[:, :0]) if start else live[which][0]
        whole = np.concatenate([before, x], axis=1)
        live[which] = whole, version + 1
        expected[rid] = (reference.run(model, whole)[:, before.shape[1] :], version + 1)
        if end:
            del live[which]
    return requests, expected


@seeded
@settings(max_examples=examples(60))
@given(interleavings(), st.booleans())
def test_interleaved_flags_answer_what_the_model_computes(
    channel, reference: Reference, plan: tuple[str, list[Step]], string_ids: bool
) -> None:
    """A continuation of a sequence that is not live is refused (INVALID_ARGUMENT), one that
    expects another sequence_version too (ABORTED, not applied: an END in it leaves the
    sequence live); every answered step equals the model run in-process over its
    sequence since its latest start, and says the sequence's version."""
    model, steps = plan
    run = next(_ids)
    ids = [f"fuzz-{run}-{n}-é" if string_ids else 10**12 + 10 * run + n for n in range(3)]
    requests, expected = expectations(model, steps, run, ids, reference)
    answers = {a.infer_response.id: a for a in stream(channel, requests)}
    assert answers.keys() == expected.keys()
    for rid, want in expected.items():
        answer = answers[rid]
        if want == "ANY":
            prefixes = ("[INVALID_ARGUMENT]", "[ABORTED]")
            assert not answer.error_message or answer.error_message.startswith(prefixes), rid
            continue
        if isinstance(want, str):
            assert answer.error_message.startswith(f"[{want}]"), (rid, answer.error_message)
            continue
        assert not answer.error_message, (rid, answer.error_message)
        output = answer.infer_response
        assert output.parameters["sequence_version"].int64_param == want[1], rid
        assert output.outputs[0].name == OUTPUTS[model]
        got = np.frombuffer(output.raw_output_contents[0], np.float32).reshape(want[0].shape)
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)


class RssSampler:
    """The server's resident memory (MiB), sampled every `period_s` in a thread."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.samples: list[float] = []
        self._pid, self._period_s = pid, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.samples.append(rss_mb(self._pid))


LONG_RUN_S = 40.0
LONG_RUN_EXAMPLES = 2500
RSS_GROWTH_BOUND_MB = 4.0
"""How much the server's median RSS over the run's last third may exceed that over its middle
third, the two medians about 1,300 requests apart.

What a bent request may leave behind is bounded by design: decoded request shapes (4,096 of at
most 4 KiB), checked input shapes and answer sizes (per model), live sequences (ids of at most
1,024 characters, up to 1,024 a model), and these fill early. A leak of 3 KiB a request would
add about 4 MiB between the two medians. Measured over five seeds, with STEADY_MALLOC and
values under 70,000 characters, the medians moved by 0.1 to 1.4 MiB. (Before refused calls
stopped leaving reference cycles, and with glibc's sliding threshold, they moved by up to
11 MiB with no leak.) Values up to and beyond the limit are the other tests': one checks
that 1.5 MB values are not kept."""


def test_memory_stays_bounded_over_a_long_fuzz(channel, fuzz_server, record_property) -> None:
    counts: dict[str, int] = {}
    began = time.monotonic()

    @seeded
    @settings(max_examples=LONG_RUN_EXAMPLES)
    @given(
        st.one_of(
            bent_requests(longest=70_000).map(lambda m: ("unary", [m.SerializeToString()])),
            st.lists(bent_requests(longest=70_000), min_size=1, max_size=4).map(
                lambda ms: ("stream", [m.SerializeToString() for m in ms])
            ),
            bent_bytes().map(lambda b: ("unary", [b])),
        )
    )
    def fuzz(case: tuple[str, list[bytes]]) -> None:
        if time.monotonic() - began > LONG_RUN_S:
            return  # the run's time is up: the rest of the examples pass through
        how, requests = case
        if how == "unary":
            codes = [check_unary(channel, requests[0])]
        else:
            codes = check_stream(channel, [r for r in requests if len(r) <= LIMIT])
        for code in codes:
            counts[code] = counts.get(code, 0) + 1

    with RssSampler(fuzz_server.pid) as rss:
        fuzz()
    elapsed = time.monotonic() - began
    samples = rss.samples
    third = len(samples) // 3
    assert third >= 10, f"only {len(samples)} RSS samples in {elapsed:.0f} s"
    middle, last = samples[third : 2 * third], samples[2 * third :]
    growth = statistics.median(last) - statistics.median(middle)
    peak_growth = max(last) - max(samples[: 2 * third])
    record_property(
        "figures",
        {
            "requests by status": counts,
            "seconds": round(elapsed, 1),
            "RSS MiB first/peak/last": [
                round(samples[0], 1),
                round(max(samples), 1),
                round(samples[-1], 1),
            ],
            "RSS growth in the last third MiB (median, peak)": [
                round(growth, 1),
                round(peak_growth, 1),
            ],
        },
    )
    assert sum(counts.values()) >= 1000, counts
    assert growth < RSS_GROWTH_BOUND_MB, (growth, [round(s) for s in samples])


HTTP_RUN_S = 12.0
HTTP_STATUSES = frozenset({200, 400, 404, 405, 409, 413, 415, 429, 503})
"""What a bent HTTP request may be answered: never 500 (the server's fault), never no answer."""

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=40,
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A POST .../infer bent every way JSON allows: near-valid v2 requests with wrong names,
    datatypes, shapes, data, sequence parameters and binary sizes, any JSON, or any bytes."""
    model = draw(st.sampled_from([*MODELS, "no_such_model"]))
    kind = draw(st.sampled_from(["request", "json", "bytes"]))
    headers: dict[str, str] = {}
    if kind == "bytes":
        return model, draw(st.binary(max_size=4096)), headers
    if kind == "json":
        return model, json.dumps(draw(JSON)).encode(), headers
    tensor = {
        "name": draw(st.sampled_from(["tokens", "reading", "pixels", "h_in", "x"])),
        "datatype": draw(st.sampled_from(["INT64", "FP32", "FP16", "BOOL", "BYTES", "UINT8", "?"])),
        "shape": draw(st.lists(st.integers(-2, 70_000), max_size=4)),
    }
    binary = b""
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(st.integers(-300, 300) | st.floats(-1e3, 1e3), max_size=64))
    else:
        binary = draw(st.binary(max_size=512))
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-1, 600))}
    parameters = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "sequence_id": st.integers(-5, 2**63 - 1) | st.text(max_size=20),
                "sequence_start": st.booleans() | st.integers(0, 2),
                "sequence_end": st.booleans() | st.text(max_size=3),
                "sequence_version": st.integers(-2, 5),
                "binary_data_output": st.booleans() | st.integers(),
            },
        )
    )
    header = json.dumps({"inputs": [tensor], "parameters": parameters}).encode()
    if binary or draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = str(len(header) + draw(st.integers(-3, 3)))
    return model, header + binary, headers


def test_bent_http_requests_get_a_proper_status_and_memory_stays_flat(
    fuzz_server, record_property
) -> None:
    host, port = fuzz_server.http_target.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    counts: dict[int, int] = {}
    began = time.monotonic()

    @seeded
    @settings(max_examples=LONG_RUN_EXAMPLES)
    @given(http_requests())
    def fuzz(case: tuple[str, bytes, dict[str, str]]) -> None:
        if time.monotonic() - began > HTTP_RUN_S:
            return
        model, body, headers = case
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        assert response.status in HTTP_STATUSES, (response.status, answer[:300], body[:300])
        if response.status != 200:
            assert set(json.loads(answer)) == {"error"}, answer[:300]
        counts[response.status] = counts.get(response.status, 0) + 1

    try:
        with RssSampler(fuzz_server.pid) as rss:
            fuzz()
    finally:
        connection.close()
    samples = rss.samples
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    growth = statistics.median(last) - statistics.median(middle)
    record_property("figures", {"HTTP answers by status": counts, "RSS growth MiB": growth})
    assert sum(counts.values()) >= 300, counts
    assert growth < RSS_GROWTH_BOUND_MB, (growth, [round(s) for s in samples])


def test_long_distinct_values_are_not_kept(channel, fuzz_server, record_property) -> None:
    """Requests that each carry a distinct 1.5 MB value, in a field that a cache or a live
    sequence could keep: nothing of them stays (each used to: decoded shapes were remembered
    whole, and a string sequence id could be as long as a message)."""

    def carrying(field: str, value: str) -> bytes:
        x = np.full((1, 1, 1), 24.0, np.float32)
        message = valid_request("sensor_gru", x, None, False, False, "")
        if field == "model_name":
            message.model_name = value
        elif field == "parameter":
            message.parameters[value].bool_param = True
        elif field == "output":
            message.outputs.add(name=value)
        else:
            message.parameters["sequence_id"].string_param = value
            message.parameters["sequence_start"].bool_param = True
        return message.SerializeToString()

    def send(rounds: range) -> None:
        for index in rounds:
            for field in ("model_name", "parameter", "output", "sequence_id"):
                check_unary(channel, carrying(field, f"{index}-" + "v" * 1_500_000))

    # Kept, the second round's values would add 240 MB; measured, RSS moved by 1 MB or less.
    send(range(40))
    before = rss_mb(fuzz_server.pid)
    send(range(40, 80))
    after = rss_mb(fuzz_server.pid)
    record_property("figures", {"RSS MiB before/after the second round": [before, after]})
    assert after - before < 24, (before, after)


def test_still_serving_correct_sequences_after_the_fuzz(channel, reference: Reference) -> None:
    rng = np.random.default_rng(13)
    for model in MODELS:
        x = {
            "charlm_lstm": rng.integers(0, 97, size=(1, 6), dtype=np.int64),
            "sensor_gru": (24 + rng.standard_normal((1, 6, 1))).astype(np.float32),
            "digits_lstm": rng.integers(0, 17, size=(1, 6, 8)).astype(np.float32),
        }[model]
        sequence_id = f"after-fuzz-{model}"
        outputs = []
        for begin, end in ((0, 1), (1, 3), (3, 6)):
            message = valid_request(model, x[:, begin:end], sequence_id, begin == 0, end == 6, "")
            answer = unary(channel, message.SerializeToString())
            assert isinstance(answer, pb.ModelInferResponse), answer
            assert answer.outputs[0].name == OUTPUTS[model]
            raw = answer.raw_output_contents[0]
            outputs.append(np.frombuffer(raw, np.float32).reshape(1, end - begin, -1))
        np.testing.assert_allclose(
            np.concatenate(outputs, axis=1).reshape(reference.run(model, x).shape),
            reference.run(model, x),
            rtol=1e-5,
            atol=1e-5,
        )
