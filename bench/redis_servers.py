"""Real Redis for the tests and the benchmark, on loopback, each server on a free port with a
folder of its own, ended by PID: a redis-server (with TLS only, no plain port, when given
certificates), Sentinels watching a primary, and a Redis Cluster made with redis-cli."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rnnserve_bench.procs import end_process

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RedisTls:
    """The TLS port's certificate and key, and the CA it trusts for client certificates. With
    `client` (a certificate and key that CA issued), clients must present one."""

    cert: Path
    key: Path
    ca: Path
    client: tuple[Path, Path] | None = None

    def flags(self, port: int) -> tuple[str, ...]:
        return (
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "yes" if self.client else "no",
        )  # fmt: skip

    def client_options(self) -> dict[str, object]:
        """redis-py's options for a client that trusts this server (and has its certificate).
        The tests' own client checks the CA only: some tests' certificates name other hosts."""
        options: dict[str, object] = {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_check_hostname": False,
        }
        if self.client is not None:
            options["ssl_certfile"], options["ssl_keyfile"] = map(str, self.client)
        return options


@dataclass
class RunningRedis:
    workdir: Path
    port: int
    flags: tuple[str, ...]
    tls: RedisTls | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self, **options: object) -> redis.Redis:
        """A client on the first database (TLS when the server speaks it); `options` go to
        redis-py (`password=...`)."""
        tls = self.tls.client_options() if self.tls else {}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
            **tls,
            **options,
        )

    def start(self) -> RunningRedis:
        log = (self.workdir / "redis.log").open("ab")
        ports = self.tls.flags(self.port) if self.tls else ("--port", str(self.port))
        self.process = subprocess.Popen(
            [
                REDIS_SERVER, *ports, "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return self
                except redis.AuthenticationError:
                    return self  # up, and asking for the password it was started with
                except redis.ConnectionError:  # not listening yet, or still loading its data
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    log = (self.workdir / "redis.log").read_text()
                    raise RuntimeError(f"redis-server did not start:\n{log}")
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            end_process(self.process, sig)
        self.process = None


def start_redis(workdir: Path, *flags: str, tls: RedisTls | None = None) -> RunningRedis:
    """redis-server with no snapshots (add flags such as --appendonly yes to keep data); with
    `tls`, on a TLS port only."""
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError("redis-server is missing: `make test` installs it (Debian redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    return RunningRedis(workdir, free_port(), flags, tls).start()


@dataclass
class RunningSentinel:
    """A Redis Sentinel (`redis-server CONF --sentinel`) watching one primary."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def primary(self, name: str) -> tuple[str, int] | None:
        """Where this Sentinel says the primary `name` is now."""
        with self.client() as client:
            found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        return (found[0].decode(), int(found[1])) if found else None

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)
        self.process = None


def start_sentinel(
    workdir: Path, primary: RunningRedis, name: str, quorum: int, down_after_ms: int = 1000
) -> RunningSentinel:
    """A Sentinel of `primary` under `name`; it rewrites its own configuration file, as
    Sentinels do, so each has a folder of its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {name} 127.0.0.1 {primary.port} {quorum}\n"
        f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
        f"sentinel failover-timeout {name} 10000\n"
        f"sentinel parallel-syncs {name} 1\n"
    )
    log = (workdir / "sentinel.log").open("ab")
    process = subprocess.Popen(
        [REDIS_SERVER, str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    sentinel = RunningSentinel(workdir, port, process)
    deadline = time.monotonic() + 20
    while True:
        try:
            if sentinel.primary(name) is not None:
                return sentinel
        except redis.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            sentinel.stop()
            raise RuntimeError(
                f"redis-sentinel did not start:\n{(workdir / 'sentinel.log').read_text()}"
            )
        time.sleep(0.02)


def wait_for_replicas(primary: RunningRedis, count: int, timeout_s: float = 20) -> None:
    """Until `primary` has `count` replicas online and in sync."""
    deadline = time.monotonic() + timeout_s
    with primary.client() as client:
        while True:
            info = client.info("replication")
            online = [
                v for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]  # fmt: skip
            if len(online) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(online)} of {count} replicas online: {info}")
            time.sleep(0.05)


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
CLUSTER_FLAGS = (
    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
    # A primary not heard from for 1 s is failed over (Redis's default: 15 s).
    "--cluster-node-timeout", "1000",
)  # fmt: skip


@dataclass
class RunningCluster:
    nodes: list[RunningRedis]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def node_ids(self) -> dict[int, tuple[str, str]]:
        """Each live node's port: its id and role (master or slave), as the cluster says."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                with node.client() as client:
                    text = client.execute_command("CLUSTER", "NODES")
            except redis.ConnectionError:
                continue
            text = text.decode() if isinstance(text, bytes) else text
            found = {}
            for line in text.splitlines():
                fields = line.split()
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                role = "master" if "master" in fields[2] and "fail" not in fields[2] else "slave"
                found[port] = (fields[0], role)
            return found
        raise RuntimeError("no cluster node answers")

    def primaries(self) -> list[int]:
        return sorted(p for p, (_, role) in self.node_ids().items() if role == "master")

    def cli(self, *args: str, timeout_s: float = 120) -> str:
        done = subprocess.run(
            [REDIS_CLI, *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok and agrees on the slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for node in self.nodes:
                if node.process is None:
                    continue
                try:
                    with node.client() as client:
                        info = client.execute_command("CLUSTER", "INFO")
                    states.append(
                        "cluster_state:ok"
                        in (info.decode() if isinstance(info, bytes) else str(info))
                    )
                except redis.ConnectionError:
                    states.append(False)
            if all(states):
                try:
                    self.cli("--cluster", "check", f"127.0.0.1:{self.live()[0].port}", timeout_s=10)
                    return
                except RuntimeError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok: {states}")
            time.sleep(0.1)

    def live(self) -> list[RunningRedis]:
        return [n for n in self.nodes if n.process is not None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(workdir: Path, primaries: int = 3, replicas: int = 1) -> RunningCluster:
    """A Redis Cluster on loopback: `primaries` shards, each with `replicas` replicas, made
    with `redis-cli --cluster create`; each node keeps its nodes.conf in a folder of its own,
    so a node started again rejoins the cluster."""
    nodes: list[RunningRedis] = []
    cluster = RunningCluster(nodes)
    try:
        for k in range(primaries * (1 + replicas)):
            # The cluster bus port: by default the port + 10,000, which a free port above
            # 55,535 does not leave room for.
            bus = ("--cluster-port", str(free_port()))
            nodes.append(start_redis(workdir / f"node{k}", *CLUSTER_FLAGS, *bus))
        cluster.cli(
            "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas", str(replicas), "--cluster-yes",
        )  # fmt: skip
        cluster.wait_ok()
        for port in cluster.primaries():
            wait_for_replicas(next(n for n in nodes if n.port == port), replicas)
    except BaseException:
        cluster.stop()
        raise
    return cluster
