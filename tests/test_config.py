"""Settings come from flags, then RNNSERVE_ environment variables, then defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rnnserve.config import Settings
from rnnserve.models import bundled_repository


def settings(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_sources(parser.parse_args(argv), environ)


def test_defaults() -> None:
    s = settings([], {})
    assert (s.grpc_port, s.metrics_port, s.host) == (8001, 8002, "127.0.0.1")
    assert s.model_repository == bundled_repository()
    assert (s.model_repository / "charlm_lstm" / "config.pbtxt").is_file()


def test_state_store_settings() -> None:
    assert (settings([], {}).state_store, settings([], {}).state_durability) == ("memory", "step")
    environ = {"RNNSERVE_STATE_STORE": "rediss://:pw@db:6380/1", "RNNSERVE_STATE_DURABILITY": "end"}
    s = settings([], environ)
    assert (s.state_store, s.state_durability) == ("rediss://:pw@db:6380/1", "end")
    assert settings(["--state-durability", "none"], environ).state_durability == "none"


def test_environment_then_flag() -> None:
    environ = {
        "RNNSERVE_GRPC_PORT": "9001",
        "RNNSERVE_MODEL_REPOSITORY": "/srv/models",
        "RNNSERVE_IDLE_TIMEOUT_S": "2.5",
    }
    s = settings([], environ)
    assert (s.grpc_port, s.model_repository, s.idle_timeout_s) == (9001, Path("/srv/models"), 2.5)
    assert settings(["--grpc-port", "7001"], environ).grpc_port == 7001


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        ([], {"RNNSERVE_GRPC_PORT": "http"}, "RNNSERVE_GRPC_PORT"),
        (["--provider", "tpu"], {}, "--provider must be auto, cpu or cuda"),
        (["--grpc-port", "70000"], {}, "not a port number"),
        (["--max-steps-per-request", "-1"], {}, "0 \\(per model\\) or more"),
        (["--ort-spinning", "3"], {}, "--ort-spinning must be 0, 1 or 2"),
        ([], {"RNNSERVE_INLINE_MAX_STEPS": "-1"}, "--inline-max-steps must be 0"),
        (["--state-store", "etcd://x"], {}, "--state-store must be memory or redis://"),
        ([], {"RNNSERVE_STATE_DURABILITY": "always"}, "--state-durability must be step, end"),
        (["--state-store-timeout-s", "0"], {}, "--state-store-timeout-s must be positive"),
    ],
)
def test_bad_values_name_the_setting(argv, environ, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        settings(argv, environ)
