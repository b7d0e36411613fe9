"""Settings come from flags, then RNNSERVE_ environment variables, then defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rnnserve.config import Settings
from rnnserve.logging import LogLevel
from rnnserve.models import bundled_repository
from rnnserve.runtime.onnx import Provider, Spinning
from rnnserve.sessions.store import Durability, Verify


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
    defaults = settings([], {})
    assert (defaults.state_store, defaults.state_durability) == ("memory", Durability.STEP)
    environ = {"RNNSERVE_STATE_STORE": "rediss://:pw@db:6380/1", "RNNSERVE_STATE_DURABILITY": "end"}
    s = settings([], environ)
    assert (s.state_store, s.state_durability) == ("rediss://:pw@db:6380/1", Durability.END)
    assert settings(["--state-durability", "none"], environ).state_durability is Durability.NONE


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
        (["--provider", "tpu"], {}, "--provider .* must be auto, cpu, cuda"),
        (["--grpc-port", "70000"], {}, "not a port number"),
        (["--metrics-port", "-1"], {}, "not a port number .*off turns it off"),
        (["--metrics-port", "abc"], {}, "must be a whole number or off; got 'abc'"),
        (["--max-steps-per-request", "0"], {}, "--max-steps-per-request must be positive"),
        (["--ort-spinning", "3"], {}, "--ort-spinning .* must be never, during-run, always"),
        ([], {"RNNSERVE_INLINE_MAX_WORK": "-1"}, "--inline-max-work must be 0"),
        (["--native-spin-us", "-1"], {}, "--native-spin-us must be 0 .*never spin.* to 100000"),
        ([], {"RNNSERVE_NATIVE_SPIN_US": "200000"}, "--native-spin-us must be 0"),
        (["--state-store", "etcd://x"], {}, "--state-store must be memory, redis://"),
        ([], {"RNNSERVE_STATE_DURABILITY": "always"}, "RNNSERVE_STATE_DURABILITY.* must be step"),
        (["--state-store-timeout-s", "0"], {}, "--state-store-timeout-s must be positive"),
        (["--tls-cert", "tls.crt"], {}, "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], {}, "--tls-client-ca .* needs --tls-cert and --tls-key"),
        (["--state-store-ca", "ca.pem"], {}, "--state-store-ca: only for a TLS state store"),
        (
            ["--state-store", "redis://db:6379/0", "--state-store-verify", "none"],
            {},
            "--state-store-verify: only for a TLS state store",
        ),
        ([], {"RNNSERVE_STATE_STORE_VERIFY": "no"}, "STATE_STORE_VERIFY.* must be full, none"),
        (
            ["--state-store", "rediss://db:6379/0", "--state-store-cert", "c.pem"],
            {},
            "--state-store-cert and --state-store-key go together",
        ),
        ([], {"RNNSERVE_STATE_STORE_PASSWORD": "pw"}, "--state-store-password needs a Redis"),
        (
            ["--state-store", "redis://:pw@db:6379/0"],
            {"RNNSERVE_STATE_STORE_PASSWORD": "pw"},
            "already holds a password; --state-store-password would be a second",
        ),
        (
            ["--state-store", "redis://db:6379/0", "--state-store-password-file", "pw.txt"],
            {"RNNSERVE_STATE_STORE_PASSWORD": "pw"},
            "give one of them",
        ),
    ],
)
def test_bad_values_name_the_setting(argv, environ, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        settings(argv, environ)


def test_enumerated_settings_and_off() -> None:
    s = settings(["--provider", "cpu", "--ort-spinning", "never", "--metrics-port", "off"], {})
    assert (s.provider, s.ort_spinning, s.metrics_port) == (Provider.CPU, Spinning.NEVER, None)
    assert settings(["--ort-spinning", "2"], {}).ort_spinning is Spinning.ALWAYS  # as before
    assert settings([], {"RNNSERVE_LOG_LEVEL": "DEBUG"}).log_level is LogLevel.DEBUG
    assert settings(["--log-level", "debug", "--provider", "CPU"], {}).log_level is LogLevel.DEBUG
    defaults = settings([], {})
    assert defaults.max_queue_delay_us is None and defaults.intra_op_threads is None
    assert settings(["--max-queue-delay-us", "0"], {}).max_queue_delay_us == 0


def test_transport_security_settings() -> None:
    defaults = settings([], {})
    assert defaults.tls_cert is None and defaults.metrics_host is None
    assert defaults.state_store_verify is Verify.FULL
    environ = {
        "RNNSERVE_TLS_CERT": "/etc/tls/tls.crt",
        "RNNSERVE_TLS_KEY": "/etc/tls/tls.key",
        "RNNSERVE_TLS_CLIENT_CA": "/etc/tls/ca.crt",
        "RNNSERVE_METRICS_HOST": "10.0.0.5",
        "RNNSERVE_STATE_STORE": "rediss://rnnserve@db:6380/0",
        # A password is a string as given, even one that spells `off`.
        "RNNSERVE_STATE_STORE_PASSWORD": "none",
        "RNNSERVE_STATE_STORE_CA": "/etc/redis/ca.crt",
    }
    s = settings(["--state-store-verify", "none"], environ)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (
        Path("/etc/tls/tls.crt"),
        Path("/etc/tls/tls.key"),
        Path("/etc/tls/ca.crt"),
    )
    assert s.metrics_host == "10.0.0.5"
    assert (s.state_store_password, s.state_store_ca) == ("none", Path("/etc/redis/ca.crt"))
    assert s.state_store_verify is Verify.NONE
    secret = settings([], {**environ, "RNNSERVE_STATE_STORE_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(secret)  # nor in a log line that shows the settings
