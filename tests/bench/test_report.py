"""The report's judgement: the targets against Triton point by point, and plots that never draw
a point that crashed or had errors as a measurement."""

from __future__ import annotations

import math

import pytest

from rnnserve_bench import report

TRITON = {"steps_per_s": 1000.0, "p99_ms": 10.0, "errors": 0, "valid": True}


def ours(steps_per_s: float, p99_ms: float, **more: object) -> dict:
    return {"steps_per_s": steps_per_s, "p99_ms": p99_ms, "errors": 0, "valid": True, **more}


@pytest.mark.parametrize(
    ("point", "status", "must", "aim"),
    [
        (ours(1600, 9.0), "Aim met", True, True),
        (ours(1500, 10.0), "Aim met", True, True),  # at the bounds
        (ours(1200, 9.0), "Must met", True, False),
        (ours(1600, 11.0), "missed: p99", False, False),  # faster, but a higher p99
        (ours(900, 9.0), "missed: steps/s", False, False),
        (ours(900, 12.0), "missed: steps/s and p99", False, False),
        (ours(2000, 1.0, errors=3, valid=False), "missed: rnnserve errors", False, False),
        (ours(2000, 1.0, crashed=True, valid=False), "missed: rnnserve crashed", False, False),
    ],
)
def test_each_point_is_judged_against_the_targets(point, status, must, aim) -> None:
    found = report.verdict(point, TRITON)
    assert (found["status"], found["must"], found["aim"]) == (status, must, aim)
    assert found["ratio"] == pytest.approx(point["steps_per_s"] / 1000)
    assert (found["p99_ms"], found["triton_p99_ms"]) == (point["p99_ms"], 10.0)


@pytest.mark.parametrize(
    ("theirs", "why"),
    [
        (None, "not measured"),
        ({**TRITON, "valid": False, "crashed": True, "crashed_rounds": 3, "rounds": 3}, "crashed"),
        ({**TRITON, "valid": False, "errors": 128}, "errors"),
        ({"failed": "perf_analyzer exited with 1"}, "failed"),
    ],
)
def test_a_point_without_a_valid_triton_figure_is_not_comparable(theirs, why) -> None:
    found = report.verdict(ours(1600, 1.0), theirs)
    assert found["status"] == f"not comparable: Triton {why}"
    assert found["must"] is None and found["aim"] is None


def test_the_targets_count_every_point_and_perf_analyzer_cell() -> None:
    point = {"series": "stream T=1", "errors": 0, "valid": True}
    results = {
        "rnnserve": [
            {**point, "sessions": 1, "steps_per_s": 900.0, "p99_ms": 1.0},
            {**point, "sessions": 64, "steps_per_s": 2000.0, "p99_ms": 1.0},
            {**point, "sessions": 256, "steps_per_s": 2000.0, "p99_ms": 1.0},
        ],
        "rnnserve-grpcio": [{**point, "sessions": 1, "steps_per_s": 1100.0, "p99_ms": 1.0}],
        "triton": [
            {**point, "sessions": 1, "steps_per_s": 1000.0, "p99_ms": 2.0},
            {**point, "sessions": 64, "steps_per_s": 1000.0, "p99_ms": 2.0},
            {
                **point,
                "sessions": 256,
                "steps_per_s": 10.0,
                "p99_ms": 2.0,
                "valid": False,
                "errors": 5,
            },
        ],  # fmt: skip
        "peers": {
            "perf_analyzer": {
                "runs": [
                    {
                        "server": "rnnserve",
                        "mode": "unary",
                        "concurrency": 64,
                        "steps_per_s": 1500.0,
                        "p99_ms": 3.0,
                    },
                    {
                        "server": "triton",
                        "mode": "unary",
                        "concurrency": 64,
                        "steps_per_s": 1000.0,
                        "p99_ms": 3.0,
                    },
                    {
                        "server": "rnnserve",
                        "mode": "streaming",
                        "concurrency": 64,
                        "failed": "perf_analyzer exited with 99",
                    },
                    {
                        "server": "triton",
                        "mode": "streaming",
                        "concurrency": 64,
                        "steps_per_s": 1000.0,
                        "p99_ms": 3.0,
                    },
                ]  # fmt: skip
            }
        },
    }
    found = report.targets(results)
    assert [(v["server"], v["sessions"], v["status"]) for v in found["points"]] == [
        ("rnnserve", 1, "missed: steps/s"),
        ("rnnserve", 64, "Aim met"),
        ("rnnserve", 256, "not comparable: Triton errors"),
        ("rnnserve-grpcio", 1, "Must met"),
    ]
    assert found["summary"]["rnnserve"]["points"] == {
        "measured": 3, "comparable": 2, "must_met": 1, "aim_met": 1,
    }  # fmt: skip
    assert [(v["mode"], v["status"]) for v in found["perf_analyzer"]] == [
        ("unary", "Aim met"),
        ("streaming", "missed: rnnserve failed"),
    ]
    assert found["summary"]["rnnserve"]["perf_analyzer"]["must_met"] == 1


def test_a_point_that_crashed_or_had_errors_is_not_drawn_on_its_line(tmp_path) -> None:
    points = [
        {"sessions": 1, "steps_per_s": 10.0, "errors": 0, "valid": True},
        {"sessions": 16, "steps_per_s": 5.0, "errors": 3, "valid": False},
        {"sessions": 64, "steps_per_s": 30.0, "errors": 0, "crashed": True, "valid": False},
        {"sessions": 256, "steps_per_s": 40.0, "errors": 0, "valid": True},
    ]
    xs, line, crosses = report.drawn(points, "steps_per_s")
    assert xs == [1, 16, 64, 256]
    assert line[0] == 10.0 and line[3] == 40.0 and math.isnan(line[1]) and math.isnan(line[2])
    assert math.isnan(crosses[0]) and crosses[1:3] == [5.0, 30.0] and math.isnan(crosses[3])

    point = {"series": "stream T=1", "p50_ms": 1.0, "p99_ms": 2.0}
    results = {
        "model": {"name": "charlm_lstm"},
        "inprocess": [{"batch": 1, "steps": 1, "steps_per_s": 100.0}],
        **{
            server: [{**point, **p, "server": server} for p in points]
            for server in ("rnnserve", "rnnserve-grpcio", "triton", "transport")
        },
    }
    written = report.plot(results, tmp_path)
    assert [p.name for p in written] == ["throughput.png", "latency.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
