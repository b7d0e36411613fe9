"""The same protocol cases against rnnserve and the real Triton: the same outputs, the same codes.

Each case runs over unary ModelInfer, over ModelStreamInfer, and over HTTP (POST
/v2/models/{model}/infer, on the servers that have an HTTP port: not rnnserve on grpc.aio). For
each server, every answer must equal the model run in-process over the whole sequence (to 1e-5),
and every request the protocol refuses must be refused. Then the two servers must agree, request
by request: the same status codes (over HTTP, the HTTP status), the same outputs; except where
rnnserve differs on purpose (DELIBERATE), and except where it differs today and should not
(NOT_ALIGNED, strict xfails: once rnnserve is aligned the case passes, the xfail fails, and its
entry goes).

One sequence may also move between the ports: started over HTTP, continued over gRPC, ended
over HTTP (and the other way round), it equals the model run in-process over the whole sequence.

Without Triton (`make triton`) only the rnnserve half runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pytest

from tests.api.conftest import Reference
from tests.conformance.cases import CASES, Ids, data, sequence
from tests.conformance.conftest import (
    HTTP_SERVERS,
    RNNSERVES,
    SERVERS,
    TRANSPORTS,
    Observations,
    expect_alive,
    run,
    transports,
)
from tests.conformance.protocol import Call, Outcome

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@dataclass(frozen=True)
class Difference:
    """What each server answers, as a status ("OK" or a code) or a form, and why they differ."""

    rnnserve: str
    triton: str
    reason: str


STREAM_ERRORS = "stream errors"
RESPONSE_PARAMETERS = "response parameters"

DELIBERATE: dict[str, Difference] = {
    # Cases: the last request of the case is the one that differs.
    "state-output": Difference(
        "OK",
        "INVALID_ARGUMENT",
        "explicit state is a feature (README, Serving): rnnserve returns a sequence's state "
        "outputs (h_out, c_out) when asked; Triton hides state tensors: 'unexpected inference "
        "output'",
    ),
    "explicit-state": Difference(
        "OK",
        "INVALID_ARGUMENT",
        "explicit state is a feature: with no sequence id a client may send h_in (c_in) and ask "
        "for h_out (c_out), so any replica can serve it; Triton refuses the state output",
    ),
    # Forms, for every case.
    STREAM_ERRORS: Difference(
        "[CODE] message",
        "message",
        "an error on a stream travels in-band in error_message; rnnserve starts it with the "
        "status code ModelInfer would give (service/api/servicer.py) so a stream client can tell "
        "errors apart; Triton sends the message alone",
    ),
    RESPONSE_PARAMETERS: Difference(
        "sequence_version",
        "",
        "every answer in a sequence carries sequence_version, the count of requests its state "
        "has advanced through, for exactly-once retries (README, Scaling out)",
    ),
}

HTTP_STATUS = {"OK": "OK", "INVALID_ARGUMENT": "400"}
"""A DELIBERATE status as an HTTP answer gives it: Triton answers INVALID_ARGUMENT with 400 Bad
Request (its http_server.cc), and rnnserve's HTTP port maps its codes as Triton does
(native/src/rest_server.rs). A status missing here is a KeyError: add it from Triton's table."""


def status_over(transport: str, status: str) -> str:
    """A DELIBERATE status ("OK" or a gRPC code) as `transport` gives it."""
    return HTTP_STATUS[status] if transport == "http" else status


NOT_ALIGNED: dict[tuple[str, str], str] = {}
"""(case, transport): rnnserve differs from Triton there today, and should not."""


def not_aligned(case: str, transport: str) -> list[pytest.MarkDecorator]:
    reason = NOT_ALIGNED.get((case, transport))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def params(servers: bool) -> list[object]:
    return list(_params(servers))


def _params(servers: bool) -> Iterator[object]:
    """(server, case, transport) for each server; else (case, transport, rnnserve server), each
    compared with Triton."""
    for case in CASES:
        for transport in TRANSPORTS:
            for server in SERVERS if servers else RNNSERVES:
                if transport not in transports(server):
                    continue
                if servers:
                    yield pytest.param(server, case, transport, id=f"{server}-{transport}-{case}")
                    continue
                marks = not_aligned(case, transport)
                ident = f"{transport}-{case}-{server}"
                yield pytest.param(case, transport, server, id=ident, marks=marks)


def server_outcomes(
    request: pytest.FixtureRequest, observations: Observations, name: str, case: str, transport: str
) -> list[Outcome]:
    server = request.getfixturevalue(SERVERS[name])
    return observations.outcomes(name, server, case, transport)


def answers(name: str, case: str, index: int, call: Call, count: int) -> bool:
    """Whether the server should answer this call (rather than refuse it)."""
    deliberate = DELIBERATE.get(case)
    if deliberate is not None and index == count - 1:
        return getattr(deliberate, "triton" if name == "triton" else "rnnserve") == "OK"
    return not call.refused


def same_outputs(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str:
    """What differs, in words; empty when they match."""
    if set(got) != set(expected):
        return f"outputs {sorted(got)}, expected {sorted(expected)}"
    for name, value in expected.items():
        if got[name].dtype != value.dtype or got[name].shape != value.shape:
            return (
                f"{name} is {got[name].dtype}{list(got[name].shape)}, "
                f"expected {value.dtype}{list(value.shape)}"
            )
        if not np.allclose(got[name], value, **TOLERANCE):
            worst = float(np.max(np.abs(got[name] - value)))
            return f"{name} differs by up to {worst:.3g}"
    return ""


@pytest.mark.parametrize(("server", "case", "transport"), params(servers=True))
def test_each_server_answers_as_the_model_computes(
    server: str, case: str, transport: str, request, observations: Observations
) -> None:
    calls = observations.calls(case, transport)
    outcomes = server_outcomes(request, observations, server, case, transport)
    problems = []
    for index, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
        if answers(server, case, index, call, len(calls)):
            if not outcome.answered:
                problems.append(f"request {index} refused: {outcome.describe()}")
            elif call.expect is not None and (wrong := same_outputs(outcome.outputs, call.expect)):
                problems.append(f"request {index}: {wrong}")
        elif outcome.answered:
            problems.append(f"request {index} answered, but the protocol refuses it")
    assert not problems, f"{server} over {transport}, {case}:\n" + "\n".join(problems)


@pytest.mark.parametrize(("case", "transport", "server"), params(servers=False))
def test_servers_agree(
    case: str, transport: str, server: str, request, observations: Observations
) -> None:
    calls = observations.calls(case, transport)
    ours = server_outcomes(request, observations, server, case, transport)
    theirs = server_outcomes(request, observations, "triton", case, transport)
    problems = []
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        problem = disagreement(case, transport, index == len(calls) - 1, a, b)
        if problem:
            problems.append(f"request {index}: {problem}")
            problems.append(f"  {server}: {a.describe()}\n  triton:   {b.describe()}")
    assert not problems, f"{server} over {transport}, {case}:\n" + "\n".join(problems)


def disagreement(case: str, transport: str, last: bool, a: Outcome, b: Outcome) -> str:
    deliberate = DELIBERATE.get(case) if last else None
    if deliberate is not None:
        ours, theirs = (status_over(transport, s) for s in (deliberate.rnnserve, deliberate.triton))
        if is_status(a, ours) and is_status(b, theirs):
            return ""
        return f"not the deliberate difference ({ours} / {theirs})"
    if a.answered and b.answered:
        return same_outputs(a.outputs, b.outputs)
    if a.answered != b.answered:
        return "one answers, the other refuses"
    if transport == "stream":  # both refused: codes travel in-band, in rnnserve's form only
        if a.code is None or b.code is not None:
            return f"in-band errors are not in the forms of {STREAM_ERRORS!r}"
        return ""
    return "" if a.code == b.code else "different status codes"  # over HTTP, the status


def is_status(outcome: Outcome, status: str) -> bool:
    """`status` is "OK" or a code (over HTTP, a status such as "400"); a stream error that
    names no code matches any code."""
    if status == "OK" or outcome.answered:
        return outcome.answered and status == "OK"
    return outcome.code in (status, None)


@pytest.mark.parametrize(
    "transport",
    [pytest.param(t, marks=not_aligned(RESPONSE_PARAMETERS, t)) for t in transports("rnnserve")],
)
def test_response_parameters_agree(transport: str, request, observations: Observations) -> None:
    case = "golden-T1-int-ids"
    ours = server_outcomes(request, observations, "rnnserve", case, transport)
    theirs = server_outcomes(request, observations, "triton", case, transport)
    extra = {DELIBERATE[RESPONSE_PARAMETERS].rnnserve}
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.parameters >= extra, f"request {index}: no {extra} in {sorted(a.parameters)}"
        assert a.parameters - extra == b.parameters, (
            f"request {index}: rnnserve sends {sorted(a.parameters)}, triton {sorted(b.parameters)}"
        )


ACROSS = Ids(base=1_000 * (len(CASES) * len(TRANSPORTS) + 1), label="across-ports")
"""Ids above those of every (case, transport): the servers are the session's, shared."""


def across_ports(reference: Reference) -> list[tuple[str, Call]]:
    """Two sequences, interleaved, each request over the transport beside it: charlm_lstm
    (integer id) over HTTP, unary gRPC, HTTP; sensor_gru (string id) over a gRPC stream, HTTP,
    unary gRPC."""
    rng = np.random.default_rng(7)
    lstm = sequence(
        reference, "charlm_lstm", data("charlm_lstm", 6, rng), ACROSS.integer(), [2, 3, 1]
    )
    gru = sequence(reference, "sensor_gru", data("sensor_gru", 5, rng), ACROSS.string(), [1, 2, 2])
    order = zip(("http", "unary", "http"), lstm, ("stream", "http", "unary"), gru, strict=True)
    return [step for a, call_a, b, call_b in order for step in ((a, call_a), (b, call_b))]


@pytest.mark.parametrize("server", sorted(HTTP_SERVERS))
def test_a_sequence_moves_between_http_and_grpc(server: str, request, reference: Reference) -> None:
    running = request.getfixturevalue(SERVERS[server])
    problems = []
    expect_alive(server, running)
    for index, (transport, call) in enumerate(across_ports(reference)):
        (outcome,) = run(running, transport, [call])
        assert call.expect is not None
        if not outcome.answered:
            problems.append(f"request {index} ({transport}) refused: {outcome.describe()}")
        elif wrong := same_outputs(outcome.outputs, call.expect):
            problems.append(f"request {index} ({transport}): {wrong}")
    expect_alive(server, running)
    assert not problems, f"{server}, one sequence over both ports:\n" + "\n".join(problems)
