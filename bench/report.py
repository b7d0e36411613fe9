"""The run's figures as JSON, a Markdown table, two plots and the headline."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rnnserve.threads import KINDS

HEADLINE_SERIES = "stream T=1"
THREADS = "server_cpu_by_thread_s_per_1000_steps"
SERVERS = ("rnnserve", "triton", "transport")
"""The order of each point's rows."""


def headline(results: dict[str, Any], sessions: int) -> dict[str, Any]:
    """E: rnnserve over the transport ceiling; R: rnnserve over in-process ONNX Runtime.

    Both at `sessions` sequences sending one step per request over the stream, against the
    ceiling's messages/s with the same client, and against ONNX Runtime at batch 1, T=1.
    """
    served = _find(results["rnnserve"], series=HEADLINE_SERIES, sessions=sessions)
    transport = _find(results["transport"], series=HEADLINE_SERIES, sessions=sessions)
    alone = _find(results["inprocess"], batch=1, steps=1)
    return {
        "sessions": sessions,
        "triton": _against_triton(results, sorted({1, sessions})),
        "E": _ratio(served["steps_per_s"], transport["requests_per_s"]),
        "R": _ratio(served["steps_per_s"], alone["steps_per_s"]),
        "rnnserve_steps_per_s": served["steps_per_s"],
        "transport_messages_per_s": transport["requests_per_s"],
        "inprocess_steps_per_s": alone["steps_per_s"],
    }


def _against_triton(results: dict[str, Any], sessions: list[int]) -> list[dict[str, Any]]:
    """rnnserve's steps/s over Triton's at each of `sessions`, where both were measured."""
    found = []
    for n in sessions:
        try:
            theirs = _find(results.get("triton", []), series=HEADLINE_SERIES, sessions=n)
            ours = _find(results["rnnserve"], series=HEADLINE_SERIES, sessions=n)
        except LookupError:
            continue
        found.append(
            {
                "sessions": n,
                "ratio": _ratio(ours["steps_per_s"], theirs["steps_per_s"]),
                "rnnserve_steps_per_s": ours["steps_per_s"],
                "triton_steps_per_s": theirs["steps_per_s"],
                "triton_errors": theirs["errors"],
                "triton_crashed": theirs.get("crashed", False),
            }
        )
    return found


def headline_lines(figures: dict[str, Any]) -> tuple[str, ...]:
    n = figures["sessions"]
    versus = [
        f"{f['ratio']:.2f} at {f['sessions']} sequence{'s' if f['sessions'] > 1 else ''} "
        f"({f['rnnserve_steps_per_s']:,.0f} / {f['triton_steps_per_s']:,.0f} steps/s"
        f"{', Triton crashed' if f['triton_crashed'] else ''}"
        f"{', Triton errors' if f['triton_errors'] else ''})"
        for f in figures.get("triton", [])
    ]
    lines = (
        (f"rnnserve / Triton {', '.join(versus)} (1 step per request, stream, same client)",)
        if versus
        else ()
    )
    return (
        *lines,
        f"E = {figures['E']:.2f}  rnnserve {figures['rnnserve_steps_per_s']:,.0f} steps/s "
        f"({n} sequences, 1 step per request, stream) / transport-only ceiling "
        f"{figures['transport_messages_per_s']:,.0f} messages/s ({n} streams, same client)",
        f"R = {figures['R']:.2f}  rnnserve {figures['rnnserve_steps_per_s']:,.0f} steps/s "
        f"({n} sequences) / in-process ONNX Runtime {figures['inprocess_steps_per_s']:,.0f} "
        f"steps/s (batch 1, T=1)",
    )


def _find(points: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any]:
    for point in points:
        if all(point.get(k) == v for k, v in match.items()):
            return point
    raise LookupError(f"no point with {match}")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def write(results: dict[str, Any], out: Path) -> tuple[Path, ...]:
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(_finite(results), indent=2) + "\n")
    md_path.write_text(markdown(results) + "\n")
    return (json_path, md_path, *plot(results, out))


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------- Markdown
def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    model = results["model"]
    revision = (m["git_revision"] or "unknown")[:12]
    if m["git_dirty"]:
        revision += " (uncommitted changes)"
    options = results["options"]
    lines = [
        f"# rnnserve bench: {model['name']} (version {model['version']})",
        "",
        f"{m['cpu']}, {m['usable_cores']} cores, "
        f"{''.join(f'GPU {g}, ' for g in m.get('gpus') or [])}Python {m['python']}, "
        f"onnxruntime {m['packages']['onnxruntime']}, grpcio {m['packages']['grpcio']}, "
        f"revision {revision}, load {m['load_average_1m_at_start']} at start. "
        f"{options['duration_s']:g} s per point after {options['warmup_s']:g} s of warm-up, "
        f"{options.get('repeats', 1)} rounds per point; "
        "CPU is seconds per 1,000 steps.",
        *_triton_section(results),
        "",
        "## In-process ONNX Runtime (the compute limit)",
        "",
    ]
    lines += _table(
        ["batch", "T", "calls/s", "steps/s", "call p50 ms", "call p99 ms", "CPU s/1k steps"],
        (
            [
                str(p["batch"]), str(p["steps"]), _num(p["calls_per_s"]), _num(p["steps_per_s"]),
                _num(p["call_p50_ms"], 3), _num(p["call_p99_ms"], 3),
                _num(p["cpu_s_per_1000_steps"], 4),
            ]
            for p in results["inprocess"]
        ),
    )  # fmt: skip
    lines += [
        "",
        "## Over gRPC on loopback: rnnserve, Triton and the transport-only ceiling",
        "",
        "Closed loops, one per sequence; `transport` is a bare grpc.aio server answering "
        "pre-encoded responses of rnnserve's size, driven by the same client. "
        "`of ceiling` is rnnserve's requests/s over the transport's at the same point.",
        "",
    ]
    ceiling = {(p["series"], p["sessions"]): p for p in results["transport"]}
    rows = []
    served = _served(results)
    for p in sorted(
        served, key=lambda p: (_series_order(p["series"]), p["sessions"], _server_order(p))
    ):
        echo = ceiling.get((p["series"], p["sessions"]))
        share = (
            _num(p["requests_per_s"] / echo["requests_per_s"], 2)
            if p["server"] == "rnnserve" and echo and echo["requests_per_s"]
            else ""
        )
        rows.append(
            [
                p["server"], p["series"], str(p["sessions"]), _num(p["steps_per_s"]),
                _num(p["requests_per_s"]), share, _num(p["p50_ms"], 2), _num(p["p90_ms"], 2),
                _num(p["p99_ms"], 2), _num(p["mean_batch"], 1),
                _num(p["server_cpu_s_per_1000_steps"], 4),
                _num(p["client_cpu_s_per_1000_steps"], 4), str(p["errors"]),
            ]
        )  # fmt: skip
    lines += _table(
        [
            "server", "series", "sessions", "steps/s", "requests/s", "of ceiling", "p50 ms",
            "p90 ms", "p99 ms", "mean batch", "server CPU", "client CPU", "errors",
        ],
        rows,
    )  # fmt: skip
    failed = [p for p in served if p["errors"]]
    if failed:
        lines += ["", "Errors (the first of each point):", ""]
        lines += [
            f"- {p['server']} {p['series']}, {p['sessions']} sessions: {p['errors']} errors, "
            f"first: {p['first_error']}"
            for p in failed
        ]
    lines += _thread_table(served)
    if results.get("channels"):
        lines += ["", "## Channels (transport ceiling, stream T=1)", ""]
        lines += _table(
            ["sessions", "channels", "messages/s", "p50 ms", "p99 ms", "client CPU"],
            (
                [
                    str(p["sessions"]), str(p["channels"]), _num(p["requests_per_s"]),
                    _num(p["p50_ms"], 2), _num(p["p99_ms"], 2),
                    _num(p["client_cpu_s_per_1000_steps"], 4),
                ]
                for p in results["channels"]
            ),
        )  # fmt: skip
    lines += ["", "## Peers", ""]
    for name, peer in results["peers"].items():
        if "skipped" in peer:
            lines.append(f"- {name}: skipped ({peer['skipped'].splitlines()[0]})")
        elif name == "triton":
            lines.append(
                f"- triton {peer['version']}, the model repository unchanged, every point "
                "(above), same client"
            )
        elif name == "torchserve":
            lines.append(_torchserve_line(peer, results))
        else:
            lines.append(
                f"- {name} against rnnserve, {peer['concurrency']} concurrent sequences of "
                f"{peer['sequence_length']} steps, one per request (stream): "
                f"{_num(peer['steps_per_s'])} steps/s, p50 {_num(peer['p50_ms'], 2)} ms, "
                f"p99 {_num(peer['p99_ms'], 2)} ms"
            )
    lines += ["", "## Headline", "", *(f"- {line}" for line in headline_lines(results["headline"]))]
    return "\n".join(lines)


def _torchserve_line(peer: dict[str, Any], results: dict[str, Any]) -> str:
    ours = _find(results["rnnserve"], series=peer["series"], sessions=peer["sessions"])
    settings = peer["settings"]
    return (
        f"- torchserve 0.12, the same model file on ONNX Runtime behind its sequence batching "
        f"({settings['maxWorkers']} worker, batches of up to {settings['batchSize']}, "
        f"{settings['maxBatchDelay']} ms batch delay), {peer['sessions']} sequences, one step "
        f"per request (stream), same client: {_num(peer['steps_per_s'])} steps/s, "
        f"p50 {_num(peer['p50_ms'], 2)} ms, p99 {_num(peer['p99_ms'], 2)} ms, server CPU "
        f"{_num(peer['server_cpu_s_per_1000_steps'], 4)} s/1k steps, {peer['errors']} errors. "
        f"rnnserve at the same point: {_ratio(ours['steps_per_s'], peer['steps_per_s']):.1f}x "
        f"its steps/s"
    )


def _thread_table(points: list[dict[str, Any]]) -> list[str]:
    """Where each server's CPU goes, by kind of thread, for the streams of one step."""
    shown = [p for p in points if p["series"] == "stream T=1" and p.get(THREADS)]
    if not shown:
        return []
    lines = [
        "",
        "## Server CPU by thread (stream T=1)",
        "",
        "µs of CPU per step. `event loop` is the process's first thread; `batch` the batch "
        "workers (the model call runs there); `grpc` gRPC's core threads; `other` mostly "
        "ONNX Runtime's thread pools and grpc.aio's poller.",
        "",
    ]
    rows = [
        [
            p["server"], str(p["sessions"]),
            *(_num(p[THREADS].get(kind, math.nan) * 1000, 1) for kind in KINDS),
            _num(p["server_cpu_s_per_1000_steps"] * 1000, 1),
        ]
        for p in sorted(shown, key=lambda p: (p["sessions"], _server_order(p)))
    ]  # fmt: skip
    header = ["server", "sessions", "event loop", "batch", "grpc", "other", "all"]
    return lines + _table(header, rows)


def _served(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The points measured over gRPC at every sessions value: rnnserve's, Triton's, the
    transport's."""
    return results["rnnserve"] + results.get("triton", []) + results["transport"]


def _server_order(point: dict[str, Any]) -> int:
    return SERVERS.index(point["server"]) if point["server"] in SERVERS else len(SERVERS)


def _triton_section(results: dict[str, Any]) -> list[str]:
    """rnnserve against Triton point by point: what the run is mostly for."""
    peer = results["peers"].get("triton", {"skipped": "not measured"})
    if "skipped" in peer:
        return ["", f"Triton: skipped ({peer['skipped'].splitlines()[0]})."]
    theirs = {(p["series"], p["sessions"]): p for p in results.get("triton", [])}
    rows = []
    for p in sorted(results["rnnserve"], key=lambda p: (_series_order(p["series"]), p["sessions"])):
        t = theirs.get((p["series"], p["sessions"]))
        if t is None:
            continue
        rows.append(
            [
                p["series"], str(p["sessions"]), _spread(p, "steps_per_s"),
                _spread(t, "steps_per_s"), _num(_ratio(p["steps_per_s"], t["steps_per_s"]), 2),
                _paired(p, t), _spread(p, "p99_ms", 2), _spread(t, "p99_ms", 2),
                _num(p["server_cpu_s_per_1000_steps"], 4),
                _num(t["server_cpu_s_per_1000_steps"], 4),
                str(t["errors"]) + _crashes(t),
            ]
        )  # fmt: skip
    s = peer["settings"]
    groups = ", ".join(f"{g['count']} x {g['kind']}" for g in s["instance_group"]) or "none"
    lines = [
        "",
        f"## rnnserve and Triton {peer['version']}, point by point",
        "",
        "The same client, model repository and sequences; at each point rnnserve, Triton and the "
        "transport ceiling run back to back, in rounds that alternate their order. Each figure "
        "is that of the round with the median steps/s, with the range over the rounds in "
        "brackets; `per round` is the range "
        "of rnnserve / Triton over the rounds, each round's two measurements taken a few "
        "seconds apart. Triton's settings, from its "
        f"ModelConfig of the model: instance group {groups}, max batch size "
        f"{s['max_batch_size']}, sequence batcher `{s['scheduler']}` (preferred batch sizes "
        f"{s['preferred_batch_size']}, max queue delay {s['max_queue_delay_microseconds']} µs, "
        f"{s['max_candidate_sequences']} candidate sequences): its defaults for the "
        "repository's config.pbtxt.",
        "",
    ]
    lines += _table(
        [
            "series", "sessions", "rnnserve steps/s", "Triton steps/s", "rnnserve / Triton",
            "per round", "rnnserve p99 ms", "Triton p99 ms", "rnnserve CPU", "Triton CPU",
            "Triton errors",
        ],
        rows,
    )  # fmt: skip
    crashes = peer.get("crashes", [])
    if crashes:
        lines += ["", f"Triton crashed {len(crashes)} times and was started again:", ""]
        lines += [
            f"- {c['series']}, {c['sessions']} sessions, {c['when']}: {c['death']}; last log "
            f"line: `{(c['log_tail'].splitlines() or ['(empty)'])[-1][:200]}`"
            for c in crashes
        ]
    if peer.get("stopped"):
        lines += ["", f"Triton was not measured after that: it {peer['stopped']}."]
    return lines


def _crashes(point: dict[str, Any]) -> str:
    """ " (crashed in k of n rounds)" where the server died; its figures are the other rounds'."""
    if not point.get("crashed"):
        return ""
    rounds = point.get("rounds", 1)
    if rounds < 2:
        return " (crashed)"
    return f" (crashed in {point.get('crashed_rounds', 1)} of {rounds} rounds)"


def _spread(point: dict[str, Any], key: str, digits: int = 0) -> str:
    """The median round's figure, and the range over the rounds where there were several."""
    rounds = point.get(f"{key}_rounds", [])
    median = _num(point[key], digits)
    if len(rounds) < 2:
        return median
    return f"{median} ({_num(min(rounds), digits)}-{_num(max(rounds), digits)})"


def _paired(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """The range of rnnserve / Triton over the rounds both were measured in."""
    # A peer that stopped for good has fewer rounds: pair those it has.
    pairs = zip(
        ours.get("steps_per_s_rounds", []), theirs.get("steps_per_s_rounds", []), strict=False
    )
    ratios = [_ratio(a, b) for a, b in pairs]
    if len(ratios) < 2:
        return ""
    return f"{_num(min(ratios), 2)}-{_num(max(ratios), 2)}"


def _series_order(label: str) -> tuple[int, str]:
    return (0 if label == HEADLINE_SERIES else 1, label)


# ---------------------------------------------------------------------------------- plots
def plot(results: dict[str, Any], out: Path) -> tuple[Path, ...]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({p["series"] for p in results["rnnserve"]}, key=_series_order)
    styles = {"rnnserve": "-o", "triton": "-.^", "transport": "--s"}

    figure, axes = plt.subplots(figsize=(8, 5))
    for server, label, points in _lines(results, series):
        axes.plot(
            [p["sessions"] for p in points],
            [p["steps_per_s"] for p in points],
            styles[server],
            label=f"{server} {label}",
        )
    for p in results["inprocess"]:
        if p["batch"] == 1:
            axes.axhline(p["steps_per_s"], color="grey", linewidth=0.8, linestyle=":")
            axes.annotate(
                f"in-process ORT, batch 1, T={p['steps']}",
                (1, p["steps_per_s"]),
                fontsize=7,
                color="grey",
                va="bottom",
            )
    throughput = _save_plot(
        figure,
        axes,
        "steps/s (messages/s x T for transport)",
        f"{results['model']['name']}: throughput",
        out / "throughput.png",
        legend={"fontsize": 8},
    )

    figure, axes = plt.subplots(figsize=(8, 5))
    for server, label, points in _lines(results, series):
        sessions = [p["sessions"] for p in points]
        (line,) = axes.plot(
            sessions,
            [p["p50_ms"] for p in points],
            styles[server],
            label=f"{server} {label} p50",
        )
        axes.plot(
            sessions,
            [p["p99_ms"] for p in points],
            styles[server][-1] + ":",
            color=line.get_color(),
            label=f"{server} {label} p99",
        )
    latency = _save_plot(
        figure,
        axes,
        "latency per request, ms",
        f"{results['model']['name']}: latency per request, p50 and p99 (dotted)",
        out / "latency.png",
        legend={"fontsize": 7, "ncol": 2},
    )
    return throughput, latency


def _lines(
    results: dict[str, Any], series: list[str]
) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """Each server's points of each series, as the plots draw them: (server, series, points)."""
    for server in SERVERS:
        for label in series:
            points = [p for p in results.get(server, []) if p["series"] == label]
            if points:
                yield server, label, points


def _save_plot(
    figure: Any, axes: Any, ylabel: str, title: str, path: Path, legend: dict[str, Any]
) -> Path:
    """Log-log against concurrent sequences, gridded, written as a PNG."""
    import matplotlib.pyplot as plt

    axes.set(xscale="log", yscale="log", xlabel="concurrent sequences", ylabel=ylabel, title=title)
    axes.grid(True, which="both", linewidth=0.3)
    axes.legend(**legend)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
