"""Issue 12: an answer that cannot fit one gRPC message is found out before the step runs.

With `--max-message-bytes 1048576`, a T=4096 request to charlm_lstm (4096 x 97 float32 logits,
1.6 MB) is refused in its own response, its sequence unchanged; a stream it shares with another
sequence stays open and that sequence's answers all arrive; and the server says at start which
models' largest answers cannot fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.api.conftest import Reference, Stream, infer_input
from tests.server import RunningServer, serving

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    with serving(tmp_path_factory.mktemp("answer-size"), "--max-message-bytes", str(LIMIT)) as s:
        yield s


def tokens(rng: np.random.Generator, steps: int) -> np.ndarray:
    return rng.integers(0, 97, size=(1, steps), dtype=np.int64)


def test_the_server_says_at_start_which_answers_cannot_fit(server) -> None:
    log = server.log_text()
    assert "model charlm_lstm version 1: a request of 4096 time steps" in log
    assert f"over --max-message-bytes {LIMIT}" in log


def test_a_too_large_answer_is_refused_alone_and_the_stream_lives(
    client, reference: Reference
) -> None:
    rng = np.random.default_rng(4)
    small = [tokens(rng, 1) for _ in range(4)]
    first, huge = tokens(rng, 2), tokens(rng, 4096)
    stream = Stream(client)
    try:
        send = stream.client.async_stream_infer
        send(
            "charlm_lstm",
            [infer_input("charlm_lstm", first)],
            request_id="big-0",
            sequence_id="big",
            sequence_start=True,
        )
        for t, x in enumerate(small):
            send(
                "charlm_lstm",
                [infer_input("charlm_lstm", x)],
                request_id=f"other-{t}",
                sequence_id="other",
                sequence_start=t == 0,
            )
            if t == 1:
                send(
                    "charlm_lstm",
                    [infer_input("charlm_lstm", huge)],
                    request_id="big-1",
                    sequence_id="big",
                )
        answers = stream.collect(6)
    finally:
        stream.close()
    refused = [error for result, error in answers.values() if error is not None]
    assert len(refused) == 1
    message = str(refused[0])
    assert "RESOURCE_EXHAUSTED" in message
    assert "over the server's largest message of 1,048,576 bytes" in message
    # The advice holds: that many time steps are answered through the same transport.
    fits = int(re.search(r"send at most (\d+) time steps", message).group(1))
    assert 2000 < fits < 4096
    answered = client.infer(
        "charlm_lstm", [infer_input("charlm_lstm", tokens(rng, fits))], sequence_id="fits",
        sequence_start=True, sequence_end=True,
    )  # fmt: skip
    assert answered.as_numpy("logits").shape == (1, fits, 97)
    expected = reference.run("charlm_lstm", np.concatenate(small, axis=1))
    for t in range(len(small)):
        result, error = answers[f"other-{t}"]
        assert error is None
        np.testing.assert_allclose(result.as_numpy("logits")[0, -1], expected[0, t], atol=1e-5)
    # "big" is as its first request left it: it goes on from there.
    step = tokens(rng, 1)
    after = client.infer(
        "charlm_lstm", [infer_input("charlm_lstm", step)], sequence_id="big", sequence_end=True
    )
    assert after.get_response().parameters["sequence_version"].int64_param == 2
    whole = reference.run("charlm_lstm", np.concatenate([first, step], axis=1))
    np.testing.assert_allclose(after.as_numpy("logits")[0, -1], whole[0, -1], atol=1e-5)


def test_a_unary_answer_that_cannot_fit_is_refused_before_it_runs(client) -> None:
    x = np.zeros((1, 4096), np.int64)
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer(
            "charlm_lstm", [infer_input("charlm_lstm", x)], sequence_id=7, sequence_start=True
        )
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "would take" in caught.value.message()
    # Its sequence never started.
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer("charlm_lstm", [infer_input("charlm_lstm", x[:, :1])], sequence_id=7)
    assert "is not live" in caught.value.message()
