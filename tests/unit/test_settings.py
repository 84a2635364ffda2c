from pathlib import Path

import pytest
from kafka.errors import (
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)
from pydantic import ValidationError

from tasks.commands import settings_error
from tasks.kafka import KafkaConfigError, _unavailable, client_config
from tasks.settings import Settings
from tests.secure_broker import make_certificates

SECURITY = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
            "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE")  # fmt: skip


@pytest.fixture
def no_security_env(monkeypatch):
    for name in SECURITY:
        monkeypatch.delenv(name, raising=False)


def test_defaults_follow_the_contract(monkeypatch):
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "WAREHOUSE_PATH", "TRADES_TOPIC"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert s.warehouse_path == Path("data/warehouse.duckdb")
    assert s.trades_topic == "trades"
    assert s.dlq_topic("trades") == "trades.dlq"
    assert s.jobs_topic("payments", "REALTIME") == "jobs.payments.realtime"
    assert s.job_results_topic("payments") == "job-results.payments"


def test_environment_variables_override(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-a:9093,broker-b:9093")
    monkeypatch.setenv("WAREHOUSE_PATH", "/tmp/elsewhere.duckdb")
    s = Settings(_env_file=None)
    assert client_config(s)["bootstrap_servers"] == ["broker-a:9093", "broker-b:9093"]
    assert s.warehouse_path == Path("/tmp/elsewhere.duckdb")


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("TRADES_TOPIC", raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text("TRADES_TOPIC=ticks\n")
    assert Settings(_env_file=env_file).trades_topic == "ticks"


def test_security_settings_pass_through_and_password_stays_secret(monkeypatch, tmp_path):
    ca_file = make_certificates(tmp_path).ca_file
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(ca_file))
    s = Settings(_env_file=None)
    config = client_config(s)
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "svc"
    assert config["sasl_plain_password"] == "hunter2"
    assert config["ssl_cafile"] == str(ca_file)
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_plaintext_config_has_no_sasl_keys(monkeypatch):
    monkeypatch.delenv("KAFKA_SASL_MECHANISM", raising=False)
    monkeypatch.delenv("KAFKA_SECURITY_PROTOCOL", raising=False)
    config = client_config(Settings(_env_file=None))
    assert config["security_protocol"] == "PLAINTEXT"
    assert not any(key.startswith("sasl") for key in config)


def _refusal(**env: str) -> str:
    """The one-line error a daemon prints for these settings."""
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **{name.lower(): value for name, value in env.items()})
    line = settings_error(caught.value)
    assert "\n" not in line
    return line


@pytest.mark.usefixtures("no_security_env")
def test_an_unknown_mechanism_is_named_with_the_value_given():
    line = _refusal(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_MECHANISM="FOO",
                    KAFKA_SASL_USERNAME="svc", KAFKA_SASL_PASSWORD="hunter2")  # fmt: skip
    assert "KAFKA_SASL_MECHANISM" in line and "'FOO'" in line and "'PLAIN'" in line
    assert "hunter2" not in line


@pytest.mark.usefixtures("no_security_env")
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL_SSL needs KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "svc",
          "KAFKA_SASL_PASSWORD": "hunter2"},
         "KAFKA_SASL_MECHANISM=PLAIN is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
          "KAFKA_SASL_PASSWORD": "hunter2"}, "PLAIN needs KAFKA_SASL_USERNAME"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
          "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": ""},
         "SCRAM-SHA-256 needs KAFKA_SASL_PASSWORD"),
    ],
)  # fmt: skip
def test_sasl_settings_that_cannot_log_in_are_refused_naming_them(env, named):
    line = _refusal(**env)
    assert named in line
    assert "hunter2" not in line


@pytest.mark.usefixtures("no_security_env")
def test_complete_sasl_settings_pass():
    s = Settings(_env_file=None, kafka_security_protocol="SASL_PLAINTEXT",
                 kafka_sasl_mechanism="PLAIN", kafka_sasl_username="svc",
                 kafka_sasl_password="hunter2")  # fmt: skip
    assert client_config(s)["sasl_plain_username"] == "svc"


@pytest.mark.usefixtures("no_security_env")
@pytest.mark.parametrize("case", ["missing", "directory", "not PEM"])
def test_a_ca_file_clients_could_not_load_is_refused_naming_the_setting(tmp_path, case):
    path = {"missing": tmp_path / "nope.pem", "directory": tmp_path,
            "not PEM": tmp_path / "notes.txt"}[case]  # fmt: skip
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    line = _refusal(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(path))
    assert line.startswith("invalid settings: KAFKA_SSL_CAFILE: ")
    assert str(path) in line


def _sasl_settings() -> Settings:
    return Settings(_env_file=None, kafka_bootstrap_servers="kafka.example:9096",
                    kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                    kafka_sasl_username="svc", kafka_sasl_password="hunter2")  # fmt: skip


@pytest.mark.usefixtures("no_security_env")
def test_a_refused_login_names_mechanism_user_and_settings_but_never_the_password():
    # A broker echoing the password back must not get it printed either.
    refusal = SaslAuthenticationFailedError(
        "SaslAuthenticationFailedError: Authentication failed for hunter2"
    )
    error = _unavailable(_sasl_settings(), refusal)
    assert isinstance(error, KafkaConfigError)
    message = str(error)
    assert "kafka.example:9096" in message and "SASL PLAIN" in message and "'svc'" in message
    assert "KAFKA_SASL_USERNAME" in message and "KAFKA_SASL_PASSWORD" in message
    assert "Authentication failed for ***" in message
    assert "hunter2" not in message


@pytest.mark.usefixtures("no_security_env")
def test_a_mechanism_the_broker_does_not_enable_names_the_setting():
    refusal = UnsupportedSaslMechanismError(
        "Kafka broker does not support PLAIN sasl mechanism. Enabled mechanisms: ['SCRAM-SHA-512']"
    )
    message = str(_unavailable(_sasl_settings(), refusal))
    assert "KAFKA_SASL_MECHANISM" in message and "SCRAM-SHA-512" in message


@pytest.mark.usefixtures("no_security_env")
def test_a_timeout_is_not_a_settings_error():
    error = _unavailable(_sasl_settings(), KafkaTimeoutError("Unable to bootstrap"))
    assert not isinstance(error, KafkaConfigError)
    assert "not reachable at kafka.example:9096" in str(error)
