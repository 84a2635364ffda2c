from pathlib import Path

from tasks.kafka import client_config
from tasks.settings import Settings


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


def test_security_settings_pass_through_and_password_stays_secret(monkeypatch):
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", "/etc/ca.pem")
    s = Settings(_env_file=None)
    config = client_config(s)
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "svc"
    assert config["sasl_plain_password"] == "hunter2"
    assert config["ssl_cafile"] == "/etc/ca.pem"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_plaintext_config_has_no_sasl_keys(monkeypatch):
    monkeypatch.delenv("KAFKA_SASL_MECHANISM", raising=False)
    monkeypatch.delenv("KAFKA_SECURITY_PROTOCOL", raising=False)
    config = client_config(Settings(_env_file=None))
    assert config["security_protocol"] == "PLAINTEXT"
    assert not any(key.startswith("sasl") for key in config)
