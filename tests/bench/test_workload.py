"""The benchmark's pre-encoded messages say what they are meant to say."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rnnserve._pb import grpc_service_pb2 as pb
from rnnserve_bench.loadgen import OPEN_INFERENCE
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import histogram_totals, process_cpu_seconds, start_echo, start_rnnserve
from rnnserve_bench.workload import STREAM_OK_TAG, load_workload
from tests.conftest import BUNDLED


@pytest.fixture(scope="module")
def workload():
    return load_workload(BUNDLED, "charlm_lstm")


@pytest.mark.parametrize("steps", [1, 32])
def test_pre_encoded_requests_decode_to_the_intended_request(workload, steps) -> None:
    messages = workload.messages(1_000_007, steps)
    for raw, start, end in [
        (messages.start, True, False),
        (messages.step, False, False),
        (messages.end, False, True),
    ]:
        request = pb.ModelInferRequest.FromString(raw)
        assert request.model_name == "charlm_lstm"
        (tensor,) = request.inputs
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("tokens", "INT64", [1, steps])
        tokens = np.frombuffer(request.raw_input_contents[0], np.int64)
        assert tokens.shape == (steps,) and not tokens.any()
        params = request.parameters
        assert params["sequence_id"].WhichOneof("parameter_choice") == "int64_param"
        assert params["sequence_id"].int64_param == 1_000_007
        assert params["sequence_start"].bool_param is start
        assert params["sequence_end"].bool_param is end
        assert not request.outputs  # the server answers with every output but the states


@pytest.mark.parametrize("steps", [1, 32])
def test_transport_responses_have_the_logits_shape(workload, steps) -> None:
    raw = workload.stream_response(steps)
    assert raw[0] == STREAM_OK_TAG and OPEN_INFERENCE.error(raw) is None
    reply = pb.ModelStreamInferResponse.FromString(raw)
    (output,) = reply.infer_response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [1, steps, 97])
    assert len(reply.infer_response.raw_output_contents[0]) == steps * 97 * 4
    unary = pb.ModelInferResponse.FromString(workload.unary_response(steps))
    assert reply.infer_response.parameters["triton_final_response"].bool_param  # streams only
    del reply.infer_response.parameters["triton_final_response"]
    assert unary == reply.infer_response


def test_a_stream_error_is_told_by_its_first_byte() -> None:
    raw = pb.ModelStreamInferResponse(error_message="FAILED_PRECONDITION: no").SerializeToString()
    assert raw[0] != STREAM_OK_TAG
    assert OPEN_INFERENCE.error(raw) == "FAILED_PRECONDITION: no"


def test_workload_states_and_model_file(workload) -> None:
    assert workload.model_file.is_file()
    assert [(s.input_name, s.output_name, s.dims) for s in workload.states] == [
        ("h_in", "h_out", (2, 256)),
        ("c_in", "c_out", (2, 256)),
    ]


def test_histogram_totals_add_up_one_models_versions() -> None:
    text = "\n".join(
        [
            "# TYPE rnnserve_batch_size histogram",
            'rnnserve_batch_size_bucket{le="1.0",model="charlm_lstm",version="1"} 3.0',
            'rnnserve_batch_size_sum{model="charlm_lstm",version="1"} 40.0',
            'rnnserve_batch_size_count{model="charlm_lstm",version="1"} 4.0',
            'rnnserve_batch_size_sum{model="charlm_lstm",version="2"} 2.0',
            'rnnserve_batch_size_count{model="charlm_lstm",version="2"} 1.0',
            'rnnserve_batch_size_sum{model="sensor_gru",version="1"} 99.0',
            'rnnserve_batch_size_count{model="sensor_gru",version="1"} 9.0',
        ]
    )
    assert histogram_totals(text, "rnnserve_batch_size", "charlm_lstm") == (42.0, 5.0)


def test_process_cpu_seconds_reads_this_process() -> None:
    assert process_cpu_seconds(os.getpid()) > 0


def test_options_need_the_headline_points() -> None:
    with pytest.raises(ValueError, match="include 1"):
        BenchOptions(batches=(8, 64))
    assert BenchOptions(sessions=(1, 16, 64, 256)).headline_sessions == 64
    assert BenchOptions(sessions=(1, 4)).headline_sessions == 4
    quick = BenchOptions.resolve(True)
    assert quick.duration_s < BenchOptions().duration_s and 64 in quick.sessions


def test_servers_start_from_a_folder_with_its_own_models_and_service(tmp_path, monkeypatch) -> None:
    """A `models/` or `service/` folder where the benchmark runs must not shadow the packages."""
    for name in ("models", "service"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    with start_rnnserve(tmp_path / "logs", ["--provider=cpu"]) as server:
        assert server.alive() and "charlm_lstm" in server.scrape()
    with start_echo(tmp_path / "logs", BUNDLED, "charlm_lstm", 1) as echo:
        assert echo.alive()
