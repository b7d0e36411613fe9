"""The client commands of `rnnserve`: models, health, generate, forecast, classify.

Each talks to a running server through rnnserve.client.Client. A failure the person at the
terminal can act on (server unreachable, unknown model, malformed input, a file that cannot be
read) becomes a CommandError: one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rnnserve.client.aio import Client, ModelInfo
from rnnserve.client.errors import ClientError, NotFound, Unavailable
from rnnserve.config import Settings
from rnnserve.errors import CommandError, ServiceError
from rnnserve.models import bundled_repository
from rnnserve.repository.layout import scan

T = TypeVar("T")

URL_VARIABLE = "RNNSERVE_URL"
"""The environment variable that gives the client commands' --url its default."""
DEFAULT_URL = f"{Settings.host}:{Settings.grpc_port}"
PLOT_SIZE = (1000, 500)
"""Pixels of a `forecast --plot` image (10 x 5 inches at 100 dpi)."""
DIGIT_ROWS = 8


def add_commands(sub: Any) -> None:
    """Add the client commands to the `rnnserve` subparsers `sub`."""
    models = sub.add_parser(
        "models",
        help="list the models of a repository, or of a running server (--url)",
        description="Without --url: the models of a model repository on disk. With --url: "
        "the models a running server serves, with their versions, readiness, inputs and "
        "outputs.",
    )
    where = models.add_mutually_exclusive_group()
    where.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="model repository (default: the bundled one)",
    )
    where.add_argument("--url", help="ask the server at this address (host:port) instead")
    _add_output_arguments(models, url=False)
    models.set_defaults(run=_run_models)

    health = sub.add_parser(
        "health",
        help="is the server live and ready? (exit 0 when ready, 1 otherwise)",
    )
    _add_output_arguments(health)
    health.set_defaults(run=_run_health)

    generate = sub.add_parser(
        "generate",
        help="stream a prompt through a character model and print its continuation",
        description="A streaming client: sends the whole prompt in one request on a gRPC "
        "stream, then each generated character as one more request on the same stream (the "
        "server carries the LSTM state between them), printing each character as it comes. "
        "The prompt may hold only characters of the model's vocabulary (a usage error names "
        "any others).",
    )
    generate.add_argument("prompt", help="text to start from, in the model's vocabulary")
    generate.add_argument(
        "--model", default="charlm_lstm", help="a model with a vocabulary (default: charlm_lstm)"
    )
    generate.add_argument("--length", type=int, default=80, help="characters to generate")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 for the likeliest character"
    )
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    _add_output_arguments(generate)
    generate.set_defaults(run=_run_generate)

    forecast = sub.add_parser(
        "forecast",
        help="stream a series through a forecasting model; one-step forecasts against the truth",
        description="Streams the readings of a CSV file to the model, a few per request, and "
        "prints each one-step forecast beside the reading it forecast.",
    )
    forecast.add_argument("model", help="a forecasting model (sensor_gru)")
    forecast.add_argument(
        "--csv",
        type=Path,
        required=True,
        metavar="FILE",
        help="the series: one reading per row (a header row is skipped)",
    )
    forecast.add_argument(
        "--column", default="0", help="column name or 0-based index of the readings (default 0)"
    )
    forecast.add_argument(
        "--chunk", type=int, default=1, help="readings per request (default 1: one per step)"
    )
    forecast.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help=f"draw the series and the forecasts into this PNG ({PLOT_SIZE[0]}x{PLOT_SIZE[1]}; "
        "needs matplotlib)",
    )
    _add_output_arguments(forecast)
    forecast.set_defaults(run=_run_forecast)

    classify = sub.add_parser(
        "classify",
        help="stream an 8x8 digit row by row; the class probabilities firm up as rows arrive",
    )
    classify.add_argument("model", help="a digit classifier (digits_lstm)")
    source = classify.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--sample",
        type=int,
        metavar="K",
        help="image K of scikit-learn's digits, the data the model was trained on (needs "
        "scikit-learn)",
    )
    source.add_argument(
        "--csv", type=Path, metavar="FILE", help="an image: 8 rows of 8 pixels valued 0..16"
    )
    _add_output_arguments(classify)
    classify.set_defaults(run=_run_classify)


def _add_output_arguments(parser: argparse.ArgumentParser, url: bool = True) -> None:
    if url:
        parser.add_argument(
            "--url",
            default=os.environ.get(URL_VARIABLE) or DEFAULT_URL,
            help=f"server address, host:port (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
        )
    parser.add_argument("--json", action="store_true", help="print one JSON document, for scripts")
    parser.add_argument("--token", help="bearer token sent with every call")
    tls = parser.add_argument_group("TLS (a server started with --tls-cert)")
    tls.add_argument(
        "--tls", action="store_true", help="speak TLS, trusting the system's CA certificates"
    )
    tls.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="PEM CA certificates to verify the server by"
    )
    tls.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM client certificate, for a server that asks for one (--tls-client-ca)",
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM key of --tls-cert")


# ---------------------------------------------------------------------------- plumbing
def _client(args: argparse.Namespace) -> Client:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together")
    return Client(
        args.url,
        tls=args.tls,
        root_certificates=args.tls_ca,
        private_key=args.tls_key,
        certificate_chain=args.tls_cert,
        token=args.token,
        timeout_s=30.0,
    )


def _talk(args: argparse.Namespace, job: Callable[[Client], Awaitable[T]]) -> T:
    """Run `job` with a client of `args`; its failures as one-line CommandErrors."""

    async def run() -> T:
        async with _client(args) as client:
            return await job(client)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        # asyncio.run cancelled the job first: its session ended its sequence on the way out.
        raise CommandError("interrupted", exit_code=INTERRUPTED) from None
    except BrokenPipeError:
        raise  # stdout's reader went away (`| head`): rnnserve.cli ends quietly
    except OSError as error:
        raise CommandError(f"{error.filename}: cannot read it ({error.strerror})") from error
    except Unavailable as error:
        raise CommandError(
            f"{args.url}: UNAVAILABLE: {error.message} ({_why_unavailable(args, error)})",
            exit_code=1,
        ) from error
    except NotFound as error:
        raise CommandError(f"{args.url}: {error.message}", exit_code=1) from error
    except ClientError as error:
        raise CommandError(f"{args.url}: {error}", exit_code=1) from error


INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)."""
_HANDSHAKE = ("handshake", "ssl", "tls", "certificate")
"""Words of a failure to connect that happened in TLS, not before it."""


def _why_unavailable(args: argparse.Namespace, error: Unavailable) -> str:
    """What the person at the terminal should check, for a server that was not reached."""
    tls = args.tls or args.tls_ca is not None or args.tls_cert is not None
    if any(word in error.message.lower() for word in _HANDSHAKE):
        if not tls:
            return "the server speaks TLS: give --tls-ca (its CA), or --tls for the system's CAs"
        return (
            "the TLS handshake failed: the server's certificate must chain to --tls-ca (or the "
            "system's CAs with --tls) and name the host of --url; a server that asks for client "
            "certificates (--tls-client-ca) needs --tls-cert and --tls-key; one without TLS, "
            "none of these options"
        )
    advice = "is `rnnserve serve` running there? --url names another address"
    if not tls:
        advice += "; a server with TLS needs --tls-ca, or --tls"
    return advice


@contextmanager
def _progress(total: int, enabled: bool, description: str) -> Iterator[Any]:
    """A tqdm bar on stderr for a long job (none for --json or short jobs)."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=description, unit="step", disable=not enabled, file=sys.stderr
    ) as bar:
        yield bar


def _emit(document: object) -> None:
    print(json.dumps(document, indent=2))


def _require(info: ModelInfo, condition: bool, what: str) -> None:
    if not condition:
        raise CommandError(f"model {info.name} {what}", exit_code=1)


# ---------------------------------------------------------------------------- models, health
def _describe(tensors: Any) -> str:
    return ", ".join(
        f"{t.name} {t.datatype}[B,{','.join('T' if d < 0 else str(d) for d in t.dims)}]"
        for t in tensors
    )


def _run_models(args: argparse.Namespace) -> int:
    if args.url is None:
        return _local_models(args)
    found = _talk(args, lambda client: client.models())
    if args.json:
        _emit([asdict(info) for info in found])
        return 0
    for info in found:
        kind = "streaming" if info.streamable else "whole-sequence"
        state = "READY" if info.ready else f"UNAVAILABLE ({info.reason or 'not ready'})"
        versions = ",".join(info.versions) or "none"
        print(
            f"{info.name}\tversions {versions}\t{state}\t{kind}\t"
            f"{_describe(info.inputs)} -> {_describe(info.outputs)}"
        )
    return 0


def _local_models(args: argparse.Namespace) -> int:
    try:
        entries = scan(args.model_repository or bundled_repository())
    except ServiceError as error:
        raise CommandError(str(error)) from error
    rows: list[dict[str, Any]] = []
    for entry in entries:
        rows.append(
            {
                "name": entry.name,
                "versions": [str(v) for v in entry.versions],
                "streamable": entry.streamable,
                "inputs": [i.name for i in entry.config.input],
                "outputs": [o.name for o in entry.config.output],
            }
        )
    if args.json:
        _emit(rows)
        return 0
    for row in rows:
        kind = "streaming" if row["streamable"] else "whole-sequence"
        versions = ",".join(row["versions"]) or "none"
        inputs, outputs = ", ".join(row["inputs"]), ", ".join(row["outputs"])
        print(f"{row['name']}\tversions {versions}\t{kind}\t{inputs} -> {outputs}")
    return 0


def _run_health(args: argparse.Namespace) -> int:
    health = _talk(args, lambda client: client.health())
    if args.json:
        _emit({"url": args.url, **asdict(health)})
    else:
        live = "live" if health.live else "not live"
        ready = "ready" if health.ready else "not ready"
        print(f"{args.url}: {live}, {ready}, health {health.serving}")
    return 0 if health.ready else 1


# ---------------------------------------------------------------------------- generate
def _run_generate(args: argparse.Namespace) -> int:
    if args.length < 0 or args.temperature < 0:
        raise CommandError("--length and --temperature must be 0 or more")

    async def job(client: Client) -> str:
        async with client.session(args.model) as session:
            assert session.info is not None
            vocabulary = session.info.parameters.get("vocabulary", "")
            _require(
                session.info,
                bool(vocabulary),
                "has no vocabulary: generate needs a character model (charlm_lstm)",
            )
            prompt = encode_prompt(args.prompt, vocabulary, args.model)
            if not args.json:
                print(args.prompt, end="", flush=True)
            # The whole prompt in one request: the server runs its steps in order.
            logits = (await session.step(prompt))[0, -1]
            rng = np.random.default_rng(args.seed)
            text = []
            for _ in range(args.length):
                token = _pick(logits, args.temperature, rng)
                text.append(vocabulary[token])
                if not args.json:
                    print(vocabulary[token], end="", flush=True)
                logits = (await session.step(np.array([[token]], np.int64)))[0, -1]
            return "".join(text)

    text = _talk(args, job)
    if args.json:
        _emit({"model": args.model, "prompt": args.prompt, "text": text})
    else:
        print()
    return 0


def encode_prompt(prompt: str, vocabulary: str, model: str) -> np.ndarray:
    """`prompt` as token ids [1, T] (int64) of `vocabulary`; a CommandError (exit 2) for an
    empty prompt or one with characters outside the vocabulary, naming them."""
    if not prompt:
        raise CommandError("the prompt is empty")
    index = {ch: i for i, ch in enumerate(vocabulary)}
    unknown = sorted({ch for ch in prompt if ch not in index})
    if unknown:
        raise CommandError(
            f"the prompt holds characters outside {model}'s vocabulary: "
            f"{' '.join(repr(ch) for ch in unknown)}; it knows these {len(vocabulary)}: "
            f"{vocabulary!r}"
        )
    return np.array([[index[ch] for ch in prompt]], dtype=np.int64)


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature > 0:
        weights = np.exp((logits - logits.max()) / temperature)
        return int(rng.choice(len(weights), p=weights / weights.sum()))
    return int(logits.argmax())


# ---------------------------------------------------------------------------- forecast
def read_series(path: Path, column: str) -> np.ndarray:
    """The readings of one column of a CSV file (float32 [N]); a first row that is not a
    number is a header. Raises CommandError for a malformed file."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise CommandError(f"{path}: no readings")
    index = int(column) if column.isdigit() else None
    header, first_row = rows[0], 1
    if not _numeric(header[index] if index is not None and index < len(header) else ""):
        if index is None:
            if column not in header:
                raise CommandError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
            index = header.index(column)
        rows, first_row = rows[1:], 2
    elif index is None:
        raise CommandError(f"{path}: has no header row, so name the column by number")
    values = []
    for number, row in enumerate(rows, start=first_row):
        cell = row[index].strip() if index < len(row) else ""
        if not _numeric(cell):
            raise CommandError(f"{path}: row {number}: {cell!r} is not a number")
        values.append(float(cell))
    if len(values) < 2:
        raise CommandError(f"{path}: a forecast needs at least 2 readings, found {len(values)}")
    return np.array(values, dtype=np.float32)


def _numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _run_forecast(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise CommandError("--chunk must be 1 or more")
    try:
        series = read_series(args.csv, args.column)
    except OSError as error:
        raise CommandError(f"{args.csv}: cannot read it ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise CommandError(f"{args.csv}: not a text file ({error.reason})") from error

    async def job(client: Client) -> tuple[np.ndarray, str]:
        async with client.session(args.model) as session:
            info = session.info
            assert info is not None
            _require(
                info,
                len(info.inputs) == 1 and info.inputs[0].dims == (-1, 1),
                f"is not a one-reading forecaster: its inputs are {_describe(info.inputs)}",
            )
            forecasts = []
            with _progress(len(series), not args.json and len(series) > 50, "forecast") as bar:
                for start in range(0, len(series), args.chunk):
                    chunk = series[start : start + args.chunk, None]
                    forecasts.append((await session.step(chunk))[0, :, 0])
                    bar.update(len(chunk))
            return np.concatenate(forecasts), info.parameters.get("unit", "")

    forecasts, unit = _talk(args, job)
    # forecasts[t] is the forecast of series[t + 1].
    truth, predicted = series[1:], forecasts[:-1]
    rmse = float(np.sqrt(np.mean((predicted - truth) ** 2)))
    if args.plot is not None:
        _plot(args.plot, series, forecasts, args.model, unit)
    if args.json:
        _emit(
            {
                "model": args.model,
                "unit": unit,
                "readings": series.tolist(),
                "forecasts": forecasts.tolist(),
                "rmse": rmse,
            }
        )
        return 0
    print(f"{'t':>6}  {'truth':>10}  {'forecast':>10}  {'error':>8}  {unit}")
    for t in range(1, len(series)):
        miss = predicted[t - 1] - truth[t - 1]
        print(f"{t:>6}  {series[t]:>10.3f}  {predicted[t - 1]:>10.3f}  {miss:>+8.3f}")
    print(f"next ({len(series)}): {forecasts[-1]:.3f} {unit}; RMSE of {len(truth)} forecasts: "
          f"{rmse:.3f} {unit}")  # fmt: skip
    return 0


def _plot(path: Path, series: np.ndarray, forecasts: np.ndarray, model: str, unit: str) -> None:
    try:
        import matplotlib
    except ImportError as error:
        raise CommandError(
            "--plot needs matplotlib: pip install matplotlib (or 'rnnserve[client]')", exit_code=1
        ) from error
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    dpi = 100
    figure, axes = plt.subplots(figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi), dpi=dpi)
    steps = np.arange(len(series))
    axes.plot(steps, series, label="truth", linewidth=1.2)
    axes.plot(steps[1:], forecasts[:-1], label=f"{model} one-step forecast", linewidth=1.2)
    axes.set_xlabel("time step")
    axes.set_ylabel(unit or "value")
    axes.legend()
    try:
        figure.savefig(path, dpi=dpi, format="png")
    except OSError as error:
        raise CommandError(f"{path}: cannot write it ({error.strerror})", exit_code=1) from error
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------- classify
def digits_sample(k: int) -> tuple[np.ndarray, int]:
    """Image `k` [8, 8] (0..16) of scikit-learn's digits, the data digits_lstm was trained
    on, and its label."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise CommandError(
            "--sample reads scikit-learn's digits (the data digits_lstm was trained on): "
            "pip install scikit-learn (or 'rnnserve[client]'), or give an image with --csv FILE",
            exit_code=1,
        ) from error
    digits = load_digits()
    if not 0 <= k < len(digits.target):
        raise CommandError(f"--sample must be 0..{len(digits.target) - 1}")
    return digits.images[k].astype(np.float32), int(digits.target[k])


def read_image(path: Path) -> np.ndarray:
    """An 8x8 image of pixels 0..16 from a CSV file; CommandError when it is not one."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if any(c.strip() for c in row)]
    except OSError as error:
        raise CommandError(f"{path}: cannot read it ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise CommandError(f"{path}: not a text file ({error.reason})") from error
    if len(rows) != DIGIT_ROWS or any(len(row) != DIGIT_ROWS for row in rows):
        raise CommandError(f"{path}: an image is 8 rows of 8 pixels")
    if not all(_numeric(cell) for row in rows for cell in row):
        raise CommandError(f"{path}: pixels are numbers 0..16")
    image = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float32)
    if image.min() < 0 or image.max() > 16:
        raise CommandError(f"{path}: pixels are numbers 0..16")
    return image


def _run_classify(args: argparse.Namespace) -> int:
    label: int | None = None
    if args.sample is not None:
        image, label = digits_sample(args.sample)
    else:
        image = read_image(args.csv)

    async def job(client: Client) -> list[np.ndarray]:
        async with client.session(args.model) as session:
            assert session.info is not None
            _require(
                session.info,
                len(session.info.inputs) == 1 and session.info.inputs[0].dims == (-1, 8),
                f"does not read images row by row: its inputs are {_describe(session.info.inputs)}",
            )
            # One row per request: the probabilities after each row are the stream's point.
            return [(await session.step(image[None, row : row + 1]))[0, 0] for row in range(8)]

    rows = _talk(args, job)
    predicted = int(rows[-1].argmax())
    if args.json:
        _emit(
            {
                "model": args.model,
                "sample": args.sample,
                "label": label,
                "predicted": predicted,
                "probabilities": [row.tolist() for row in rows],
            }
        )
        return 0
    for row, probabilities in enumerate(rows, start=1):
        best = int(probabilities.argmax())
        pixels = "".join(" .:-=+*#%@"[min(int(p) * 10 // 17, 9)] for p in image[row - 1])
        bar = "#" * round(40 * float(probabilities[best]))
        print(f"row {row}  {pixels}  {best}  {probabilities[best]:6.1%}  {bar}")
    truth = f" (label {label})" if label is not None else ""
    print(f"predicted {predicted}{truth}")
    return 0
