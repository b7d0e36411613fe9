"""A real redis-server for the tests: loopback, a free port, a folder of its own, ended by PID."""

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

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningRedis:
    workdir: Path
    port: int
    flags: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def start(self) -> RunningRedis:
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_redis(workdir: Path, *flags: str) -> RunningRedis:
    """redis-server with no snapshots (add flags such as --appendonly yes to keep data)."""
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError("redis-server is missing: `make test` installs it (Debian redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    return RunningRedis(workdir, free_port(), flags).start()


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
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
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
