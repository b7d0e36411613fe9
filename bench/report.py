"""The run's figures as JSON, a Markdown report led by the targets against Triton, two plots and
the headline."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rnnserve.threads import KINDS

HEADLINE_SERIES = "stream T=1"
THREADS = "server_cpu_by_thread_s_per_1000_steps"
OURS = ("rnnserve", "rnnserve-grpcio")
"""rnnserve's series: through the native transport (the main one) and through grpc.aio."""
TRANSPORTS = {"rnnserve": "native", "rnnserve-grpcio": "grpcio"}
SERVERS = (*OURS, "triton", "transport")
"""The order of each point's rows, and of the plots' lines."""
PERF_ANALYZER_MODES = ("unary", "streaming", "http")
MUST = 1.0
AIM = 1.5
"""The targets against Triton (issue 22): at least MUST times its steps/s with a p99 no higher
at every point; AIM times, as the aim."""


# ---------------------------------------------------------------------------------- figures
def valid(point: dict[str, Any] | None) -> bool:
    """Whether a measurement stands for its server: measured, no error and no crash in the
    round its figures come from (a perf_analyzer run: it did not fail)."""
    if point is None or "skipped" in point or "failed" in point:
        return False
    if "valid" in point:
        return bool(point["valid"])
    return point.get("errors", 0) == 0 and not point.get("crashed", False)


def _why_not(point: dict[str, Any] | None) -> str:
    if point is None or "skipped" in point:
        return "not measured"
    crashed_all = point.get("crashed_rounds", 1) >= point.get("rounds", 1)
    if point.get("crashed") and ("failed" in point or crashed_all):
        return "crashed"
    if "failed" in point:
        return "failed"
    return "errors" if point.get("errors") else "crashed"


def verdict(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, Any]:
    """rnnserve against Triton at one point: the steps/s ratio, both p99s, and the targets.

    A point is comparable when Triton's figure is valid; rnnserve's errors or crash miss the
    targets, as they would for a user."""
    found: dict[str, Any] = {
        "ratio": math.nan,
        "p99_ms": ours.get("p99_ms", math.nan) if ours else math.nan,
        "triton_p99_ms": theirs.get("p99_ms", math.nan) if theirs else math.nan,
        "p99_no_higher": None,
        "must": None,
        "aim": None,
    }
    if ours is not None and theirs is not None and "steps_per_s" in ours:
        found["ratio"] = _ratio(ours["steps_per_s"], theirs.get("steps_per_s", math.nan))
    if not valid(theirs):
        found["status"] = f"not comparable: Triton {_why_not(theirs)}"
        return found
    if not valid(ours):
        found.update(must=False, aim=False, status=f"missed: rnnserve {_why_not(ours)}")
        return found
    assert ours is not None and theirs is not None
    p99_ok = bool(ours["p99_ms"] <= theirs["p99_ms"])
    ratio = found["ratio"]
    found.update(p99_no_higher=p99_ok, must=ratio >= MUST and p99_ok, aim=ratio >= AIM and p99_ok)
    if found["aim"]:
        found["status"] = "Aim met"
    elif found["must"]:
        found["status"] = "Must met"
    else:
        missed = [what for what, ok in (("steps/s", ratio >= MUST), ("p99", p99_ok)) if not ok]
        found["status"] = "missed: " + " and ".join(missed)
    return found


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each rnnserve series against Triton at every point of the run, and under perf_analyzer
    in each mode and concurrency; with a count of the points met for each series."""
    theirs = {(p["series"], p["sessions"]): p for p in results.get("triton", [])}
    if not theirs:  # Triton was not measured at all: nothing to compare with
        return {"must": MUST, "aim": AIM, "points": [], "perf_analyzer": [], "summary": {}}
    points = [
        {"server": name, "series": p["series"], "sessions": p["sessions"],
         **verdict(p, theirs.get((p["series"], p["sessions"])))}
        for name in OURS
        for p in sorted(results.get(name, []), key=_point_order)
    ]  # fmt: skip
    runs = results.get("peers", {}).get("perf_analyzer", {}).get("runs", [])
    triton_runs = {(r["mode"], r["concurrency"]): r for r in runs if r["server"] == "triton"}
    perf = [
        {"server": r["server"], "mode": r["mode"], "concurrency": r["concurrency"],
         **verdict(r, triton_runs.get((r["mode"], r["concurrency"])))}
        for name in OURS
        for r in runs
        if r["server"] == name and not r.get("unsupported")
    ]  # fmt: skip
    summary = {
        name: {"points": _count(points, name), "perf_analyzer": _count(perf, name)}
        for name in OURS
        if any(p["server"] == name for p in points + perf)
    }
    return {"must": MUST, "aim": AIM, "points": points, "perf_analyzer": perf, "summary": summary}


def _count(verdicts: list[dict[str, Any]], name: str) -> dict[str, int]:
    mine = [v for v in verdicts if v["server"] == name]
    compared = [v for v in mine if v["must"] is not None]
    return {
        "measured": len(mine),
        "comparable": len(compared),
        "must_met": sum(bool(v["must"]) for v in compared),
        "aim_met": sum(bool(v["aim"]) for v in compared),
    }


def main_series(results: dict[str, Any]) -> str:
    """The rnnserve series the headline speaks for: the native one, where it was measured."""
    return next((name for name in OURS if results.get(name)), OURS[0])


def headline(results: dict[str, Any], sessions: int) -> dict[str, Any]:
    """E: rnnserve over the transport ceiling; R: rnnserve over in-process ONNX Runtime; each
    rnnserve series over Triton at one and `sessions` sequences.

    E and R are the main series' (`main_series`) at `sessions` sequences sending one step per
    request over the stream, against the ceiling's messages/s with the same client, and against
    ONNX Runtime at batch 1, T=1.
    """
    main = main_series(results)
    served = _find(results[main], series=HEADLINE_SERIES, sessions=sessions)
    transport = _find(results["transport"], series=HEADLINE_SERIES, sessions=sessions)
    alone = _find(results["inprocess"], batch=1, steps=1)
    return {
        "sessions": sessions,
        "main": main,
        "triton": {
            name: _against_triton(results, name, sorted({1, sessions}))
            for name in OURS
            if results.get(name)
        },
        "targets": results.get("targets", {}).get("summary", {}),
        "perf_analyzer": [
            {k: v[k] for k in ("server", "mode", "concurrency", "ratio", "status")}
            for v in results.get("targets", {}).get("perf_analyzer", [])
        ],
        "E": _ratio(served["steps_per_s"], transport["requests_per_s"]),
        "R": _ratio(served["steps_per_s"], alone["steps_per_s"]),
        "rnnserve_steps_per_s": served["steps_per_s"],
        "transport_messages_per_s": transport["requests_per_s"],
        "inprocess_steps_per_s": alone["steps_per_s"],
    }


def _against_triton(
    results: dict[str, Any], name: str, sessions: list[int]
) -> list[dict[str, Any]]:
    """A series' steps/s over Triton's at each of `sessions`, where both were measured."""
    found = []
    for n in sessions:
        try:
            theirs = _find(results.get("triton", []), series=HEADLINE_SERIES, sessions=n)
            ours = _find(results[name], series=HEADLINE_SERIES, sessions=n)
        except LookupError:
            continue
        found.append(
            {
                "sessions": n,
                "ratio": _ratio(ours["steps_per_s"], theirs["steps_per_s"]),
                "steps_per_s": ours["steps_per_s"],
                "triton_steps_per_s": theirs["steps_per_s"],
                "p99_ms": ours["p99_ms"],
                "triton_p99_ms": theirs["p99_ms"],
                "triton_valid": valid(theirs),
            }
        )
    return found


def server_cpu(results: dict[str, Any], sessions: int) -> dict[str, dict[str, float]]:
    """Each server's CPU per step (user + system, from /proc, over the steps answered), in µs,
    for each series at `sessions` sequences."""
    found: dict[str, dict[str, float]] = {}
    for name in SERVERS:
        for p in results.get(name, []):
            if p["sessions"] == sessions and p["server_cpu_s_per_1000_steps"] is not None:
                found.setdefault(name, {})[p["series"]] = p["server_cpu_s_per_1000_steps"] * 1e3
    return found


def headline_lines(figures: dict[str, Any]) -> tuple[str, ...]:
    n = figures["sessions"]
    lines = []
    for name, against in figures.get("triton", {}).items():
        if not against:
            continue
        versus = ", ".join(
            f"{f['ratio']:.2f} at {f['sessions']} sequence{'s' if f['sessions'] > 1 else ''} "
            f"({f['steps_per_s']:,.0f} / {f['triton_steps_per_s']:,.0f} steps/s, p99 "
            f"{f['p99_ms']:.2f} / {f['triton_p99_ms']:.2f} ms"
            f"{'' if f['triton_valid'] else ', Triton crashed or had errors'})"
            for f in against
        )
        count = figures.get("targets", {}).get(name, {}).get("points")
        met = (
            f"; Must met at {count['must_met']} of {count['comparable']} comparable points, "
            f"Aim at {count['aim_met']}"
            if count
            else ""
        )
        lines.append(f"{name} ({TRANSPORTS[name]}) / Triton {versus} (stream T=1){met}")
    for name in OURS:
        cells = [v for v in figures.get("perf_analyzer", []) if v["server"] == name]
        if cells:
            lines.append(
                f"perf_analyzer, {name} / Triton: "
                + ", ".join(f"{v['mode']} {v['concurrency']}: {_num(v['ratio'], 2)}" for v in cells)
            )
    main = figures.get("main", OURS[0])
    return (
        *lines,
        f"E = {figures['E']:.2f}  {main} {figures['rnnserve_steps_per_s']:,.0f} steps/s "
        f"({n} sequences, 1 step per request, stream) / transport-only ceiling "
        f"{figures['transport_messages_per_s']:,.0f} messages/s ({n} streams, same client)",
        f"R = {figures['R']:.2f}  {main} {figures['rnnserve_steps_per_s']:,.0f} steps/s "
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
        f"{options.get('repeats', 1)} rounds per point; the run took "
        f"{_num(results.get('seconds'))} s. CPU is seconds per 1,000 steps unless said.",
        *_servers_line(results),
        *_targets_section(results),
        *_perf_analyzer_section(results),
        *_server_cpu_section(results),
        *_scale_section(results),
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
        "`of ceiling` is rnnserve's requests/s over the transport's at the same point. "
        "A point marked ✗ crashed or had errors in the round its figures come from.",
        "",
    ]
    ceiling = {(p["series"], p["sessions"]): p for p in results["transport"]}
    rows = []
    served = _served(results)
    for p in sorted(served, key=lambda p: (*_point_order(p), _server_order(p))):
        echo = ceiling.get((p["series"], p["sessions"]))
        share = (
            _num(p["requests_per_s"] / echo["requests_per_s"], 2)
            if p["server"] in OURS and echo and echo["requests_per_s"]
            else ""
        )
        rows.append(
            [
                p["server"] + ("" if valid(p) else " ✗"), p["series"], str(p["sessions"]),
                _num(p["steps_per_s"]), _num(p["requests_per_s"]), share, _num(p["p50_ms"], 2),
                _num(p["p90_ms"], 2), _num(p["p99_ms"], 2), _num(p["mean_batch"], 1),
                _num(p["server_cpu_s_per_1000_steps"], 4),
                _num(p["client_cpu_s_per_1000_steps"], 4), str(p["errors"]) + _crashes(p),
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
    lines += _crash_lines(results)
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
        elif name == "perf_analyzer":
            lines.append(
                f"- perf_analyzer ({peer['binary']}), against each server (above): sequences "
                f"of {peer['sequence_length']} steps, one per request, {peer['trials']} windows "
                f"of {peer['interval_s']:g} s"
            )
    lines += ["", "## Headline", "", *(f"- {line}" for line in headline_lines(results["headline"]))]
    return "\n".join(lines)


def _servers_line(results: dict[str, Any]) -> list[str]:
    """Which transport each rnnserve series was served through (from its start line)."""
    servers = results.get("servers", {})
    parts = []
    for name in OURS:
        info = servers.get(name, {})
        if "skipped" in info:
            parts.append(f"`{name}`: not measured ({info['skipped']})")
        elif info:
            parts.append(f"`{name}` is rnnserve serving through `--transport {info['transport']}`")
    return ["", "; ".join(parts) + "."] if parts else []


def _targets_section(results: dict[str, Any]) -> list[str]:
    """The table the report leads with: each rnnserve series over Triton at every point."""
    found = results.get("targets")
    if not found or not found["points"]:
        why = results.get("peers", {}).get("triton", {}).get("skipped", "not measured")
        return [
            "",
            "## Against Triton: the targets",
            "",
            f"Triton: skipped ({why.splitlines()[0]}).",
        ]
    names = [name for name in OURS if any(v["server"] == name for v in found["points"])]
    lines = [
        "",
        "## Against Triton: the targets",
        "",
        f"Must: at least {found['must']:g}x Triton's steps/s with a p99 no higher, at every "
        f"point; Aim: {found['aim']:g}x its steps/s with a p99 no higher. Each rnnserve series "
        "is measured at every point in the same rounds as Triton and the transport ceiling. A "
        "cell gives rnnserve's steps/s over Triton's, then p99 in ms (rnnserve / Triton). A "
        "point where Triton crashed or had errors in its measured round is not comparable; "
        "rnnserve's own errors miss the targets.",
        "",
    ]
    for name in names:
        count = found["summary"][name]["points"]
        verdict_ = (
            "met" if count["comparable"] and count["must_met"] == count["comparable"] else "not met"
        )
        lines.append(
            f"- **{name}** ({TRANSPORTS[name]}): Must {verdict_}: met at {count['must_met']} of "
            f"{count['comparable']} comparable points ({count['measured']} measured); Aim met "
            f"at {count['aim_met']}."
        )
    by_point: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for v in found["points"]:
        by_point.setdefault((v["series"], v["sessions"]), {})[v["server"]] = v
    rows = []
    for (series, sessions), verdicts in sorted(
        by_point.items(), key=lambda item: (_series_order(item[0][0]), item[0][1])
    ):
        row = [series, str(sessions)]
        for name in names:
            row += _verdict_cells(verdicts.get(name))
        rows.append(row)
    header = ["series", "sessions"]
    for name in names:
        header += [f"{name} / Triton", "p99 ms", "target"]
    return [*lines, "", *_table(header, rows)]


def _verdict_cells(v: dict[str, Any] | None) -> list[str]:
    if v is None:
        return ["", "", ""]
    return [
        f"**{_ratio_text(v['ratio'])}**",
        f"{_num(v['p99_ms'], 2)} / {_num(v['triton_p99_ms'], 2)}",
        v["status"],
    ]


def _ratio_text(ratio: float) -> str:
    """Two decimals, or three where two would round onto a target it misses (0.996 -> 0.996,
    not 1.00)."""
    near = any(abs(ratio - target) < 0.005 for target in (MUST, AIM))
    return _num(ratio, 3 if near else 2)


def _perf_analyzer_section(results: dict[str, Any]) -> list[str]:
    peer = results.get("peers", {}).get("perf_analyzer", {})
    if not peer:
        return []
    lines = ["", "## perf_analyzer against each server", ""]
    if "skipped" in peer:
        return [*lines, f"Skipped ({peer['skipped'].splitlines()[0]})."]
    verdicts = {
        (v["server"], v["mode"], v["concurrency"]): v
        for v in results.get("targets", {}).get("perf_analyzer", [])
    }
    runs = {(r["server"], r["mode"], r["concurrency"]): r for r in peer["runs"]}
    names = [n for n in (*OURS, "triton") if any(r["server"] == n for r in peer["runs"])]
    lines.append(
        "Triton's own load generator, unchanged, against each server in turn in the same run "
        f"(the order alternating): {peer['sequence_length']}-step sequences, one step per "
        "request, as one ModelInfer call each (`unary`, its default), over one stream per "
        "sequence (`--streaming`), or as one HTTP request each (`http`, `-i http`: the KServe "
        "v2 REST protocol; grpc.aio serves none); "
        f"{peer['trials']} windows of {peer['interval_s']:g} s. "
        "Each server's cell: steps/s, p99 ms; then its ratio to Triton and the target."
    )
    rows = []
    cells = {(r["mode"], r["concurrency"]) for r in peer["runs"]}
    for mode, concurrency in sorted(cells, key=lambda c: (_mode_order(c[0]), c[1])):
        row = [mode, str(concurrency)]
        for name in names:
            run = runs.get((name, mode, concurrency))
            row.append(_perf_cell(run))
            if name != "triton":
                row += _verdict_cells(verdicts.get((name, mode, concurrency)))[::2]
        rows.append(row)
    header = ["mode", "concurrency"]
    for name in names:
        header += [name] if name == "triton" else [name, f"{name} / Triton", "target"]
    lines += ["", *_table(header, rows)]
    failures = [r for r in peer["runs"] if "failed" in r]
    lines += [f"- {r['server']} {r['mode']} {r['concurrency']}: {r['failed']}" for r in failures]
    return lines


def _mode_order(mode: str) -> int:
    return PERF_ANALYZER_MODES.index(mode) if mode in PERF_ANALYZER_MODES else 99


def _perf_cell(run: dict[str, Any] | None) -> str:
    if run is None:
        return ""
    if "skipped" in run:
        return "not measured"
    if "failed" in run:
        return "failed" + (" (crashed)" if run.get("crashed") else "")
    crashed = " ✗ (crashed)" if run.get("crashed") else ""
    return f"{_num(run['steps_per_s'])}, {_num(run['p99_ms'], 2)}{crashed}"


def _server_cpu_section(results: dict[str, Any]) -> list[str]:
    sessions = results.get("headline", {}).get("sessions")
    found = results.get("server_cpu_us_per_step")
    if not found or sessions is None:
        return []
    series = sorted({s for by_series in found.values() for s in by_series}, key=_series_order)
    lines = [
        "",
        f"## Server CPU per step at {sessions} sequences",
        "",
        "µs of CPU (user + system, all the server's threads, from /proc) per step answered, "
        "over the median round's window.",
        "",
    ]
    rows = [[name, *(_num(by.get(s), 1) for s in series)] for name, by in found.items()]
    return lines + _table(["server", *series], rows)


def _scale_section(results: dict[str, Any]) -> list[str]:
    found = results.get("scale")
    if not found:
        return []
    lines = ["", f"## Scale: {found.get('streams', 0):,} streams on one rnnserve (native)", ""]
    if "skipped" in found:
        return [*lines, f"Skipped ({found['skipped']})."]
    if "failed" in found:
        return [*lines, f"Failed: {found['failed']} {found.get('death', '')}".rstrip()]
    lines.append(
        f"A fresh server (`--transport native`): {found['idle_sequences']:,} idle sequences "
        f"opened (a START each, never ended; {found['seconds_to_open_idle']:g} s), then "
        f"{found['streams']:,} streams in closed loops on {found['channels']} channel(s), each its "
        f"own sequence, for one window of {results['options']['duration_s']:g} s "
        f"({found['streams_in_window'][0]:,} streams running as it opened, "
        f"{found['streams_in_window'][1]:,} as it closed). {found['seconds']:g} s in all."
    )
    errors = str(found["errors"])
    if found["errors"]:
        errors += f" (first: {found['first_error']})"
    if found.get("crashed"):
        errors += f"; the server {found['crashed']}"
    rss = ", ".join(
        _num(found[k], 1)
        for k in ("rss_start_mib", "rss_idle_mib", "rss_streams_mib", "rss_after_mib")
    )
    rows = [
        [
            "RSS per idle sequence",
            f"{_num(found['rss_per_idle_sequence_bytes'])} bytes (its state: "
            f"{found['state_bytes_per_sequence']:,} bytes)",
        ],
        [
            "RSS per open stream, its sequence included",
            f"{_num(found['rss_per_open_stream_bytes'])} bytes",
        ],
        [
            "RSS at start, with the idle sequences, with the streams running, after; peak",
            f"{rss}; {_num(found['rss_peak_mib'], 1)} MiB",
        ],
        ["steps/s", _num(found["steps_per_s"])],
        ["p50 / p99 ms", f"{_num(found['p50_ms'], 1)} / {_num(found['p99_ms'], 1)}"],
        ["server CPU per step", f"{_num(found['server_cpu_s_per_1000_steps'] * 1e3, 1)} µs"],
        ["errors", errors],
    ]
    return [*lines, "", *_table(["", ""], rows)]


def _crash_lines(results: dict[str, Any]) -> list[str]:
    """The crashes of rnnserve's servers and the transport's (Triton's are in its section)."""
    lines = []
    for name, info in results.get("servers", {}).items():
        for c in info.get("crashes", []):
            lines.append(
                f"- {name}, {c['series']}, {c['sessions']} sessions, {c['when']}: {c['death']}; "
                "started again"
            )
        if info.get("stopped") and "skipped" not in info:
            lines.append(f"- {name} was not measured after that: it {info['stopped']}")
    return ["", "Servers that died during the run:", "", *lines] if lines else []


def _torchserve_line(peer: dict[str, Any], results: dict[str, Any]) -> str:
    main = main_series(results)
    ours = _find(results[main], series=peer["series"], sessions=peer["sessions"])
    settings = peer["settings"]
    return (
        f"- torchserve 0.12, the same model file on ONNX Runtime behind its sequence batching "
        f"({settings['maxWorkers']} worker, batches of up to {settings['batchSize']}, "
        f"{settings['maxBatchDelay']} ms batch delay), {peer['sessions']} sequences, one step "
        f"per request (stream), same client: {_num(peer['steps_per_s'])} steps/s, "
        f"p50 {_num(peer['p50_ms'], 2)} ms, p99 {_num(peer['p99_ms'], 2)} ms, server CPU "
        f"{_num(peer['server_cpu_s_per_1000_steps'], 4)} s/1k steps, {peer['errors']} errors"
        f"{' (it crashed)' if peer.get('crashed') else ''}. {main} at the same point: "
        f"{_ratio(ours['steps_per_s'], peer['steps_per_s']):.1f}x its steps/s"
    )


def _thread_table(points: list[dict[str, Any]]) -> list[str]:
    """Where each server's CPU goes, by kind of thread, for the streams of one step."""
    shown = [p for p in points if p["series"] == HEADLINE_SERIES and p.get(THREADS)]
    if not shown:
        return []
    lines = [
        "",
        "## Server CPU by thread (stream T=1)",
        "",
        "µs of CPU per step. `event loop` is the process's first thread; `batch` the batch "
        "workers (the model call runs there); `transport` gRPC's core threads, or the native "
        "transport's (rnnserve-io); `other` mostly ONNX Runtime's thread pools and grpc.aio's "
        "poller. Triton's threads all count as `other`.",
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
    header = ["server", "sessions", "event loop", "batch", "transport", "other", "all"]
    return lines + _table(header, rows)


def _served(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The points measured over gRPC at every sessions value: rnnserve's on each transport,
    Triton's, the transport ceiling's."""
    return [p for name in SERVERS for p in results.get(name, [])]


def _server_order(point: dict[str, Any]) -> int:
    return SERVERS.index(point["server"]) if point["server"] in SERVERS else len(SERVERS)


def _point_order(point: dict[str, Any]) -> tuple[tuple[int, str], int]:
    return (_series_order(point["series"]), point["sessions"])


def _triton_section(results: dict[str, Any]) -> list[str]:
    """Each rnnserve series against Triton point by point, with the range over the rounds."""
    peer = results["peers"].get("triton", {"skipped": "not measured"})
    if "skipped" in peer:  # said where the report leads
        return []
    theirs = {(p["series"], p["sessions"]): p for p in results.get("triton", [])}
    rows = []
    for name in OURS:
        for p in sorted(results.get(name, []), key=_point_order):
            t = theirs.get((p["series"], p["sessions"]))
            if t is None:
                continue
            rows.append(
                [
                    name, p["series"], str(p["sessions"]), _spread(p, "steps_per_s"),
                    _spread(t, "steps_per_s"),
                    _num(_ratio(p["steps_per_s"], t["steps_per_s"]), 2), _paired(p, t),
                    _spread(p, "p99_ms", 2), _spread(t, "p99_ms", 2),
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
        "The same client, model repository and sequences; at each point both rnnserve series, "
        "Triton and the transport ceiling run back to back, in rounds that alternate their "
        "order. Each figure is that of the round with the median steps/s, with the range over "
        "the rounds in brackets; `per round` is the range of rnnserve / Triton over the rounds, "
        "each round's two measurements taken a few seconds apart. Triton's settings, from its "
        f"ModelConfig of the model: instance group {groups}, max batch size "
        f"{s['max_batch_size']}, sequence batcher `{s['scheduler']}` (preferred batch sizes "
        f"{s['preferred_batch_size']}, max queue delay {s['max_queue_delay_microseconds']} µs, "
        f"{s['max_candidate_sequences']} candidate sequences): its defaults for the "
        "repository's config.pbtxt.",
        "",
    ]
    lines += _table(
        [
            "rnnserve series", "series", "sessions", "rnnserve steps/s", "Triton steps/s",
            "rnnserve / Triton", "per round", "rnnserve p99 ms", "Triton p99 ms",
            "rnnserve CPU", "Triton CPU", "Triton errors",
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
STYLES = {
    "rnnserve": ("-", "o", "C0"),
    "rnnserve-grpcio": ("-", "D", "C1"),
    "triton": ("-.", "^", "C2"),
    "transport": ("--", "s", "C7"),
}
"""Line, marker and colour of each server's lines."""
INVALID: dict[str, Any] = {
    "marker": "x",
    "linestyle": "none",
    "markersize": 10,
    "markeredgewidth": 2,
}
"""How a point that crashed or had errors is drawn: a cross in its server's colour, off the line."""
INVALID_LABEL = "x: crashed or had errors (not a valid figure)"


def drawn(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """A line's points as the plots draw them: x, y with NaN at each invalid point (which breaks
    the line there), and the y of the invalid points, drawn apart as crosses."""
    xs = [float(p["sessions"]) for p in points]
    ys = [p[key] if valid(p) and p[key] is not None else math.nan for p in points]
    bad = [p[key] if p[key] is not None else math.nan for p in points]
    return xs, ys, [b if not valid(p) else math.nan for p, b in zip(points, bad, strict=True)]


def plot(results: dict[str, Any], out: Path) -> tuple[Path, ...]:
    """throughput.png and latency.png: one panel per series, a line per server; a point that
    crashed or had errors is a red cross off its line, and the legends sit outside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({p["series"] for p in _served(results)}, key=_series_order)
    if not series:
        return ()
    width = 4.6 * len(series)
    sessions = sorted({p["sessions"] for p in _served(results)})

    figure, panels = plt.subplots(1, len(series), figsize=(width, 4.4), squeeze=False)
    for axes, label in zip(panels[0], series, strict=True):
        for server, points in _lines(results, label):
            _draw(axes, server, points, "steps_per_s", STYLES[server][0], server)
        steps = int(label.rsplit("T=", 1)[1])
        for p in results["inprocess"]:
            if p["batch"] == 1 and p["steps"] == steps:
                axes.axhline(p["steps_per_s"], color="grey", linewidth=0.8, linestyle=":")
                axes.annotate(
                    f"in-process ORT, batch 1, T={steps}", (1, p["steps_per_s"]),
                    fontsize=7, color="grey", va="bottom",
                )  # fmt: skip
        _axes(axes, label, "steps/s (messages/s x T for transport)", sessions)
    throughput = _save(
        figure, f"{results['model']['name']}: throughput", out / "throughput.png", ncol=5
    )

    figure, panels = plt.subplots(1, len(series), figsize=(width, 4.4), squeeze=False)
    for axes, label in zip(panels[0], series, strict=True):
        for server, points in _lines(results, label):
            _draw(axes, server, points, "p50_ms", STYLES[server][0], f"{server} p50")
            _draw(axes, server, points, "p99_ms", ":", f"{server} p99")
        _axes(axes, label, "latency per request, ms", sessions)
    latency = _save(
        figure,
        f"{results['model']['name']}: latency per request, p50 (solid) and p99 (dotted)",
        out / "latency.png",
        ncol=5,
    )
    return throughput, latency


def _draw(
    axes: Any, server: str, points: list[dict[str, Any]], key: str, line: str, label: str
) -> None:
    _, marker, colour = STYLES[server]
    xs, ys, bad = drawn(points, key)
    axes.plot(xs, ys, linestyle=line, marker=marker, color=colour, label=label)
    if any(math.isfinite(b) for b in bad):
        axes.plot(xs, bad, color=colour, label=INVALID_LABEL, **INVALID)


def _lines(results: dict[str, Any], label: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each server's points of one series, in the order of their sessions."""
    found = []
    for server in SERVERS:
        points = sorted(
            (p for p in results.get(server, []) if p["series"] == label),
            key=lambda p: p["sessions"],
        )
        if points:
            found.append((server, points))
    return found


def _axes(axes: Any, title: str, ylabel: str, sessions: list[int]) -> None:
    """Log-log against concurrent sequences (ticked where measured), gridded."""
    from matplotlib.ticker import NullLocator

    axes.set(xscale="log", yscale="log", xlabel="concurrent sequences", ylabel=ylabel, title=title)
    axes.set_xticks(sessions, [f"{n:,}" for n in sessions])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.grid(True, which="both", linewidth=0.3)


def _save(figure: Any, title: str, path: Path, ncol: int) -> Path:
    """One legend for the figure, below the panels (off the data), written as a PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    handles: dict[str, Any] = {}
    for axes in figure.axes:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if INVALID_LABEL in handles:  # one entry for every server's crosses, last
        del handles[INVALID_LABEL]
        handles[INVALID_LABEL] = Line2D([], [], color="black", **INVALID)
    figure.suptitle(title)
    figure.tight_layout()
    figure.legend(
        list(handles.values()), list(handles), loc="upper center", ncol=ncol, fontsize=8,
        bbox_to_anchor=(0.5, 0.0), frameon=False,
    )  # fmt: skip
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
