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

import grpc

from rnnserve.api import native
from rnnserve.runtime.onnx import EngineSettings, Provider
from rnnserve_bench import inprocess, machine, peers, report, scale, torchserve, triton
from rnnserve_bench.loadgen import (
    OPEN_INFERENCE,
    STREAM,
    UNARY,
    LoadResult,
    LoadSpec,
    Snapshot,
    StreamApi,
    raise_descriptor_limit,
    run_load,
)
from rnnserve_bench.options import BenchOptions
from rnnserve_bench.procs import (
    Measured,
    ProcessError,
    Restartable,
    ServerProcess,
    histogram_totals,
    serving_transport,
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
RNNSERVE = "rnnserve"
RNNSERVE_GRPCIO = "rnnserve-grpcio"
TRITON = "triton"
TRANSPORT = "transport"
OURS = {RNNSERVE: "native", RNNSERVE_GRPCIO: "grpcio"}
"""rnnserve's series and the transport (`--transport`) each is served through: the main series
is the native transport's."""
CONTENDERS = (RNNSERVE, RNNSERVE_GRPCIO, TRITON, TRANSPORT)
"""Measured at each point in this order, then in the reverse order at the next."""
PERF_ANALYZER_SERVERS = (RNNSERVE, RNNSERVE_GRPCIO, TRITON)
NATIVE_MISSING = (
    "the native transport is not installed (rnnserve-native: `make install` builds it where "
    "cargo is present, or `pip install ./native`)"
)
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
    """A server through one run, and the crashes it was restarted after."""

    server: Restartable | None
    """None once it could not be started (again)."""
    name: str = ""
    """What its points are called (the server's own name when empty)."""
    scrape: bool = False
    """Read its batch sizes from its /metrics (rnnserve's)."""
    started: bool = True
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
    results["machine"]["open_files_limit"] = raise_descriptor_limit()  # servers inherit it
    results["inprocess"] = _run_inprocess(options, workload)
    results.update(_run_servers(options, workload))
    results["targets"] = report.targets(results)
    results["server_cpu_us_per_step"] = report.server_cpu(results, options.headline_sessions)
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
    """rnnserve on each transport, Triton, the transport-only server and TorchServe, all
    started first and measured point by point: each rnnserve point right next to Triton's and
    the transport's, in alternating order; then perf_analyzer against each.

    The machine's speed drifts over minutes (on the shared VM, the transport's figures once
    doubled from one part of a run to the next), and E and the Triton ratios compare these.
    """
    logs, ids = options.out / "logs", _Ids()
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    found: dict[str, Any] = {}
    with ExitStack() as stack:
        runs = {name: _start_ours(options, name, stack) for name in OURS}
        if all(run.server is None for run in runs.values()):
            raise ProcessError(
                "rnnserve did not start: " + "; ".join(run.stopped for run in runs.values())
            )
        echoes = {
            steps: PeerRun(
                stack.enter_context(start_echo(logs, options.repository, workload.model, steps)),
                TRANSPORT,
            )
            for steps in options.steps
        }
        started = _start_triton(options, workload, stack)
        if isinstance(started, str):
            found["triton"] = {"skipped": started}
            runs[TRITON] = PeerRun(None, TRITON, stopped=started)
        else:
            found["triton"] = {
                "version": triton.VERSION,
                "settings": triton.settings(started.model_config(workload.model)),
            }
            runs[TRITON] = PeerRun(started, TRITON)
        peer = _start_torchserve(options, workload, stack)
        if isinstance(peer, str):
            found["torchserve"] = {"skipped": peer}
        turn = 0
        for series in series_of(options):
            for sessions in options.sessions:
                contenders = {**runs, TRANSPORT: echoes[series.steps]}
                rounds = _rounds(options, workload, contenders, series, sessions, ids, turn)
                turn += options.repeats
                for name, measured in rounds.items():
                    if measured:
                        points[name].append(median_point(measured))
                headline = (report.HEADLINE_SERIES, options.headline_sessions)
                if not isinstance(peer, str) and (series.label, sessions) == headline:
                    found["torchserve"] = _torchserve_point(options, workload, peer, ids)
        found.setdefault("torchserve", {"skipped": "the headline point was not measured"})
        channels = _compare_channels(options, workload, echoes.get(1), ids)
        found["perf_analyzer"] = _perf_analyzer(options, workload, runs)
    if "skipped" not in found["triton"]:
        found["triton"].update(crashes=runs[TRITON].crashes, stopped=runs[TRITON].stopped)
    return {
        "servers": _servers(runs, list(echoes.values())),
        **points,
        "channels": channels,
        "peers": found,
        "scale": _scale_point(options, workload, ids),
    }


def _servers(runs: dict[str, PeerRun], echoes: list[PeerRun]) -> dict[str, Any]:
    """rnnserve's series (the transport each served through) and the transport ceiling: the
    crashes each was started again after (Triton's are with Triton's)."""
    servers: dict[str, Any] = {}
    for name, transport in OURS.items():
        run = runs[name]
        servers[name] = (
            {"transport": transport, "crashes": run.crashes, "stopped": run.stopped}
            if run.started
            else {"skipped": run.stopped}
        )
    servers[TRANSPORT] = {
        "crashes": [c for run in echoes for c in run.crashes],
        "stopped": "; ".join(run.stopped for run in echoes if run.stopped),
    }
    return servers


def _start_ours(options: BenchOptions, name: str, stack: ExitStack) -> PeerRun:
    """rnnserve serving through `OURS[name]`, stopped with `stack`; checked against its start
    line. A series that cannot start is skipped with the reason (the native transport is built
    only where cargo was present)."""
    transport = OURS[name]
    if transport == "native" and not native.AVAILABLE:
        return PeerRun(None, name, started=False, stopped=NATIVE_MISSING)
    # The series is what its name says: its transport comes after the caller's flags.
    flags = [*_server_flags(options), "--transport", transport]
    try:
        server = stack.enter_context(start_rnnserve(options.out / "logs", flags, name))
        served = serving_transport(server)
    except (OSError, ProcessError) as error:
        logger.warning("%s did not start: %s", name, error)
        reason = f"did not start: {str(error).splitlines()[0]}"
        return PeerRun(None, name, started=False, stopped=reason)
    if served != transport:
        raise ProcessError(f"{name} serves through {served}, not {transport}")
    return PeerRun(server, name, scrape=True, started=True)


def _rounds(
    options: BenchOptions,
    workload: Workload,
    contenders: dict[str, PeerRun],
    series: Series,
    sessions: int,
    ids: _Ids,
    turn: int,
) -> dict[str, list[dict[str, Any]]]:
    """Each contender's measurements of one point, `options.repeats` rounds of them, the order
    reversed from one round to the next (the first round's order set by `turn`)."""
    names = [name for name in CONTENDERS if name in contenders]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(options.repeats):
        for name in names[:: 1 if (turn + round_) % 2 == 0 else -1]:
            measured = peer_point(options, workload, contenders[name], series, sessions, ids)
            if measured is not None:
                rounds[name].append(measured)
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
    sessions_per_channel: int | None = None,
) -> dict[str, Any] | None:
    """One point of a server that may crash: a crash is recorded and the server started
    again, so the run goes on (Triton 2.51 has died of SIGSEGV under heavy streaming). None
    when the server could not be started again."""
    server = _alive(peer, series.label, sessions)
    if server is None:
        return None
    scrape = server.scrape if peer.scrape and isinstance(server, ServerProcess) else None
    sample = _sampler(server, scrape, workload.model)
    label = peer.name or server.name
    try:
        result = _point(
            options, workload, server, series, sessions, ids, sample, sessions_per_channel
        )
    except ServerDied as died:
        point = _load_point(label, series, died.result)
        point.update(crashed=True, valid=False)
        _crashed(peer, server, series.label, sessions, "during the point")
        return point
    except TimeoutError:  # its channels never became ready
        if server.alive():
            raise
        _crashed(peer, server, series.label, sessions, "before the point")
        return None
    return _load_point(label, series, result)


def _alive(peer: PeerRun, what: str, sessions: int) -> Restartable | None:
    """The peer's server, started again first if it died since it was last measured; None
    once it cannot be."""
    server = peer.server
    if server is not None and not server.alive():
        _crashed(peer, server, what, sessions, "between points")
        server = peer.server
    return server


def median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's point from its repeated measurements: the round with the median steps/s
    (the lower of the two middle ones for an even count) among the rounds in which it did not
    crash (all of them if it crashed in every one), with every round's steps/s and p99 beside
    it, the errors of all rounds, `crashed` if the server died in any and `crashed_rounds`.

    `valid` says whether the figures stand for the server: the round they come from neither
    crashed nor had an error. The plots and the targets take only valid points."""
    clean = [p for p in rounds if not p.get("crashed", False)] or rounds
    ranked = sorted(clean, key=lambda p: p["steps_per_s"])
    chosen = ranked[(len(ranked) - 1) // 2]
    point = dict(chosen)
    point["valid"] = not chosen.get("crashed", False) and chosen["errors"] == 0
    point["rounds"] = len(rounds)
    point["steps_per_s_rounds"] = [p["steps_per_s"] for p in rounds]
    point["p99_ms_rounds"] = [p["p99_ms"] for p in rounds]
    point["errors"] = sum(p["errors"] for p in rounds)
    point["first_error"] = next((p["first_error"] for p in rounds if p["errors"]), "")
    point["crashed_rounds"] = len(rounds) - len(clean) if clean is not rounds else len(rounds)
    point["crashed"] = point["crashed_rounds"] > 0
    return point


def _crashed(peer: PeerRun, server: Restartable, what: str, sessions: int, when: str) -> None:
    crash = {
        "series": what,
        "sessions": sessions,
        "when": when,
        "death": server.death(),
        "log_tail": server.log_tail(LOG_TAIL_LINES),
    }
    peer.crashes.append(crash)
    logger.warning(
        "%s %s at %s, %d sessions (%s); starting it again",
        server.name, crash["death"], what, sessions, when,
    )  # fmt: skip
    try:
        server.restart()
    except (OSError, ProcessError) as error:
        peer.server = None
        peer.stopped = f"did not start again after a crash: {str(error).splitlines()[0]}"
        logger.warning("%s %s", server.name, peer.stopped)


def _perf_analyzer(
    options: BenchOptions, workload: Workload, runs: dict[str, PeerRun]
) -> dict[str, Any]:
    """perf_analyzer in each of its modes at 1 and the headline concurrency (HTTP at 16 too,
    below the headline; --quick at the headline's alone), against each server in turn (the
    order alternating from one cell to the next), as it drives Triton; over HTTP, against the
    servers that serve it."""
    if not options.peers:
        return {"skipped": "--no-peers"}
    binary = peers.find_perf_analyzer()
    if binary is None:
        return {"skipped": peers.missing()}
    interval_s = max(options.duration_s / 2, 0.5)
    # A series that never started (the native transport not built) has no runs: its points
    # already say why.
    names = [name for name in PERF_ANALYZER_SERVERS if name in runs and runs[name].started]
    found: list[dict[str, Any]] = []
    below = options.headline_sessions if options.perf_analyzer_below_headline else 0
    cells = [
        (m, c)
        for m in peers.MODES
        for c in sorted(
            {c for c in peers.CONCURRENCIES.get(m, (1,)) if c <= below}
            | {options.headline_sessions}
        )
    ]
    for turn, (mode, concurrency) in enumerate(cells):
        for name in names[:: 1 if turn % 2 == 0 else -1]:
            run = PerfAnalyzerRun(binary, mode, concurrency, interval_s, 1 + len(found))
            found.append(perf_analyzer_run(run, workload, runs[name], options.out / "logs"))
    return {
        "binary": str(binary),
        "interval_s": interval_s,
        "trials": peers.TRIALS,
        "sequence_length": peers.SEQUENCE_LENGTH,
        "runs": found,
    }


@dataclass(frozen=True)
class PerfAnalyzerRun:
    binary: Path
    mode: str
    concurrency: int
    interval_s: float
    number: int
    """Its place in the run, from 1: which sequence ids it has to itself."""

    @property
    def first_id(self) -> int:
        first = 1 + (self.number - 1) * peers.IDS_PER_RUN
        if first + peers.IDS_PER_RUN > FIRST_SEQUENCE_ID:
            raise ValueError(f"perf_analyzer run {self.number} would take the load points' ids")
        return first


def perf_analyzer_run(
    run: PerfAnalyzerRun, workload: Workload, peer: PeerRun, workdir: Path
) -> dict[str, Any]:
    """One perf_analyzer run against a server that may crash: a crash found before the run
    or caused by it is recorded, the server started again, and the run marked `crashed`."""
    what = f"perf_analyzer {run.mode}"
    server = _alive(peer, what, run.concurrency)
    if server is None:
        return {
            "server": peer.name, "mode": run.mode, "concurrency": run.concurrency,
            "skipped": peer.stopped,
        }  # fmt: skip
    name = peer.name or server.name
    try:
        target = server.http_target if run.mode == peers.HTTP else server.target
    except LookupError as error:  # grpc.aio serves no HTTP port
        return {"server": name, "mode": run.mode, "concurrency": run.concurrency,
                "skipped": str(error), "unsupported": True}  # fmt: skip
    report_csv = workdir / f"perf_analyzer-{name}-{run.mode}-{run.concurrency}.csv"
    measured = peers.perf_analyzer(
        run.binary, target, workload, run.mode, run.concurrency, run.interval_s,
        run.first_id, report_csv,
    )  # fmt: skip
    measured["server"] = name
    if not server.alive():
        measured["crashed"] = True
        _crashed(peer, server, what, run.concurrency, "during the run")
    if "failed" in measured:
        logger.warning("perf_analyzer against %s: %s", name, measured["failed"])
    else:
        logger.info(
            "perf_analyzer %s against %s, concurrency %d: %.0f steps/s, p99 %.2f ms",
            run.mode, name, run.concurrency, measured["steps_per_s"], measured["p99_ms"],
        )  # fmt: skip
    time.sleep(SETTLE_S)
    return measured


def _scale_point(options: BenchOptions, workload: Workload, ids: _Ids) -> dict[str, Any]:
    """`options.scale_streams` streams on a fresh rnnserve (native), once the rest is done."""
    streams = options.scale_streams
    if not streams:
        return {"skipped": "--scale-streams 0"}
    if not native.AVAILABLE:
        return {"skipped": NATIVE_MISSING}
    flags = [*_server_flags(options), *scale.server_flags(streams), "--transport", "native"]
    try:
        with start_rnnserve(options.out / "logs", flags, "rnnserve-scale") as server:
            sample = _sampler(server, server.scrape, workload.model)
            try:
                found = scale.measure(
                    server, workload, sample, streams, ids.take(scale.ids_needed(streams)),
                    options.warmup_s, options.duration_s, options.sessions_per_channel,
                )  # fmt: skip
            except (grpc.RpcError, OSError, RuntimeError) as error:
                return {
                    "streams": streams,
                    "failed": f"{type(error).__name__}: {error}",
                    "death": server.death(),
                    "log_tail": server.log_tail(LOG_TAIL_LINES),
                }
            if not server.alive():
                found["crashed"] = server.death()
    except (OSError, ProcessError) as error:
        return {"streams": streams, "failed": f"did not start: {str(error).splitlines()[0]}"}
    logger.info(
        "scale: %d streams: %.0f steps/s, p99 %.1f ms, %d errors; RSS %.0f bytes per open "
        "stream, %.0f per idle sequence",
        streams, found["steps_per_s"], found["p99_ms"], found["errors"],
        found["rss_per_open_stream_bytes"], found["rss_per_idle_sequence_bytes"],
    )  # fmt: skip
    return found


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
    try:
        result = _point(
            options, workload, server, series, options.headline_sessions, ids, _sampler(server),
            messages_of=lambda sequence, steps: torchserve.messages(workload, sequence, steps),
            api=torchserve.STREAM,
        )  # fmt: skip
    except ServerDied as died:
        point = _load_point("torchserve", series, died.result)
        point.update(crashed=True, valid=False, death=server.log_tail(LOG_TAIL_LINES))
    else:
        point = _load_point("torchserve", series, result)
    point["settings"] = torchserve.settings(workload.max_batch_size)
    return point


def _compare_channels(
    options: BenchOptions, workload: Workload, echo: PeerRun | None, ids: _Ids
) -> list[dict[str, Any]]:
    """The transport ceiling with one channel per 64 sequences against one for all."""
    sessions = 256 if 256 in options.sessions else max(options.sessions)
    if echo is None or not options.compare_channels or sessions <= CHANNEL_SESSIONS:
        return []
    channels = []
    for per_channel in (CHANNEL_SESSIONS, sessions):
        point = peer_point(options, workload, echo, Series(STREAM, 1), sessions, ids, per_channel)
        if point is not None:
            channels.append(point)
    return channels


def _sampler(
    server: Measured, scrape: Callable[[], str] | None = None, model: str = ""
) -> Callable[[], Snapshot]:
    """Counters at a window's edge; the batch sizes from `scrape`, rnnserve's /metrics (not
    known where it does not answer: the server died)."""

    def sample() -> Snapshot:
        batch = (0.0, 0.0)
        if scrape is not None:
            try:
                batch = histogram_totals(scrape(), "rnnserve_batch_size", model)
            except OSError:
                batch = (math.nan, math.nan)
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
        "mean_batch": result.mean_batch if result.after.batch_count else None,
        "server_cpu_s_per_1000_steps": result.cpu_per_1000_steps("server_cpu_s"),
        "server_cpu_by_thread_s_per_1000_steps": result.thread_cpu_per_1000_steps(),
        "client_cpu_s_per_1000_steps": result.cpu_per_1000_steps("client_cpu_s"),
        "server_cpu_cores": _cores(result, "server_cpu_s"),
        "client_cpu_cores": _cores(result, "client_cpu_s"),
        "response_bytes": result.response_bytes,
        "valid": result.errors == 0,
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
