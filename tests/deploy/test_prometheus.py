"""deploy/prometheus and deploy/grafana, checked for real: promtool checks and unit-tests the
rules, and a real Prometheus (on loopback, its own storage) scrapes a real server under a
little traffic, evaluates the rules, and answers the p99 step latency and every dashboard query.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from tests.api.conftest import infer_input, sequence_data
from tests.child import end_process
from tests.conftest import ROOT
from tests.redis_server import free_port
from tests.server import RunningServer, serving

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rnnserve.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rnnserve.rules.test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "rnnserve.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

SCRAPE = "1s"
RATE_INTERVAL = "15s"
"""What the test puts for Grafana's $__rate_interval: several scrapes, all under traffic."""
GPU_METRICS = re.compile(r"\bnv_gpu_\w+")
"""The GPU panels' metrics, exported only where NVML finds a GPU (rnnserve.metrics)."""


def promtool(*args: str) -> str:
    done = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_rules_and_config_pass_promtool() -> None:
    assert "SUCCESS: 11 rules found" in promtool("check", "rules", str(RULES))
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))
    assert "is valid prometheus config file" in promtool("check", "config", str(CONFIG))


def test_every_alert_has_unit_tests_that_fire_it_and_not() -> None:
    """The unit tests expect each alert firing at one time and silent at another."""
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert len(alerts) == 6
    assert firing == alerts and silent == alerts, (alerts, firing, silent)


class RunningPrometheus:
    """`prometheus` on 127.0.0.1 with `config`, its data and log in `workdir`, ended by PID.

    A free port and a storage folder of its own: a Prometheus the Debian package may have started
    as a system service (port 9090, /var/lib/prometheus) is neither used nor disturbed.
    """

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + 30
        while not self._ready():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful answer of the HTTP API (/api/v1/...)."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} {params}: {error.read().decode()}") from error
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's samples, now."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        end_process(self.process)


def values(samples: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in samples]


class Traffic:
    """A little real traffic from a thread until `stop`: a few sequences of two models stepped
    round after round (ended and started again every 20 rounds), and one request a round
    continuing a sequence that was never started (INVALID_ARGUMENT), so the failure panels
    have data too."""

    MODELS = ("charlm_lstm", "sensor_gru")

    def __init__(self, target: str) -> None:
        self.target = target
        self.rounds = 0
        self.refused = 0
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="traffic")
        self._thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        try:
            with triton.InferenceServerClient(self.target) as client:
                while not self._stop.wait(0.02):
                    phase = self.rounds % 20
                    for k, model in enumerate(self.MODELS):
                        for sid in range(100 * k + 1, 100 * k + 4):
                            client.infer(
                                model,
                                [infer_input(model, sequence_data(model, 1, rng))],
                                sequence_id=sid,
                                sequence_start=phase == 0,
                                sequence_end=phase == 19,
                            )
                    try:
                        client.infer(
                            "sensor_gru",
                            [infer_input("sensor_gru", sequence_data("sensor_gru", 1, rng))],
                            sequence_id=999_999,
                        )
                    except InferenceServerException as error:
                        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
                        self.refused += 1
                    self.rounds += 1
        except BaseException as error:  # noqa: BLE001 - reported by `stop`, in the test
            self._failure = error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._failure is not None:
            raise self._failure


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def traffic(server: RunningServer) -> Iterator[Traffic]:
    running = Traffic(server.target)
    try:
        yield running
    finally:
        running.stop()
    assert running.rounds > 0 and running.refused == running.rounds


def scrape_config(metrics_port: int) -> dict[str, Any]:
    """The shipped prometheus.yml, scraping `metrics_port` every second (and evaluating the
    rules as often): only targets, intervals and the rules' path change."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=SCRAPE, evaluation_interval=SCRAPE)
    assert config["rule_files"] == [RULES.name]
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    return config


@pytest.fixture(scope="module")
def prometheus(
    server: RunningServer, traffic: Traffic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPrometheus]:
    assert server.ports.metrics is not None
    running = RunningPrometheus(
        tmp_path_factory.mktemp("prometheus"), scrape_config(server.ports.metrics)
    )
    try:
        # Rates need two samples of each series: wait for several scrapes under traffic, the
        # refused requests' series included (they appear with the first one).
        deadline = time.monotonic() + 30
        while True:
            scrapes = values(running.query("min(count_over_time(rnnserve_requests_total[1m]))"))
            if scrapes and scrapes[0] >= 4 and len(running.query("rnnserve_requests_total")) >= 3:
                break
            assert time.monotonic() < deadline, running.log_path.read_text()
            time.sleep(0.5)
        yield running
    finally:
        running.stop()


def wait_for(prometheus: RunningPrometheus, expr: str, timeout: float = 20) -> list[float]:
    """The values of `expr` once it has any, all finite."""
    deadline = time.monotonic() + timeout
    while not (found := values(prometheus.query(expr))):
        assert time.monotonic() < deadline, f"no samples for {expr}"
        time.sleep(0.5)
    assert all(math.isfinite(v) for v in found), (expr, found)
    return found


def test_p99_step_latency_from_the_histogram(prometheus: RunningPrometheus) -> None:
    by_quantile = {
        q: wait_for(
            prometheus,
            f"histogram_quantile({q}, sum by (le) (rate("
            f'rnnserve_request_duration_seconds_bucket{{stage="total"}}[{RATE_INTERVAL}])))',
        )
        for q in (0.5, 0.99)
    }
    (p50,), (p99,) = by_quantile[0.5], by_quantile[0.99]
    # A step of these small models on loopback: well over the first bucket, well under a second.
    assert 25e-6 < p50 <= p99 < 1.0, by_quantile
    # The recording rule the latency alert reads, evaluated by this Prometheus on the same data.
    recorded = wait_for(
        prometheus,
        'model_stage:rnnserve_request_duration_seconds:p99_rate5m{stage="total",model="sensor_gru"}',
    )
    assert 25e-6 < recorded[0] < 1.0, recorded


def test_rules_evaluate_on_real_series_and_nothing_alerts(prometheus: RunningPrometheus) -> None:
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 11, rules
    for rule in rules:
        assert rule["health"] == "ok", rule
    for rule in rules:
        if rule["type"] == "recording":
            wait_for(prometheus, rule["name"])
    # A healthy server: the alerts' expressions are false, so none is even pending (but for
    # latency, which a busy test machine may push up for a moment). The refused requests (a
    # client's mistake) do not count as the service's errors.
    assert values(prometheus.query("model:rnnserve_request_errors:ratio_rate5m")) == [0.0, 0.0]
    alerts = {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]}
    assert alerts <= {"RnnserveHighStepLatency"}, alerts
    assert values(prometheus.query('up{job="rnnserve"}')) == [1.0]


def label_values(prometheus: RunningPrometheus, query: str) -> list[str]:
    """Grafana's `label_values(selector, label)` variable query, through the series API."""
    found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert found, query
    selector, label = found.groups()
    series = prometheus.api("series", **{"match[]": selector, "start": str(time.time() - 300)})
    return sorted({s[label] for s in series if label in s})


def as_regex(options: list[str]) -> str:
    """Values for a multi-value variable in a PromQL regex matcher, as Grafana formats them:
    regex-escaped, joined with |, with backslashes doubled for the PromQL string."""
    return "(" + "|".join(re.escape(v) for v in options).replace("\\", "\\\\") + ")"


def test_every_dashboard_query_returns_data(
    prometheus: RunningPrometheus, server: RunningServer
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {"$__rate_interval": f"{RATE_INTERVAL}"}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            continue
        query = variable["query"]["query"]
        for name, value in substitutions.items():
            query = query.replace(name, value)
        options = label_values(prometheus, query)
        assert options, f"variable {variable['name']}: {query} has no values"
        substitutions[f"${variable['name']}"] = as_regex(options)
    assert substitutions["$model"] == "(charlm_lstm|digits_lstm|sensor_gru)"

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    has_gpu = GPU_METRICS.search(server.scrape()) is not None
    answers: dict[str, list[dict[str, Any]]] = {}
    skipped, empty = [], []
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            # Longest names first: $model must not eat the start of a $models.
            for name in sorted(substitutions, key=len, reverse=True):
                expr = expr.replace(name, substitutions[name])
            assert "$" not in expr, f"{panel['title']}: an unknown variable in {expr}"
            if GPU_METRICS.search(expr) and not has_gpu:
                skipped.append(panel["title"])
                continue
            samples = prometheus.query(expr)
            answers.setdefault(panel["title"], []).extend(samples)
            if not any(math.isfinite(v) for v in values(samples)):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr} -> {samples}")
    assert empty == [], "\n".join(empty)
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat", "table"} <= kinds
    assert len(answers) >= 12, list(answers)
    # What the traffic did shows where it should.
    throughput = {
        s["metric"]["model"]: float(s["value"][1])
        for s in answers["Throughput (requests/s) by model"]
    }
    assert set(throughput) == set(Traffic.MODELS) and min(throughput.values()) > 0, throughput
    (refused,) = answers["Failed requests/s by outcome"]
    assert refused["metric"] == {"model": "sensor_gru", "outcome": "INVALID_ARGUMENT"}, refused
    assert values(answers["Replicas up"]) == [1.0]
    if not has_gpu:
        assert sorted(set(skipped)) == ["GPU memory", "GPU utilization"], skipped
