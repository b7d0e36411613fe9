"""One benchmark run: in-process ONNX Runtime, rnnserve over gRPC, the real Triton, the
transport-only ceiling and the other peers, one after another on the same machine, so the
figures compare."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rnnserve.runtime.onnx import EngineSettings, Provider
from rnnserve_bench import inprocess, machine, peers, report, torchserve, triton
from rnnserve_bench.loadgen import (
    OPEN_INFERENCE,
    STREAM,
    UNARY,
    LoadResult,
    LoadSpec,
    Snapshot,
    StreamApi,
    run_load,
)
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import (
    Measured,
    ProcessError,
    Restartable,
    histogram_totals,
    start_echo,
    start_rnnserve,
)
from rnnserve_bench.workload import SequenceMessages, Workload, load_workload

logger = logging.getLogger(__name__)

FIRST_SEQUENCE_ID = 1_000_000
"""Above the ids perf_analyzer uses (from 1)."""
SETTLE_S = 0.2
"""Pause between points, so one point's END requests do not run into the next one's clock."""
CHANNEL_SESSIONS = 64
"""The transport ceiling is measured with one channel per this many sequences too."""
CONTENDERS = ("rnnserve", "triton", "transport")
"""Measured at each point in this order, then in the reverse order at the next."""
LOG_TAIL_LINES = 40
"""Lines of a crashed peer's log kept in the results."""


class ServerDied(ProcessError):
    """A server was found dead at the end of a point; `result` is what the point measured."""

    def __init__(self, server: Measured, series: Series, result: LoadResult) -> None:
        super().__init__(f"{server.name} died during {series.label}:\n{server.log_tail()}")
        self.result = result


@dataclass(frozen=True)
class Series:
    mode: str
    steps: int

    @property
    def label(self) -> str:
        return f"{self.mode} T={self.steps}"


@dataclass(frozen=True)
class BenchReport:
    results: dict[str, Any]
    markdown: str
    headline: tuple[str, ...]
    files: tuple[Path, ...]


@dataclass
class PeerRun:
    """A peer through one run: its points, and the crashes it was restarted after."""

    server: Restartable | None
    """None once it could not be started again."""
    points: list[dict[str, Any]] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    """Why it was not measured after some point ("" while it is)."""


@dataclass
class _Ids:
    """Sequence ids handed out so far: every point gets ids of its own."""

    next: int = FIRST_SEQUENCE_ID

    def take(self, count: int) -> int:
        first = self.next
        self.next += count
        return first


def series_of(options: BenchOptions) -> list[Series]:
    series = [Series(STREAM, t) for t in options.steps]
    if options.unary:
        series.insert(1, Series(UNARY, 1))
    return series


def run(options: BenchOptions) -> BenchReport:
    workload = load_workload(options.repository, options.model)
    options.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "options": _jsonable(asdict(options)),
        "model": {"name": workload.model, "version": workload.version},
    }
    results["inprocess"] = _run_inprocess(options, workload)
    results.update(_run_servers(options, workload))
    results["headline"] = report.headline(results, options.headline_sessions)
    results["seconds"] = round(time.monotonic() - started, 1)
    files = report.write(results, options.out)
    return BenchReport(
        results=results,
        markdown=report.markdown(results),
        headline=report.headline_lines(results["headline"]),
        files=files,
    )


def _run_inprocess(options: BenchOptions, workload: Workload) -> list[dict[str, Any]]:
    settings = EngineSettings(
        Provider(options.provider),
        intra_op_threads=options.intra_op_threads or None,
        inter_op_threads=options.inter_op_threads or None,
    )
    runtime = inprocess.open_runtime(workload, settings)
    points = []
    for steps in options.steps:
        for batch in options.batches:
            result = inprocess.measure(
                runtime, workload, batch, steps, options.warmup_s, options.duration_s
            )
            logger.info("in-process batch %d T=%d: %.0f steps/s", batch, steps, result.steps_per_s)
            points.append(
                {
                    "provider": runtime.provider,
                    "batch": batch,
                    "steps": steps,
                    "calls": result.calls,
                    "seconds": result.seconds,
                    "calls_per_s": result.calls_per_s,
                    "steps_per_s": result.steps_per_s,
                    "call_p50_ms": result.percentile_ms(50),
                    "call_p99_ms": result.percentile_ms(99),
                    "cpu_s_per_1000_steps": result.cpu_per_1000_steps,
                }
            )
    return points


def _server_flags(options: BenchOptions) -> list[str]:
    flags = [f"--provider={options.provider}"]
    if options.intra_op_threads:
        flags.append(f"--intra-op-threads={options.intra_op_threads}")
    if options.inter_op_threads:
        flags.append(f"--inter-op-threads={options.inter_op_threads}")
    return [*flags, *options.server_args]  # the caller's flags come last and win


def _run_servers(options: BenchOptions, workload: Workload) -> dict[str, Any]:
    """rnnserve, Triton, the transport-only server and TorchServe, all started first and
    measured point by point: each rnnserve point right next to Triton's and the transport's,
    in alternating order.

    The machine's speed drifts over minutes (on the shared VM, the transport's figures once
    doubled from one part of a run to the next), and E and the Triton ratios compare these.
    """
    logs, ids = options.out / "logs", _Ids()
    ours: list[dict[str, Any]] = []
    transport: list[dict[str, Any]] = []
    found: dict[str, Any] = {}
    with ExitStack() as stack:
        server = stack.enter_context(start_rnnserve(logs, _server_flags(options)))
        echoes = {
            steps: stack.enter_context(start_echo(logs, options.repository, workload.model, steps))
            for steps in options.steps
        }
        started = _start_triton(options, workload, stack)
        if isinstance(started, str):
            found["triton"] = {"skipped": started}
            rival = PeerRun(None, stopped=started)
        else:
            found["triton"] = {
                "version": triton.VERSION,
                "settings": triton.settings(started.model_config(workload.model)),
            }
            rival = PeerRun(started)
        peer = _start_torchserve(options, workload, stack)
        if isinstance(peer, str):
            found["torchserve"] = {"skipped": peer}
        sample_ours = _sampler(server, server.scrape, workload.model)
        turn = 0
        for series in series_of(options):
            for sessions in options.sessions:
                echo = echoes[series.steps]
                plain = {
                    "rnnserve": (server, sample_ours),
                    "transport": (echo, _sampler(echo)),
                }
                rounds = _rounds(options, workload, plain, rival, series, sessions, ids, turn)
                turn += options.repeats
                for name, points in (("rnnserve", ours), ("triton", rival.points)):
                    if rounds[name]:
                        points.append(median_point(rounds[name]))
                transport.append(median_point(rounds["transport"]))
                headline = (report.HEADLINE_SERIES, options.headline_sessions)
                if not isinstance(peer, str) and (series.label, sessions) == headline:
                    found["torchserve"] = _torchserve_point(options, workload, peer, ids)
        found.setdefault("torchserve", {"skipped": "the headline point was not measured"})
        channels = _compare_channels(options, workload, echoes.get(1), ids)
        if options.peers:
            found["perf_analyzer"] = peers.perf_analyzer(
                server.target,
                workload,
                options.headline_sessions,
                max(options.duration_s / 2, 0.5),
                options.out,
            )
        else:
            found["perf_analyzer"] = {"skipped": "--no-peers"}
    if "skipped" not in found["triton"]:
        found["triton"].update(crashes=rival.crashes, stopped=rival.stopped)
    return {
        "rnnserve": ours,
        "triton": rival.points,
        "transport": transport,
        "channels": channels,
        "peers": found,
    }


def _rounds(
    options: BenchOptions,
    workload: Workload,
    plain: dict[str, tuple[Measured, Callable[[], Snapshot]]],
    rival: PeerRun,
    series: Series,
    sessions: int,
    ids: _Ids,
    turn: int,
) -> dict[str, list[dict[str, Any]]]:
    """Each contender's measurements of one point, `options.repeats` rounds of them, the order
    reversed from one round to the next (the first round's order set by `turn`)."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for round_ in range(options.repeats):
        for name in CONTENDERS[:: 1 if (turn + round_) % 2 == 0 else -1]:
            if name == "triton":
                measured = peer_point(options, workload, rival, series, sessions, ids)
                if measured is not None:
                    rounds[name].append(measured)
                continue
            target, sample = plain[name]
            result = _point(options, workload, target, series, sessions, ids, sample)
            rounds[name].append(_load_point(name, series, result))
    return rounds


def _start_triton(
    options: BenchOptions, workload: Workload, stack: ExitStack
) -> triton.Triton | str:
    """Triton serving the model repository, stopped with `stack`; or why it is not measured."""
    if not options.peers:
        return "--no-peers"
    found = triton.find(options.triton or triton.DEFAULT_RUN)
    if isinstance(found, str):
        return found
    try:
        return stack.enter_context(
            triton.Triton(found, options.repository, options.out / "logs" / "triton")
        )
    except (OSError, ProcessError) as error:
        logger.warning("triton did not start: %s", error)
        return f"triton did not start: {str(error).splitlines()[0]}"


def peer_point(
    options: BenchOptions,
    workload: Workload,
    peer: PeerRun,
    series: Series,
    sessions: int,
    ids: _Ids,
) -> dict[str, Any] | None:
    """One point of a peer that may crash: a crash is recorded and the peer started again, so
    the run goes on (Triton 2.51 has died of SIGSEGV under heavy streaming). None when the
    peer could not be started again."""
    server = peer.server
    if server is None:
        return None
    if not server.alive():  # between points
        _crashed(peer, server, series, sessions, "between points")
        server = peer.server
        if server is None:
            return None
    try:
        result = _point(options, workload, server, series, sessions, ids, _sampler(server))
    except ServerDied as died:
        point = _load_point(server.name, series, died.result)
        point["crashed"] = True
        _crashed(peer, server, series, sessions, "during the point")
        return point
    return _load_point(server.name, series, result)


def median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's point from its repeated measurements: the round with the median steps/s
    (the lower of the two middle ones for an even count) among the rounds in which it did not
    crash (all of them if it crashed in every one), with every round's steps/s and p99 beside
    it, the errors of all rounds, `crashed` if the server died in any and `crashed_rounds`."""
    clean = [p for p in rounds if not p.get("crashed", False)] or rounds
    ranked = sorted(clean, key=lambda p: p["steps_per_s"])
    point = dict(ranked[(len(ranked) - 1) // 2])
    point["rounds"] = len(rounds)
    point["steps_per_s_rounds"] = [p["steps_per_s"] for p in rounds]
    point["p99_ms_rounds"] = [p["p99_ms"] for p in rounds]
    point["errors"] = sum(p["errors"] for p in rounds)
    point["first_error"] = next((p["first_error"] for p in rounds if p["errors"]), "")
    point["crashed_rounds"] = len(rounds) - len(clean) if clean is not rounds else len(rounds)
    point["crashed"] = point["crashed_rounds"] > 0
    return point


def _crashed(peer: PeerRun, server: Restartable, series: Series, sessions: int, when: str) -> None:
    crash = {
        "series": series.label,
        "sessions": sessions,
        "when": when,
        "death": server.death(),
        "log_tail": server.log_tail(LOG_TAIL_LINES),
    }
    peer.crashes.append(crash)
    logger.warning(
        "%s %s at %s, %d sessions (%s); starting it again",
        server.name, crash["death"], series.label, sessions, when,
    )  # fmt: skip
    try:
        server.restart()
    except (OSError, ProcessError) as error:
        peer.server = None
        peer.stopped = f"did not start again after a crash: {str(error).splitlines()[0]}"
        logger.warning("%s %s", server.name, peer.stopped)


def _start_torchserve(
    options: BenchOptions, workload: Workload, stack: ExitStack
) -> torchserve.TorchServe | str:
    """TorchServe serving the model, stopped with `stack`; or why it is not measured."""
    if not options.peers:
        return "--no-peers"
    found = torchserve.find()
    if isinstance(found, str):
        return found
    binary, archiver = found
    workdir = options.out / "logs" / "torchserve"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        store = torchserve.package(workload, archiver, workdir, workload.max_batch_size)
        return stack.enter_context(torchserve.TorchServe(binary, store, workdir))
    except (OSError, subprocess.SubprocessError, ProcessError) as error:
        # A peer that does not start is reported, as a missing one is; rnnserve is still measured.
        logger.warning("torchserve did not start: %s", error)
        return f"torchserve did not start: {str(error).splitlines()[0]}"


def _torchserve_point(
    options: BenchOptions, workload: Workload, server: torchserve.TorchServe, ids: _Ids
) -> dict[str, Any]:
    """TorchServe at the headline point: the same model, sequences and client as rnnserve's."""
    series = Series(STREAM, 1)
    # Java compiles its hot code as it runs: a fresh JVM needs longer than Python to warm up.
    options = replace(options, warmup_s=max(options.warmup_s, torchserve.WARMUP_S))
    result = _point(
        options, workload, server, series, options.headline_sessions, ids, _sampler(server),
        messages_of=lambda sequence, steps: torchserve.messages(workload, sequence, steps),
        api=torchserve.STREAM,
    )  # fmt: skip
    point = _load_point("torchserve", series, result)
    point["settings"] = torchserve.settings(workload.max_batch_size)
    return point


def _compare_channels(
    options: BenchOptions, workload: Workload, echo: Measured | None, ids: _Ids
) -> list[dict[str, Any]]:
    """The transport ceiling with one channel per 64 sequences against one for all."""
    sessions = 256 if 256 in options.sessions else max(options.sessions)
    if echo is None or not options.compare_channels or sessions <= CHANNEL_SESSIONS:
        return []
    channels = []
    for per_channel in (CHANNEL_SESSIONS, sessions):
        result = _point(
            options, workload, echo, Series(STREAM, 1), sessions, ids, _sampler(echo), per_channel
        )
        channels.append(_load_point("transport", Series(STREAM, 1), result))
    return channels


def _sampler(
    server: Measured, scrape: Callable[[], str] | None = None, model: str = ""
) -> Callable[[], Snapshot]:
    """Counters at a window's edge; the batch sizes from `scrape`, rnnserve's /metrics."""

    def sample() -> Snapshot:
        batch = (0.0, 0.0)
        if scrape is not None:
            batch = histogram_totals(scrape(), "rnnserve_batch_size", model)
        return Snapshot(
            time.perf_counter(),
            time.process_time(),
            server.cpu_seconds(),
            *batch,
            server_threads=server.cpu_by_thread(),
        )

    return sample


def _point(
    options: BenchOptions,
    workload: Workload,
    server: Measured,
    series: Series,
    sessions: int,
    ids: _Ids,
    sample: Callable[[], Snapshot],
    sessions_per_channel: int | None = None,
    messages_of: Callable[[int, int], SequenceMessages] | None = None,
    api: StreamApi = OPEN_INFERENCE,
) -> LoadResult:
    first = ids.take(sessions)
    spec = LoadSpec(
        mode=series.mode,
        sessions=sessions,
        steps=series.steps,
        warmup_s=options.warmup_s,
        duration_s=options.duration_s,
        sessions_per_channel=sessions_per_channel or options.sessions_per_channel,
        first_id=first,
        metadata=(("authorization", f"Bearer {options.token}"),) if options.token else (),
    )
    encode = messages_of or workload.messages
    messages = [encode(first + i, series.steps) for i in range(sessions)]
    result = asyncio.run(run_load(server.target, spec, messages, sample, api))
    if not server.alive():
        raise ServerDied(server, series, result)
    logger.info(
        "%s %s, %d sessions on %d channels: %.0f steps/s, p50 %.2f ms, p99 %.2f ms, %d errors%s",
        server.name,
        series.label,
        sessions,
        result.channels,
        result.steps_per_s,
        result.percentile_ms(50),
        result.percentile_ms(99),
        result.errors,
        f" (first: {result.first_error})" if result.errors else "",
    )
    time.sleep(SETTLE_S)
    return result


def _load_point(server: str, series: Series, result: LoadResult) -> dict[str, Any]:
    return {
        "server": server,
        "series": series.label,
        "mode": series.mode,
        "steps": series.steps,
        "sessions": result.spec.sessions,
        "channels": result.channels,
        "requests": result.requests,
        "errors": result.errors,
        "first_error": result.first_error,
        "window_s": result.window_s,
        "requests_per_s": result.requests_per_s,
        "steps_per_s": result.steps_per_s,
        "p50_ms": result.percentile_ms(50),
        "p90_ms": result.percentile_ms(90),
        "p99_ms": result.percentile_ms(99),
        "mean_batch": result.mean_batch if server == "rnnserve" else None,
        "server_cpu_s_per_1000_steps": result.cpu_per_1000_steps("server_cpu_s"),
        "server_cpu_by_thread_s_per_1000_steps": result.thread_cpu_per_1000_steps(),
        "client_cpu_s_per_1000_steps": result.cpu_per_1000_steps("client_cpu_s"),
        "server_cpu_cores": _cores(result, "server_cpu_s"),
        "client_cpu_cores": _cores(result, "client_cpu_s"),
        "response_bytes": result.response_bytes,
    }


def _cores(result: LoadResult, which: str) -> float:
    used: float = getattr(result.after, which) - getattr(result.before, which)
    return used / result.window_s if result.window_s > 0 else math.nan


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
