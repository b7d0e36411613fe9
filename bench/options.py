"""What one benchmark run measures, and how long it takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rnnserve.models import bundled_repository

FULL_SESSIONS = (1, 16, 64, 256, 1024)
QUICK_SESSIONS = (1, 64, 256)
FULL_BATCHES = (1, 8, 32, 64, 256)
"""32: the batch rnnserve forms at 64 sequences, which the T=32 target compares with."""
QUICK_BATCHES = (1, 64)
HEADLINE_SESSIONS = 64
SCALE_STREAMS = 4096


@dataclass(frozen=True)
class BenchOptions:
    model: str = "charlm_lstm"
    """A streaming model of the repository."""
    repository: Path = field(default_factory=bundled_repository)
    out: Path = Path("build/bench")
    """Where results.json, results.md and the plots go."""
    sessions: tuple[int, ...] = FULL_SESSIONS
    """Concurrent sequences, each a closed loop, for rnnserve and the transport ceiling."""
    batches: tuple[int, ...] = FULL_BATCHES
    """Batch sizes of the in-process ONNX Runtime runs."""
    steps: tuple[int, ...] = (1, 32)
    """Time steps per request (per call in-process); unary requests carry one."""
    duration_s: float = 3.0
    """Measured seconds per point and round."""
    warmup_s: float = 0.5
    """Seconds run before each point's measurement starts."""
    repeats: int = 3
    """Measurements of each point per server, in rounds that alternate the servers' order;
    the report gives the median and the range."""
    sessions_per_channel: int = 1024
    """Sequences sharing one gRPC channel (one TCP connection); on loopback one channel is
    cheaper for the client than several (the run measures both at 256 sequences)."""
    provider: str = "auto"
    """Execution provider, in-process and in the server: auto (CUDA where there is one), cpu
    or cuda."""
    intra_op_threads: int = 0
    """ONNX Runtime threads, in-process and in the server (0: ONNX Runtime's choice)."""
    inter_op_threads: int = 0
    server_args: tuple[str, ...] = ()
    """Extra `rnnserve serve` flags, e.g. --max-queue-delay-us=200."""
    unary: bool = True
    """Measure ModelInfer (unary) as well as the stream."""
    peers: bool = True
    """Measure Triton and TorchServe and run perf_analyzer against rnnserve and Triton (each
    when installed)."""
    triton: Path | None = None
    """Triton's launcher, `run REPOSITORY HTTP GRPC METRICS` (None: build/triton/run in the
    checkout, where `make triton` installs it)."""
    compare_channels: bool = True
    """Measure the transport ceiling with one channel per 64 sequences too."""
    perf_analyzer_below_headline: bool = True
    """Run perf_analyzer at one sequence (and HTTP at 16) as well as at the headline's
    concurrency; --quick runs it at the headline's alone."""
    token: str = ""
    """A bearer token every call sends (`authorization: Bearer <token>`), for a server that
    authenticates; empty sends none."""
    scale_streams: int = SCALE_STREAMS
    """Concurrent streams of the scale point, on a fresh rnnserve (native): their memory per
    stream and per idle sequence, and one short window of their steps/s (0 skips it)."""

    def __post_init__(self) -> None:
        for name in ("sessions", "batches", "steps"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"--{name} needs one or more positive whole numbers")
        if 1 not in self.steps or 1 not in self.batches:
            raise ValueError("--steps and --batches must include 1: the headline figures use it")
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("--duration must be positive and --warmup at least 0")
        if self.provider not in {"auto", "cpu", "cuda"}:
            raise ValueError(f"--provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.sessions_per_channel < 1:
            raise ValueError("--sessions-per-channel must be at least 1")
        if self.scale_streams < 0:
            raise ValueError("--scale-streams must be 0 (skip) or more")

    @classmethod
    def resolve(
        cls,
        quick: bool,
        *,
        sessions: tuple[int, ...] | None = None,
        batches: tuple[int, ...] | None = None,
        duration_s: float | None = None,
        warmup_s: float | None = None,
        repeats: int | None = None,
        **given: object,
    ) -> BenchOptions:
        """Options from the command line: what is not given comes from --quick or the full run."""
        return cls(
            sessions=sessions or (QUICK_SESSIONS if quick else FULL_SESSIONS),
            batches=batches or (QUICK_BATCHES if quick else FULL_BATCHES),
            duration_s=duration_s or (1.0 if quick else 3.0),
            warmup_s=warmup_s if warmup_s is not None else (0.2 if quick else 0.5),
            repeats=repeats or (1 if quick else 3),
            compare_channels=not quick,
            perf_analyzer_below_headline=not quick,
            **given,  # type: ignore[arg-type]
        )

    @property
    def headline_sessions(self) -> int:
        """64 sequences, or the measured count nearest to it (by ratio)."""
        return min(
            self.sessions, key=lambda n: max(n, HEADLINE_SESSIONS) / min(n, HEADLINE_SESSIONS)
        )
