"""The Helm chart (deploy/helm/rnnserve), the kustomize base and overlay (deploy/kustomize) and the
KServe manifests (deploy/kserve), checked with the real tools: `helm lint` and `helm template`
(helm v4), `kubectl kustomize`, and `kubernetes-validate --strict` against Kubernetes' own
schemas. No API server runs here, so what a cluster would check at admission is checked by
schema; what the server would make of the rendered settings is checked by the server's own
Settings parser."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from rnnserve.config import Settings
from rnnserve.metrics import Metrics
from tests.conftest import ROOT, VERSION

CHART = ROOT / "deploy" / "helm" / "rnnserve"
VALUES = CHART / "ci"
BROKEN = Path(__file__).with_name("broken-values.yaml")
KUSTOMIZE = ROOT / "deploy" / "kustomize"
KSERVE = ROOT / "deploy" / "kserve"
TOOLS = ROOT / "build" / "helm" / "bin"
HELM = TOOLS / "helm"
KUBECTL = TOOLS / "kubectl"

OLDEST = "1.27.0"
"""The chart's kubeVersion floor (gRPC probes are GA from 1.27)."""
NEWEST = "1.37.0"
"""The newest schemas kubernetes-validate holds."""
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
"""Custom resources: no schema in kubernetes-validate (it warns); checked by hand below."""
CHART_SETTINGS = {
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "model_repository",
    "provider",
    "shutdown_grace_s",
    "state_store",
    "state_store_password",
    "state_durability",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "auth_tokens",
    "auth_admins",
}
"""Server settings the chart sets from its own values; every other one goes through `config`."""
FIELDS = {f.name for f in dataclasses.fields(Settings)}
HTTP_PORT = 8000
"""The KServe v2 REST port (Triton's HTTP protocol) the chart, kustomize and KServe expose."""


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    """helm and kubectl, as `make test` installs them (a no-op once they are there)."""
    subprocess.run(
        ["bash", "tests/tools/install-helm.sh", "build/helm"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    # Helm's own cache and config stay out of the user's home.
    home = ROOT / "build" / "helm" / "home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


@functools.cache
def render_text(*args: str, kube: str = NEWEST) -> str:
    done = helm("template", "rnnserve", str(CHART), "--kube-version", kube, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(*args: str, kube: str = NEWEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(*args, kube=kube)) if d]


def values(name: str) -> tuple[str, str]:
    return ("-f", str(VALUES / f"{name}-values.yaml"))


def one(docs: list[dict[str, Any]], kind: str, name: str = "rnnserve") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = pod(docs)["containers"]
    return found


def env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs)["env"]}


def validate(text: str, tmp_path: Path, *versions: str) -> list[str]:
    """kubernetes-validate --strict on `text`; the kinds it had no schema for."""
    path = tmp_path / "manifests.yaml"
    path.write_text(text)
    flags = [arg for version in versions for arg in ("-k", version)]
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *flags, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return re.findall(r"Couldn't find schema for kind (\w+)", done.stdout)


def check_custom_resources(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert doc["metadata"]["name"]
            assert isinstance(doc["spec"], dict) and doc["spec"]


NAMES = ["default", "gpu", "redis", "tls", "full", "secure"]


def test_lint() -> None:
    for name in NAMES:
        done = helm("lint", "--strict", str(CHART), *values(name))
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


# The preStop sleep action of the full values arrives in 1.30.
@pytest.mark.parametrize(
    ("name", "kube"),
    [(n, v) for n in NAMES for v in ("1.30.0" if n == "full" else OLDEST, NEWEST)],
)
def test_rendered_manifests_pass_strict_schema_validation(
    name: str, kube: str, tmp_path: Path
) -> None:
    text = render_text(*values(name), kube=kube)
    docs = [d for d in yaml.safe_load_all(text) if d]
    unchecked = validate(text, tmp_path, kube)
    assert sorted(unchecked) == sorted(
        d["kind"] for d in docs if (d["apiVersion"], d["kind"]) in CRDS
    )
    check_custom_resources(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    if name == "full":
        assert {"NetworkPolicy", "ServiceMonitor", "PrometheusRule"} <= kinds


def test_broken_values_fail_at_render_with_the_schemas_messages() -> None:
    done = helm("template", "rnnserve", str(CHART), "-f", str(BROKEN))
    assert done.returncode != 0
    assert not done.stdout
    assert "values don't meet the specifications of the schema" in done.stderr
    for message in (
        "at '/profile': value must be one of 'cpu', 'gpu'",
        "at '/shutdownGraceSeconds': got string, want number",
        "at '/config': additional properties 'intra_op_thread' not allowed",
        "at '/stateStore/redis/url'",
        "at '/resources/limits/memory'",
    ):
        assert message in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--set", "autoscaling.enabled=true", "--set", "resources.requests=null"),
            "autoscaling.enabled needs resources.requests.cpu",
        ),
        (
            ("--set", "preStopSleepSeconds=5", "--kube-version", OLDEST),
            "preStopSleepSeconds needs Kubernetes 1.30",
        ),
        (("--set", "tls.enabled=true"), "at '/tls/secretName': minLength"),
        (("--set", "auth.admins={ops}"), "auth.admins needs authentication on"),
        (
            (
                "--set",
                "tls.enabled=true",
                "--set",
                "tls.secretName=t",
                "--set",
                "auth.admins={ops}",
            ),
            "auth.admins needs authentication on",
        ),
        (("--set", "config.principal_burst=0"), "at '/config/principal_burst'"),
        (
            (
                "--set",
                "stateStore.redis.enabled=true",
                "--set",
                "stateStore.redis.url=redis://:secret@redis:6379/0",
                "--set",
                "stateStore.redis.passwordSecret.name=redis",
            ),
            "at '/stateStore/redis/url'",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_message(args: tuple[str, ...], message: str) -> None:
    done = helm("template", "rnnserve", str(CHART), *args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


PATHS = {
    "startupProbe": "/v2/health/ready",
    "readinessProbe": "/v2/health/ready",
    "livenessProbe": "/v2/health/live",
}
"""Each probe's KServe v2 health path: ready once the models are loaded and until a drain."""


def test_probes_get_the_http_health_paths() -> None:
    docs = render()
    c = container(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": HTTP_PORT,
        "grpc": 8001,
        "metrics": 8002,
    }
    for probe, path in PATHS.items():
        assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}, probe
        assert "grpc" not in c[probe] and "tcpSocket" not in c[probe]
    # A replacement is ready before an old pod goes.
    rollout = one(docs, "Deployment")["spec"]["strategy"]
    assert rollout["rollingUpdate"]["maxUnavailable"] == 0
    # Model loading is what the startup probe waits for; liveness must not cut it short.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_http_off_leaves_the_port_out_and_the_probes_ask_grpc_health_again() -> None:
    docs = render("--set", "http.enabled=false")
    assert one(docs, "ConfigMap")["data"]["RNNSERVE_HTTP_PORT"] == "off"
    c = container(docs)
    assert [p["containerPort"] for p in c["ports"]] == [8001, 8002]
    for probe in PATHS:
        assert c[probe]["grpc"] == {"port": 8001}, probe
        assert "httpGet" not in c[probe] and "tcpSocket" not in c[probe]
    for service in ("rnnserve", "rnnserve-headless"):
        assert HTTP_PORT not in {p["port"] for p in one(docs, "Service", service)["spec"]["ports"]}
    secure = render(*values("secure"), "--set", "http.enabled=false")
    for probe in PATHS:
        assert container(secure)[probe]["tcpSocket"] == {"port": "grpc"}, probe
    (inference, _) = one(secure, "NetworkPolicy")["spec"]["ingress"]
    assert [p["port"] for p in inference["ports"]] == [8001]


def test_services_carry_http_grpc_and_metrics_and_a_headless_one_http_and_grpc() -> None:
    docs = render()
    assert one(docs, "ConfigMap")["data"]["RNNSERVE_HTTP_PORT"] == str(HTTP_PORT)
    ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert ports["http"]["port"] == HTTP_PORT and ports["http"]["targetPort"] == "http"
    assert ports["http"]["appProtocol"] == "http"
    assert ports["grpc"]["port"] == 8001 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == 8002
    headless = one(docs, "Service", "rnnserve-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["port"] for p in headless["ports"]] == [HTTP_PORT, 8001]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in (one(docs, "Service")["spec"], headless):
        assert service["selector"].items() <= labels.items()


@pytest.mark.parametrize("name", NAMES)
def test_security_context_is_restricted(name: str) -> None:
    docs = render(*values(name))
    spec = pod(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root filesystem still needs somewhere to write temporary files.
    (tmp,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_gpu_profile_asks_for_a_gpu_on_gpu_nodes() -> None:
    cpu, gpu = render(*values("default")), render(*values("gpu"))
    limits = container(gpu)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert limits["memory"] == "8Gi"
    assert container(gpu)["image"] == f"rnnserve:{VERSION}-gpu"
    assert env(gpu)["RNNSERVE_PROVIDER"]["value"] == "cuda"
    assert pod(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(gpu)[
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    assert container(cpu)["image"] == f"rnnserve:{VERSION}"
    assert env(cpu)["RNNSERVE_PROVIDER"]["value"] == "cpu"
    assert "nodeSelector" not in pod(cpu) and "tolerations" not in pod(cpu)


@pytest.mark.parametrize(
    ("args", "grace", "pre_stop"),
    [
        ((), 20.0, 0),
        (values("full"), 42.5, 5),
        (("--set", "shutdownGraceSeconds=90", "--set", "terminationMarginSeconds=1"), 90, 0),
    ],
)
def test_termination_grace_outlasts_the_servers_drain(
    args: tuple[str, ...], grace: float, pre_stop: int
) -> None:
    docs = render(*args)
    config = one(docs, "ConfigMap")["data"]
    assert float(config["RNNSERVE_SHUTDOWN_GRACE_S"]) == grace
    period = pod(docs)["terminationGracePeriodSeconds"]
    assert isinstance(period, int)
    assert period > pre_stop + grace
    assert period >= pre_stop + math.ceil(grace) + 1
    sleep = container(docs).get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    assert sleep.get("seconds", 0) == pre_stop


def test_redis_password_comes_from_a_secret_never_from_values() -> None:
    text = render_text(*values("redis"))
    docs = [d for d in yaml.safe_load_all(text) if d]
    password = env(docs)["RNNSERVE_STATE_STORE_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "redis-password"}
    store = env(docs)["RNNSERVE_STATE_STORE"]["value"]
    assert store == "redis://redis-master.redis.svc:6379/0"  # no password in it
    assert one(docs, "ConfigMap")["data"]["RNNSERVE_STATE_DURABILITY"] == "step"
    assert "RNNSERVE_STATE_STORE" not in one(docs, "ConfigMap")["data"]

    full = render(*values("full"))
    url = env(full)["RNNSERVE_STATE_STORE"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "rnnserve-redis", "key": "url"}
    assert "RNNSERVE_STATE_STORE_PASSWORD" not in env(full)


def test_tls_mounts_the_secret_and_probes_the_port() -> None:
    docs = render(*values("tls"))
    c = container(docs)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod(docs)["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "rnnserve-tls"
    files = {
        "RNNSERVE_TLS_CERT": "tls.crt",
        "RNNSERVE_TLS_KEY": "tls.key",
        "RNNSERVE_TLS_CLIENT_CA": "ca.crt",
    }
    for variable, key in files.items():
        assert env(docs)[variable]["value"] == f"{mount['mountPath']}/{key}"
    # Client certificates required: the kubelet cannot present one over HTTPS or gRPC.
    for probe in PATHS:
        assert c[probe]["tcpSocket"] == {"port": "grpc"} and "grpc" not in c[probe]
        assert "httpGet" not in c[probe]
    # TLS without client certificates: HTTPS, whose certificate the kubelet does not verify.
    secure = container(render(*values("secure")))
    for probe, path in PATHS.items():
        assert secure[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}


def test_the_token_file_comes_from_a_secret_as_a_folder_the_kubelet_updates() -> None:
    docs = render(*values("secure"))
    c = container(docs)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "auth-tokens"]
    # A subPath mount would keep the first version of the file for the pod's life.
    assert mount["readOnly"] is True and "subPath" not in mount
    (volume,) = [v for v in pod(docs)["volumes"] if v["name"] == "auth-tokens"]
    assert volume["secret"]["secretName"] == "rnnserve-tokens"
    (item,) = volume["secret"]["items"]
    assert item["key"] == "tokens"
    assert env(docs)["RNNSERVE_AUTH_TOKENS"]["value"] == f"{mount['mountPath']}/{item['path']}"
    # Readable by the server's group (fsGroup), by no one else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod(docs)["securityContext"]["fsGroup"] == 10001
    assert "RNNSERVE_AUTH_TOKENS" not in one(docs, "ConfigMap")["data"]
    default = render()
    assert "RNNSERVE_AUTH_TOKENS" not in env(default)
    assert "auth-tokens" not in {v["name"] for v in pod(default)["volumes"]}


def test_model_repository_volume_is_mounted_where_the_server_looks() -> None:
    docs = render(*values("full"))
    path = one(docs, "ConfigMap")["data"]["RNNSERVE_MODEL_REPOSITORY"]
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "model-repository"]
    assert mount == {"name": "model-repository", "mountPath": path, "readOnly": True}
    (volume,) = [v for v in pod(docs)["volumes"] if v["name"] == "model-repository"]
    assert volume["persistentVolumeClaim"]["claimName"] == "rnnserve-models"
    default = render()
    assert "model-repository" not in {m["name"] for m in container(default)["volumeMounts"]}


def server_environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container starts with: the ConfigMap, then `env` as the kubelet
    resolves it (Secrets stand in with made-up values, $(VAR) expanded)."""
    secrets = {
        ("redis", "redis-password"): "s3cret",
        ("rnnserve-redis", "url"): "redis://:s3cret@redis:6379/0",
    }
    environ = dict(one(docs, "ConfigMap")["data"])
    for variable in container(docs)["env"]:
        if "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            environ[variable["name"]] = secrets[ref["name"], ref["key"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: environ[m[1]], variable["value"])
            environ[variable["name"]] = value
    return environ


@pytest.mark.parametrize("name", NAMES)
def test_the_server_takes_every_setting_the_chart_renders(name: str) -> None:
    docs = render(*values(name))
    environ = server_environment(docs)
    ours = {v for v in environ if v.startswith("RNNSERVE_")}
    unknown = {v for v in ours if v.removeprefix("RNNSERVE_").lower() not in FIELDS}
    assert not unknown, unknown
    assert environ["RNNSERVE_HTTP_PORT"] == str(HTTP_PORT)
    settings = Settings.from_sources(argparse.Namespace(), environ)
    assert (settings.host, settings.grpc_port, settings.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert settings.http_port == HTTP_PORT
    assert str(settings.model_repository) == "/models"
    assert settings.provider.value == ("cuda" if name == "gpu" else "cpu")
    grace = float(one(docs, "ConfigMap")["data"]["RNNSERVE_SHUTDOWN_GRACE_S"])
    assert settings.shutdown_grace_s == grace
    if name == "redis":
        assert settings.state_store == "redis://redis-master.redis.svc:6379/0"
        assert settings.state_store_password == "s3cret"
        assert settings.state_store_timeout_s == 1.5
    elif name == "full":
        assert settings.state_store.startswith("redis://")
        assert (settings.max_sequences, settings.idle_timeout_s) == (4096, None)
        assert settings.log_level.value == "WARNING"
    else:
        assert settings.state_store == "memory"
    if name == "secure":
        assert environ["RNNSERVE_AUTH_ADMINS"] == "ops,release-bot"
        assert environ["RNNSERVE_PRINCIPAL_MAX_SEQUENCES"] == "256"
        assert environ["RNNSERVE_MAX_REQUEST_BYTES"] == "1048576"
        assert str(settings.auth_tokens) == "/etc/rnnserve/auth/tokens"
        assert str(settings.tls_cert) == "/etc/rnnserve/tls/tls.crt"
        assert settings.tls_client_ca is None
    else:
        assert settings.auth_tokens is None


def test_numbers_from_a_values_file_reach_the_server_as_it_reads_them(tmp_path: Path) -> None:
    """helm reads a values file's numbers as floats, which print as 6.7108864e+07 from seven
    digits on; the server's integer settings would refuse that."""
    path = tmp_path / "values.yaml"
    path.write_text(
        "config: {max_message_bytes: 67108864, idle_timeout_s: 2.5, max_sequences: 100}\n"
    )
    settings = Settings.from_sources(
        argparse.Namespace(), server_environment(render("-f", str(path)))
    )
    assert settings.max_message_bytes == 67108864
    assert (settings.idle_timeout_s, settings.max_sequences) == (2.5, 100)


def test_schema_config_names_every_other_server_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    names = set(config["properties"])
    assert names | CHART_SETTINGS == FIELDS
    assert not names & CHART_SETTINGS
    hints = typing.get_type_hints(Settings)
    for name, rule in config["properties"].items():
        kinds = [k for k in typing.get_args(hints[name]) if k is not type(None)] or [hints[name]]
        choices = getattr(kinds[0], "__members__", None)
        if choices:
            assert {str(m.value) for m in choices.values()} <= set(rule["enum"]), name
    durability = schema["properties"]["stateStore"]["properties"]["durability"]["enum"]
    assert set(durability) == {m.value for m in hints["state_durability"]}


def test_autoscaler_scales_on_cpu_and_optionally_on_live_sequences() -> None:
    default = one(render(), "HorizontalPodAutoscaler")["spec"]
    assert default["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rnnserve",
    }
    assert [m["type"] for m in default["metrics"]] == ["Resource"]
    assert default["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(render(), "Deployment")["spec"]

    full = one(render(*values("full")), "HorizontalPodAutoscaler")["spec"]
    (pods,) = [m["pods"] for m in full["metrics"] if m["type"] == "Pods"]
    assert pods["target"] == {"type": "AverageValue", "averageValue": "500"}
    # The metric the adapter serves is one the server exports, as a gauge.
    exported = generate_latest(Metrics(lambda: []).registry).decode()
    assert f"# TYPE {pods['metric']['name']} gauge" in exported

    fixed = render("--set", "autoscaling.enabled=false", "--set", "replicaCount=3")
    assert one(fixed, "Deployment")["spec"]["replicas"] == 3
    assert not [d for d in fixed if d["kind"] == "HorizontalPodAutoscaler"]


def test_disruption_budget_and_spread_select_the_pods() -> None:
    docs = render()
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    spread = pod(docs)["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_monitoring_objects_point_at_the_metrics_port() -> None:
    docs = render(*values("full"))
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # Only the Service that has a metrics port matches: no pod is scraped twice.
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    with_metrics = [s for s in selected if "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in with_metrics] == ["rnnserve"]
    rule = one(docs, "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rnnserve.rules.yml").read_text())
    # The shipped rules (deploy/prometheus, linked into the chart's rules/), then the values'.
    assert rule["spec"]["groups"] == [*shipped["groups"], *rule["spec"]["groups"][-1:]]
    assert rule["spec"]["groups"][-1]["name"] == "rnnserve-example"
    policy = one(docs, "NetworkPolicy")["spec"]
    inference, scraping = policy["ingress"]
    # Either protocol reaches every model: the same peers for both.
    assert sorted(p["port"] for p in inference["ports"]) == [HTTP_PORT, 8001]
    assert inference["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}}
    ]
    assert [p["port"] for p in scraping["ports"]] == [8002]


def test_prometheus_rule_takes_the_charts_rule_files(tmp_path: Path) -> None:
    chart = tmp_path / "rnnserve"
    shutil.copytree(CHART, chart)
    (chart / "rules" / "latency.yaml").write_text(
        "groups:\n"
        "  - name: from-file\n"
        "    rules:\n"
        "      - record: rnnserve:requests:rate5m\n"
        "        expr: sum(rate(rnnserve_requests_total[5m]))\n"
    )
    done = helm("template", "rnnserve", str(chart), *values("full"))
    assert done.returncode == 0, done.stderr
    rule = one([d for d in yaml.safe_load_all(done.stdout) if d], "PrometheusRule")
    groups = rule["spec"]["groups"]
    names = [g["name"] for g in groups]
    assert names[0] == "from-file" and names[-1] == "rnnserve-example", names
    assert "rnnserve.alerts" in names
    assert groups[0]["rules"][0]["record"] == "rnnserve:requests:rate5m"


def test_kustomize_base_is_the_charts_fresh_render() -> None:
    committed = (KUSTOMIZE / "base" / "rnnserve.yaml").read_text()
    fresh = render_text("-f", str(KUSTOMIZE / "values.yaml"))
    assert committed == fresh, "deploy/kustomize/base is stale: run `make manifests`"
    assert "helm.sh/chart" not in committed and "managed-by" not in committed


def kustomize(path: Path) -> str:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_kustomize_builds_pass_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    text = kustomize(KUSTOMIZE / overlay)
    assert validate(text, tmp_path, OLDEST, NEWEST) == []
    assert {d["kind"] for d in yaml.safe_load_all(text)} >= {"Deployment", "Service"}
    docs = by_name(list(yaml.safe_load_all(text)))
    for service in ("rnnserve", "rnnserve-headless"):
        ports = {p["name"]: p["port"] for p in docs["Service", service]["spec"]["ports"]}
        assert ports["http"] == HTTP_PORT, service
    (c,) = docs["Deployment", "rnnserve"]["spec"]["template"]["spec"]["containers"]
    assert c["ports"][0] == {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def by_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


def test_kustomize_gpu_overlay_is_the_charts_gpu_profile() -> None:
    overlay = by_name(list(yaml.safe_load_all(kustomize(KUSTOMIZE / "overlays" / "gpu"))))
    chart = by_name(render("-f", str(KUSTOMIZE / "values.yaml"), "--set", "profile=gpu"))
    assert overlay.keys() == chart.keys()
    for key, doc in chart.items():
        assert overlay[key] == doc, key


def merged_container(runtime: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The runtime's container with the InferenceService's container fields merged in as KServe
    merges them (a strategic merge patch), done by kubectl's own implementation."""
    (c,) = runtime["spec"]["containers"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [c]},
    }
    patch = {"spec": {"containers": [{"name": c["name"], **overrides}]}}
    done = subprocess.run(
        [str(KUBECTL), "patch", "--local", "-f", "-", "--type", "strategic",
         "-p", json.dumps(patch), "-o", "json"],
        input=json.dumps(pod), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (merged,) = json.loads(done.stdout)["spec"]["containers"]
    return dict(merged)


def test_kserve_runtime_serves_v2_over_http_and_grpc_with_arguments_the_server_takes() -> None:
    (runtime,) = yaml.safe_load_all((KSERVE / "servingruntime.yaml").read_text())
    (service,) = yaml.safe_load_all((KSERVE / "inferenceservice.yaml").read_text())
    check_custom_resources([runtime, service])
    assert (runtime["apiVersion"], runtime["kind"]) == (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
    )
    assert (service["apiVersion"], service["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    (c,) = runtime["spec"]["containers"]
    # The runtime's container is a core Container: its schema applies, strictly.
    as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}
    as_pod["spec"]["containers"] = [c]
    for version in (OLDEST, NEWEST):
        kubernetes_validate.validate(as_pod, version, strict=True)
    assert c["command"] == ["rnnserve", "serve"]
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    environ = {e["name"]: e["value"] for e in c["env"]}
    assert f"--http-port={HTTP_PORT}" in c["args"]
    settings = Settings.from_sources(parser.parse_args(c["args"]), environ)
    assert str(settings.model_repository) == "/mnt/models"
    assert (settings.host, settings.grpc_port) == ("0.0.0.0", 8001)
    assert settings.http_port == HTTP_PORT
    # Serverless mode: Knative takes one container port, named for its protocol, and sends
    # every request there: the HTTP port.
    assert c["ports"] == [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HTTP_PORT}
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    # RawDeployment: KServe's Service carries every port of the merged container, the first as
    # port 80: HTTP there, gRPC beside it (a name with grpc in it: appProtocol grpc).
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    ports = merged_container(runtime, {"ports": model["ports"]})["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [
        ("http1", HTTP_PORT),
        ("grpc", settings.grpc_port),
    ]
