"""TorchServe 0.12 as a peer: the same model file behind TorchServe's sequence batching.

`make torchserve` installs it (Java from Debian, the Python packages into the virtualenv). The
model is packaged with `torchserve_handler.py` (ONNX Runtime, state kept per sequence id) and
served with one worker process, batches of up to the model's max batch size, and a batch delay
of `BATCH_DELAY_MS`. The load generator drives it over its bidirectional `StreamPredictions2`
RPC, one stream per sequence, exactly as it drives rnnserve.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from rnnserve.api.codec import length_delimited as encode_field
from rnnserve_bench.loadgen import StreamApi
from rnnserve_bench.procs import ProcessError, process_cpu_seconds
from rnnserve_bench.workload import SequenceMessages, Workload

HANDLER = Path(__file__).with_name("torchserve_handler.py")
MODEL_NAME = "rnn"
BATCH_DELAY_MS = 5
"""TorchServe waits this long for a batch to fill (its default is 100 ms). At 64 sequences on
the 2-core VM, 5 ms gave 1,840 steps/s against 1,574 with 1 ms and 1,240 with 20 ms."""
START_TIMEOUT_S = 120.0
WARMUP_S = 5.0
"""At least this long under load before its point is measured (a fresh JVM runs slow)."""
SEQUENCE_IDLE_MS = 2000
"""TorchServe 0.12 over gRPC frees a sequence only once it is idle this long."""

LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""

STREAM = StreamApi(
    method="/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions2",
    ok_tag=0x0A,  # PredictionResponse.prediction; an error carries only `status` (field 3)
    describe=lambda reply: f"TorchServe answered {bytes(reply)[:300]!r}",
)


def find() -> tuple[Path, Path] | str:
    """torchserve and torch-model-archiver, next to this Python or on PATH; or why not."""
    found = []
    for name in ("torchserve", "torch-model-archiver"):
        beside = Path(sys.executable).with_name(name)
        path = beside if beside.exists() else shutil.which(name)
        if path is None:
            return f"{name} is not installed (`make torchserve`)"
        found.append(Path(path))
    if shutil.which("java") is None:
        return "java is not on PATH (`make torchserve` installs it from Debian)"
    return found[0], found[1]


def request(sequence_id: int, inputs: Mapping[str, np.ndarray], start: bool, end: bool) -> bytes:
    """One PredictionsRequest (model_name 1, input 3, sequence_id 4) for the handler."""
    entries = {name: array.tobytes() for name, array in inputs.items()}
    if start:
        entries["sequence_start"] = b"1"
    if end:
        entries["sequence_end"] = b"1"
    message = encode_field(1, MODEL_NAME.encode())
    for key, value in entries.items():
        message += encode_field(3, encode_field(1, key.encode()) + encode_field(2, value))
    return message + encode_field(4, str(sequence_id).encode())


def messages(workload: Workload, sequence_id: int, steps: int) -> SequenceMessages:
    """A sequence's requests of zero-valued steps, as `Workload.messages` makes rnnserve's."""
    zeros = {t.name: t.zeros(1, steps) for t in workload.inputs}
    return SequenceMessages(
        start=request(sequence_id, zeros, start=True, end=False),
        step=request(sequence_id, zeros, start=False, end=False),
        end=request(sequence_id, zeros, start=False, end=True),
    )


def settings(max_batch: int) -> dict[str, object]:
    """TorchServe's model settings: one worker process (one model call at a time, as in
    rnnserve), the model's own max batch size, sequence batching."""
    return {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": max_batch,
        "maxBatchDelay": BATCH_DELAY_MS,
        "sequenceBatching": True,
        "sequenceMaxIdleMSec": SEQUENCE_IDLE_MS,
        "maxNumSequence": 4096,
        "maxSequenceJobQueueSize": 16,
    }


def package(workload: Workload, archiver: Path, workdir: Path, max_batch: int) -> Path:
    """The model store, holding `rnn.mar`: the model file, the handler and its config."""
    store = workdir / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    config = {
        **settings(max_batch),
        "handler": {
            "model_file": workload.model_file.name,
            "inputs": [
                {"name": t.name, "dtype": t.zeros(1, 1).dtype.str, "dims": list(t.dims)}
                for t in workload.inputs
            ],
            "states": [
                {"input": s.input_name, "output": s.output_name, "dims": list(s.dims)}
                for s in workload.states
            ],
            "output": workload.outputs[0].name,
        },
    }
    # JSON is YAML: TorchServe reads the config with PyYAML.
    config_file = workdir / "model-config.yaml"
    config_file.write_text(json.dumps(config, indent=2))
    command = [
        str(archiver), "--model-name", MODEL_NAME, "--version", "1",
        "--handler", str(HANDLER), "--serialized-file", str(workload.model_file),
        "--config-file", str(config_file), "--export-path", str(store), "--force",
    ]  # fmt: skip
    # The archiver stages files in the temporary folder under the model's name: one each.
    environment = {**os.environ, "TMPDIR": str(workdir.resolve())}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    if done.returncode != 0:
        raise ProcessError(f"torch-model-archiver failed: {done.stderr[-2000:]}")
    return store


class TorchServe:
    """TorchServe in its own process group on free loopback ports, stopped on exit."""

    name = "torchserve"

    def __init__(self, binary: Path, store: Path, workdir: Path) -> None:
        # Absolute: TorchServe runs in `workdir` and reads these paths from there.
        store, workdir = store.resolve(), workdir.resolve()
        ports = _free_ports(5)
        self.grpc_port, self._management = ports[0], ports[2]
        # Warnings only: at INFO, TorchServe logs several lines per request.
        log_config = workdir / "log4j2.xml"
        log_config.write_text(LOG_CONFIG)
        properties = workdir / "config.properties"
        properties.write_text(
            f"inference_address=http://127.0.0.1:{ports[1]}\n"
            f"management_address=http://127.0.0.1:{ports[2]}\n"
            f"metrics_address=http://127.0.0.1:{ports[3]}\n"
            f"grpc_inference_port={ports[0]}\n"
            f"grpc_management_port={ports[4]}\n"
            "disable_token_authorization=true\n"
            "disable_system_metrics=true\n"
            f"vmargs=-Dlog4j.configurationFile=file://{log_config}\n"
        )
        self.log_path = workdir / "torchserve.log"
        command = [
            str(binary), "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--model-store", str(store), "--models", f"{MODEL_NAME}={MODEL_NAME}.mar",
            "--ts-config", str(properties),
        ]  # fmt: skip
        # Its own session: TorchServe's launcher starts Java, which starts the Python worker;
        # stopping the group stops all three and nothing else.
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
                env={
                    **os.environ,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    # The launcher keeps its pid file in the temporary folder, and refuses to
                    # start while another instance's is there: one folder per instance.
                    "TMPDIR": str(workdir),
                },
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self._management}/models/{MODEL_NAME}"
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(f"torchserve exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    workers = json.loads(response.read())[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    return
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.5)
        raise ProcessError(f"torchserve did not get ready:\n{self.log_tail()}")

    def alive(self) -> bool:
        """The launcher runs. It is never reaped before `stop`, so its group id stays ours."""
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def cpu_seconds(self) -> float:
        """CPU of the launcher, Java and the worker: every process in TorchServe's session."""
        total = 0.0
        for pid in self._members():
            try:
                total += process_cpu_seconds(pid)
            except (OSError, ValueError):
                continue  # gone meanwhile
        return total

    def _members(self) -> list[int]:
        """The processes of TorchServe's session, the launcher among them while unreaped."""
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == self.process.pid:
                        members.append(int(entry.name))
                except OSError:
                    continue  # gone meanwhile
        return members

    def cpu_by_thread(self) -> dict[int, tuple[str, float]]:
        return {}  # several processes, Java's threads among them: no kinds to tell apart

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the launcher, Java and the worker; SIGKILL to what is left after
        `timeout`; the launcher is reaped last, so the group id is never someone else's."""
        if self.process.returncode is not None:
            return  # stopped already
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._running_members() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._running_members():
            self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, number: int) -> None:
        try:
            os.killpg(self.process.pid, number)
        except ProcessLookupError:
            pass

    def _running_members(self) -> bool:
        """A process of TorchServe's session still runs (the unreaped launcher aside)."""
        return self.alive() or any(pid != self.process.pid for pid in self._members())

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def _free_ports(count: int) -> list[int]:
    """Ports free now (TorchServe cannot be told to pick its own and report them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
