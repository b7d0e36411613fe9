"""A real redis-server for the tests: loopback, a free port, a folder of its own, ended by PID;
with TLS only (no plain port) when given certificates."""

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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_redis(workdir: Path, *flags: str, tls: RedisTls | None = None) -> RunningRedis:
    """redis-server with no snapshots (add flags such as --appendonly yes to keep data); with
    `tls`, on a TLS port only."""
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError("redis-server is missing: `make test` installs it (Debian redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    return RunningRedis(workdir, free_port(), flags, tls).start()
