"""`make bench-durability` runs: a short run of every single-Redis configuration (the Sentinel
and Cluster ones start their own topologies, which tests/api/test_failover.py and
test_cluster.py exercise)."""

from __future__ import annotations

from rnnserve_bench import durability


def test_a_short_run_measures_every_configuration_without_errors(capsys) -> None:
    assert durability.main(["--sequences", "2", "--seconds", "0.3", "--no-ha"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "steps/s" not in line]
    configurations = [tuple(cell.strip() for cell in row.split("|")[1:4]) for row in rows]
    expected = [
        (s, d, str(r)) for s, d, r in durability.CONFIGURATIONS if s not in durability.HA_STORES
    ]
    assert configurations == expected
    for row in rows:
        steps_per_s = float(row.split("|")[4].replace(",", ""))
        assert steps_per_s > 0, row
