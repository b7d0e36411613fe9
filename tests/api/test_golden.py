"""Many interleaved sequences through the real server equal the model run over whole sequences."""

from __future__ import annotations

import concurrent.futures
import zlib

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.api.conftest import MODELS, OUTPUTS, Reference, Stream, infer_input, sequence_data


def plan_requests(model: str, count: int, rng: np.random.Generator):
    """Sequences of random lengths cut into requests of 1-4 steps, interleaved at random."""
    sequences = {}
    for index in range(count):
        steps = int(rng.integers(1, 30))
        x = sequence_data(model, steps, rng)
        cuts = [0]
        while cuts[-1] < steps:
            cuts.append(min(steps, cuts[-1] + int(rng.integers(1, 5))))
        sequences[1000 + index] = (x, list(zip(cuts[:-1], cuts[1:], strict=True)))
    order = [sid for sid, (_, parts) in sequences.items() for _ in parts]
    rng.shuffle(order)
    return sequences, order


@pytest.mark.parametrize("model", MODELS)
def test_interleaved_sequences_over_a_stream(model, client, reference: Reference) -> None:
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    sequences, order = plan_requests(model, 24, rng)
    progress = {sid: 0 for sid in sequences}
    expected = {}
    stream = Stream(client)
    try:
        for sid in order:
            x, parts = sequences[sid]
            part = progress[sid]
            start, end = parts[part]
            progress[sid] += 1
            request_id = f"{sid}/{part}"
            stream.client.async_stream_infer(
                model,
                [infer_input(model, x[:, start:end])],
                request_id=request_id,
                sequence_id=sid,
                sequence_start=part == 0,
                sequence_end=part == len(parts) - 1,
            )
            expected[request_id] = (sid, start, end)
        results = stream.collect(len(order))
    finally:
        stream.close()
    whole = {sid: reference.run(model, x) for sid, (x, _) in sequences.items()}
    for request_id, (sid, start, end) in expected.items():
        result, error = results[request_id]
        assert error is None, error
        np.testing.assert_allclose(
            result.as_numpy(OUTPUTS[model]), whole[sid][:, start:end], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_unary_sequences_are_batched_without_changing_results(
    model, server, reference: Reference
) -> None:
    rng = np.random.default_rng(7)
    sequences = {2000 + i: sequence_data(model, 12, rng) for i in range(16)}

    def run(sid: int) -> np.ndarray:
        x = sequences[sid]
        with triton.InferenceServerClient(server.target) as connection:
            outputs = []
            for t in range(x.shape[1]):
                result = connection.infer(
                    model,
                    [infer_input(model, x[:, t : t + 1])],
                    sequence_id=sid,
                    sequence_start=t == 0,
                    sequence_end=t == x.shape[1] - 1,
                )
                outputs.append(result.as_numpy(OUTPUTS[model]))
            return np.concatenate(outputs, axis=1)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = dict(zip(sequences, pool.map(run, sequences), strict=True))
    for sid, x in sequences.items():
        np.testing.assert_allclose(got[sid], reference.run(model, x), rtol=1e-5, atol=1e-5)
    # Batches really formed: more rows were run than model calls were made.
    scrape = server.scrape()
    count = _sample(scrape, "rnnserve_batch_size_count", model)
    total = _sample(scrape, "rnnserve_batch_size_sum", model)
    assert total > count, f"no batch ever held more than one sequence ({total} rows, {count} calls)"


def _sample(scrape: str, name: str, model: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in the scrape")


def test_string_sequence_ids_and_multi_step_requests(client, reference: Reference) -> None:
    rng = np.random.default_rng(3)
    x = sequence_data("charlm_lstm", 20, rng)
    outputs = []
    for start in range(0, 20, 5):
        result = client.infer(
            "charlm_lstm",
            [infer_input("charlm_lstm", x[:, start : start + 5])],
            sequence_id="session-Ä-1",
            sequence_start=start == 0,
            sequence_end=start == 15,
        )
        outputs.append(result.as_numpy("logits"))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), reference.run("charlm_lstm", x), rtol=1e-5, atol=1e-5
    )


def test_start_on_a_live_sequence_restarts_it(client, reference: Reference) -> None:
    rng = np.random.default_rng(4)
    first, second = sequence_data("sensor_gru", 6, rng), sequence_data("sensor_gru", 4, rng)
    client.infer(
        "sensor_gru", [infer_input("sensor_gru", first)], sequence_id=77, sequence_start=True
    )
    again = client.infer(
        "sensor_gru",
        [infer_input("sensor_gru", second)],
        sequence_id=77,
        sequence_start=True,
        sequence_end=True,
    )
    np.testing.assert_allclose(
        again.as_numpy("forecast"), reference.run("sensor_gru", second), rtol=1e-5, atol=1e-5
    )


def test_explicit_state_mode(client, reference: Reference) -> None:
    """A client may hold the state itself: no sequence id, states in and out."""
    rng = np.random.default_rng(5)
    x = np.concatenate([sequence_data("charlm_lstm", 9, rng) for _ in range(3)])
    h = np.zeros((3, 2, 256), np.float32)
    c = np.zeros((3, 2, 256), np.float32)
    logits = []
    for start in (0, 4):
        end = 9 if start else 4
        inputs = [infer_input("charlm_lstm", x[:, start:end])]
        for name, value in (("h_in", h), ("c_in", c)):
            tensor = triton.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        wanted = [triton.InferRequestedOutput(n) for n in ("logits", "h_out", "c_out")]
        result = client.infer("charlm_lstm", inputs, outputs=wanted)
        logits.append(result.as_numpy("logits"))
        h, c = result.as_numpy("h_out"), result.as_numpy("c_out")
    np.testing.assert_allclose(
        np.concatenate(logits, axis=1), reference.run("charlm_lstm", x), rtol=1e-5, atol=1e-5
    )


def test_bundled_client_streams_characters(server, reference: Reference) -> None:
    from rnnserve.client import SequenceClient

    with SequenceClient(server.target, "charlm_lstm") as lm:
        text = lm.generate("def main(", 30)
        ids = lm.encode("def main(" + text)
    # Greedy decoding reproduces what the model run in-process picks at every position.
    logits = reference.run("charlm_lstm", ids[None, :-1])[0]
    assert "".join(lm.vocabulary[i] for i in logits.argmax(-1)[8:]) == text


def test_generate_command(server, cli) -> None:
    done = cli("generate", "class ", "--url", server.target, "--length", "20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("class ") and len(done.stdout[:-1]) == 26
