"""The client commands (`rnnserve models --url`, health, generate, forecast, classify) against
the real server: outputs checked against the model run in-process, failures as one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from rnnserve.cli import main
from rnnserve.client.cli import PLOT_SIZE
from tests.api.conftest import MODELS, Reference, sequence_data
from tests.conftest import run_cli
from tests.redis_server import free_port


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`rnnserve ARGS` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk (which must come first)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR")
    return width, height


def test_models_of_a_server_and_of_a_repository(server, capsys) -> None:
    code, out, _ = run(capsys, "models", "--url", server.target)
    assert code == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert set(rows) == set(MODELS)
    assert rows["sensor_gru"][1:4] == ["versions 1", "READY", "streaming"]
    assert rows["sensor_gru"][4] == "reading FP32[B,T,1] -> forecast FP32[B,T,1]"
    code, out, _ = run(capsys, "models", "--url", server.target, "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["digits_lstm"]["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "dims": [-1, 8]}
    ]
    assert [s["input_name"] for s in listed["charlm_lstm"]["states"]] == ["h_in", "c_in"]
    code, out, _ = run(capsys, "models", "--json")  # the bundled repository, no server
    assert code == 0 and {m["name"] for m in json.loads(out)} == set(MODELS)


def test_health(server, capsys) -> None:
    code, out, _ = run(capsys, "health", "--url", server.target)
    assert (code, out) == (0, f"{server.target}: live, ready, health SERVING\n")
    code, out, _ = run(capsys, "health", "--url", server.target, "--json")
    assert json.loads(out) == {
        "url": server.target, "live": True, "ready": True, "serving": "SERVING"
    }  # fmt: skip


def test_generate_picks_what_the_model_picks(server, capsys, reference: Reference) -> None:
    args = ("generate", "def ", "--model", "charlm_lstm", "--length", "24")
    code, out, _ = run(capsys, *args, "--url", server.target, "--json")
    assert code == 0
    text = json.loads(out)["text"]
    vocabulary = [chr(0), "\n", *(chr(c) for c in range(32, 127))]
    ids = np.array([[vocabulary.index(ch) for ch in "def " + text]])
    picked = reference.run("charlm_lstm", ids[:, :-1])[0].argmax(-1)[3:]
    assert "".join(vocabulary[i] for i in picked) == text
    code, out, _ = run(capsys, *args, "--url", server.target)
    assert (code, out) == (0, f"def {text}\n")


def test_forecast_against_the_truth_with_a_plot(server, capsys, tmp_path, reference) -> None:
    series = sequence_data("sensor_gru", 60, np.random.default_rng(4))[0, :, 0]
    path = tmp_path / "series.csv"
    path.write_text("month,sst\n" + "".join(f"{t},{v:.4f}\n" for t, v in enumerate(series)))
    readings = np.array([float(f"{v:.4f}") for v in series], np.float32)
    expected = reference.run("sensor_gru", readings[None, :, None])[0, :, 0]
    plot = tmp_path / "forecast.png"
    base = ("forecast", "sensor_gru", "--csv", str(path), "--column", "sst", "--url", server.target)
    code, out, _ = run(capsys, *base, "--chunk", "7", "--json", "--plot", str(plot))
    assert code == 0
    answer = json.loads(out)
    np.testing.assert_allclose(answer["forecasts"], expected, rtol=1e-5, atol=1e-5)
    rmse = np.sqrt(np.mean((expected[:-1] - readings[1:]) ** 2))
    assert answer["unit"] == "degC" and answer["rmse"] == pytest.approx(rmse, rel=1e-4)
    assert png_size(plot.read_bytes()) == PLOT_SIZE
    code, out, _ = run(capsys, *base)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + 59 + 1
    t, truth, forecast, _error = lines[1].split()
    assert (int(t), float(truth), float(forecast)) == (
        1,
        float(f"{readings[1]:.3f}"),
        float(f"{expected[0]:.3f}"),
    )


def test_classify_firms_up_row_by_row(server, capsys, reference, tmp_path) -> None:
    digits = load_digits()
    code, out, _ = run(
        capsys, "classify", "digits_lstm", "--sample", "7", "--url", server.target, "--json"
    )
    assert code == 0
    answer = json.loads(out)
    expected = reference.run("digits_lstm", digits.images[7:8].astype(np.float32))[0]
    np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-5, atol=1e-5)
    assert answer["label"] == digits.target[7] and answer["predicted"] == expected[-1].argmax()
    image = tmp_path / "seven.csv"
    image.write_text("\n".join(",".join(str(int(p)) for p in row) for row in digits.images[7]))
    code, out, _ = run(
        capsys, "classify", "digits_lstm", "--csv", str(image), "--url", server.target
    )
    lines = out.splitlines()
    assert (
        code == 0 and len(lines) == 9 and lines[-1].startswith(f"predicted {expected[-1].argmax()}")
    )


@pytest.mark.parametrize(
    "args",
    [
        ("models",),
        ("health",),
        ("generate", "def "),
        ("classify", "digits_lstm", "--sample", "0"),
    ],
)
def test_an_unreachable_server_is_one_line(capsys, args) -> None:
    url = f"127.0.0.1:{free_port()}"
    code, out, err = run(capsys, *args, "--url", url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and f"{url}: UNAVAILABLE" in err and "rnnserve serve" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "def ", "--model", "nope"), "unknown model 'nope'"),
        (("classify", "nope", "--sample", "0"), "unknown model 'nope'"),
        (("generate", "x", "--model", "sensor_gru"), "model sensor_gru has no vocabulary"),
        (("classify", "sensor_gru", "--sample", "0"), "model sensor_gru does not read images"),
    ],
)
def test_the_wrong_model_is_one_line(server, capsys, args, message) -> None:
    code, out, err = run(capsys, *args, "--url", server.target)
    assert code == 1 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("t,v\n1,2\n2,x\n", ("--column", "v"), "row 3: 'x' is not a number"),
        ("t,v\n1,2\n", ("--column", "w"), "no column 'w'"),
        ("", (), "no readings"),
        ("24.1\n", (), "at least 2 readings"),
    ],
)
def test_a_malformed_series_is_one_line(server, capsys, tmp_path, content, args, message) -> None:
    path = tmp_path / "series.csv"
    path.write_text(content)
    code, _, err = run(
        capsys, "forecast", "sensor_gru", "--csv", str(path), *args, "--url", server.target
    )
    assert code == 2 and err.count("\n") == 1 and message in err


def test_a_malformed_image_or_sample_is_one_line(server, capsys, tmp_path) -> None:
    bad = tmp_path / "image.csv"
    bad.write_text("1,2,3\n")
    code, _, err = run(capsys, "classify", "digits_lstm", "--csv", str(bad), "--url", server.target)
    assert code == 2 and "an image is 8 rows of 8 pixels" in err
    code, _, err = run(
        capsys, "classify", "digits_lstm", "--sample", "99999", "--url", server.target
    )
    assert code == 2 and "--sample must be 0..1796" in err
    code, _, err = run(capsys, "forecast", "sensor_gru", "--csv", str(tmp_path / "none.csv"))
    assert code == 2 and "cannot read it" in err


def test_failures_print_no_traceback_from_the_installed_command(server, tmp_path) -> None:
    """The command as a user runs it: the same one-liners, nothing else on stderr."""
    series = tmp_path / "series.csv"
    series.write_text("24.1\n24.5\n24.2\n")
    url = f"127.0.0.1:{free_port()}"
    unreachable = run_cli("forecast", "sensor_gru", "--csv", str(series), "--url", url, timeout=60)
    assert unreachable.returncode == 1 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert f"{url}: UNAVAILABLE" in unreachable.stderr and "Traceback" not in unreachable.stderr
    unknown = run_cli("classify", "nope", "--sample", "3", "--url", server.target, timeout=60)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "unknown model 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_generate_refuses_characters_outside_the_vocabulary(server) -> None:
    done = run_cli("generate", "naïve ∑", "--url", server.target, "--length", "3", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "the prompt holds characters outside charlm_lstm's vocabulary: 'ï' '∑';" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr


def test_generate_help_says_what_each_request_carries(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sends the whole prompt in one request" in text
    assert "each generated character as one more request" in text


def test_forecast_into_a_pipe_its_reader_closed(server, tmp_path) -> None:
    series = tmp_path / "long.csv"
    readings = 24 + np.sin(np.arange(5000) / 12)
    series.write_text("sst\n" + "".join(f"{r:.3f}\n" for r in readings))
    forecast = (
        f"{sys.executable} -P -m rnnserve forecast sensor_gru --csv {series} --column sst "
        f"--chunk 500 --url {server.target}"
    )
    # 5,000 rows of output are more than a pipe holds: the writes after head left fail.
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{forecast} | head -n 3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(done.stdout.splitlines()) == 3
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, as `yes | head` ends
