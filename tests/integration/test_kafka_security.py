"""Clients, a worker and a flow against a broker that requires SASL/PLAIN or SSL, configured
through the documented settings only (environment variables); and the settings it refuses,
each ending a daemon with one error line that names the setting.

One secured broker for the module (see tests/secure_broker.py): listeners SASL_PLAINTEXT,
SSL (a CA and certificate generated here) and SASL_SSL, and no PLAINTEXT one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.transaction_totals import transaction_totals
from sources.transactions import generate
from tasks.kafka import (
    TopicSpec,
    decode_json,
    ensure_topics,
    group_lag,
    make_consumer,
    make_producer,
)
from tasks.settings import Settings, get_settings
from tests.helpers import eventually, group_report
from tests.integration._transactions import alerts_by_user, changelog_totals, produce, reference
from tests.secure_broker import USER, SecureBroker, make_certificates, start_secure_broker

pytestmark = pytest.mark.integration

# How long a refused daemon may take to exit. Generous on purpose (a loaded machine
# starts Python slowly), yet far below the client timeout the refused runs are given
# (REFUSED_CLIENT_TIMEOUT_S): a daemon that retried until its timeout would miss it.
REFUSED_EXIT_DEADLINE_S = 60
REFUSED_CLIENT_TIMEOUT_S = 180
# Login attempts the broker may see from one refused daemon: kafka-python drops the
# broker's answer when the close follows it at once, so one refusal can take two.
MAX_REFUSED_LOGINS = 3


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure-kafka")
    broker = start_secure_broker(directory, directory / "broker.log")
    yield broker
    broker.stop()


def _use(monkeypatch, env: dict[str, str]) -> Settings:
    """Export `env` (on top of the test's own topic names) and read the settings anew, as
    every process of the test will."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture(params=["SASL_PLAINTEXT", "SSL", "SASL_SSL"])
def secured(request, settings, secure_broker, monkeypatch) -> Settings:
    """The test's settings, pointed at one secured listener of the broker."""
    return _use(monkeypatch, secure_broker.client_env(request.param))


def test_producer_and_group_consumer_round_trip(secured, unique):
    topic = f"secured-{unique}"
    ensure_topics([TopicSpec(topic, 2)], secured)
    producer = make_producer(secured)
    sent = {f"k{i}": {"i": i} for i in range(50)}
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.close()  # flushes

    group = f"secured-{unique}"
    consumer = make_consumer(topic, settings=secured, group_id=group)
    received: dict[str, bytes] = {}
    try:

        def all_received() -> bool:
            for records in consumer.poll(timeout_ms=500).values():
                received.update((r.key.decode(), r.value) for r in records)
            return len(received) == len(sent)

        eventually(all_received, 60, 0, lambda: f"received {sorted(received)}")
        consumer.commit()  # the group coordinator answers over this listener too
    finally:
        consumer.close()
    assert {key: decode_json(value) for key, value in received.items()} == sent
    assert group_lag(group, [topic], secured) == 0


def _start_worker(log: Path, env: dict[str, str | None] | None = None) -> subprocess.Popen:
    """`python -m stream_workers transaction-alerts` with the current environment and
    `env` on top (None: unset), its output in `log`."""
    environ = {name: value for name, value in (dict(os.environ) | (env or {})).items()
               if value is not None}  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_workers", "transaction-alerts", "--instance", "0"],
            env=environ, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SSL"])
def test_worker_and_flow_run_on_a_secured_listener(
    prefect_api, settings, secure_broker, monkeypatch, tmp_path, protocol
):
    s = _use(monkeypatch, secure_broker.client_env(protocol))
    stream = list(generate(5, 300, seed=11))
    produce(s, stream)
    want_alerts, want_totals = reference(stream)
    assert sum(map(len, want_alerts.values())) > 10  # the data does fire alerts

    log = tmp_path / "worker.log"
    worker = _start_worker(log)
    try:

        def diagnose() -> str:
            group = group_report(s, s.transaction_alerts_group, [s.transactions_topic])
            return f"{group}\n--- worker log\n{_tail(log)}"

        eventually(lambda: group_lag(s.transaction_alerts_group, [s.transactions_topic], s) == 0,
                   90, 0.5, diagnose)  # fmt: skip
        assert alerts_by_user(s) == want_alerts
        assert changelog_totals(s) == want_totals
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, _tail(log)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    text = log.read_text()
    assert "Traceback" not in text
    assert secure_broker.password not in text

    # The batch flow, in this process under the Prefect API, over the same listener.
    summary = transaction_totals()
    assert summary == {"loaded": len(stream), "rejected": 0, "users": len(want_totals),
                       "compared": len(want_totals), "mismatches": 0}  # fmt: skip


# --- settings the broker (or the settings object) refuses ---------------------------------


def _refused_logins(secure_broker: SecureBroker) -> int:
    """Logins (SASL or TLS) the broker has refused so far, from its log."""
    return secure_broker.broker.log_file.read_text().count("Failed authentication with")


def _assert_refused_a_few_times(secure_broker: SecureBroker, before: int, text: str) -> None:
    """The broker refused the daemon (it did not merely time out), and not many times: no
    retry storm. (The broker may log a refusal just after the daemon saw it.)"""
    refused = eventually(lambda: _refused_logins(secure_broker) - before, 30, 0.1,
                         lambda: text)  # fmt: skip
    assert refused <= MAX_REFUSED_LOGINS, text


def _run_refused(env: dict[str, str | None], log: Path) -> tuple[int, str]:
    """Run the worker with `env` on top of the current environment (None: unset); its
    exit status and log. It must exit on its own, well before its client timeout."""
    worker = _start_worker(log, {"KAFKA_TIMEOUT_S": str(REFUSED_CLIENT_TIMEOUT_S), **env})
    try:
        status = worker.wait(REFUSED_EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)
        pytest.fail(f"still running after {REFUSED_EXIT_DEADLINE_S}s:\n{_tail(log)}")
    return status, log.read_text(errors="replace")


def _assert_one_error_line(status: int, text: str, *names: str, secrets: tuple[str, ...]) -> str:
    """Exit status 2 (bad settings), exactly one error line of our own, naming each of
    `names`; no traceback; no secret anywhere."""
    assert status == 2, text
    ours = [line for line in text.splitlines() if "stopping:" in line]
    assert len(ours) == 1, text
    for name in names:
        assert name in ours[0], ours[0]
    assert "Traceback" not in text
    for secret in secrets:
        assert secret not in text
    return ours[0]


@pytest.mark.parametrize(
    ("protocol", "env", "names"),
    [
        ("SASL_PLAINTEXT", {"KAFKA_SASL_PASSWORD": "not-the-password"},
         ["PLAIN", repr(USER), "KAFKA_SASL_PASSWORD", "KAFKA_SASL_USERNAME"]),
        ("SASL_SSL", {"KAFKA_SASL_USERNAME": "mallory"},
         ["PLAIN", "'mallory'", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]),
        # A mechanism the settings know, the broker does not enable.
        ("SASL_PLAINTEXT", {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},
         ["SCRAM-SHA-256", repr(USER), "KAFKA_SASL_MECHANISM"]),
    ],
    ids=["wrong-password", "unknown-user", "mechanism-not-enabled"],
)  # fmt: skip
def test_refused_login_stops_the_worker_at_once_with_one_line(
    settings, secure_broker, monkeypatch, tmp_path, protocol, env, names
):
    _use(monkeypatch, secure_broker.client_env(protocol))
    before = _refused_logins(secure_broker)
    status, text = _run_refused(env, tmp_path / "worker.log")
    _assert_one_error_line(status, text, *names,
                           secrets=(secure_broker.password, "not-the-password"))  # fmt: skip
    _assert_refused_a_few_times(secure_broker, before, text)


def test_a_ca_that_did_not_sign_the_broker_stops_the_worker_at_once(
    settings, secure_broker, monkeypatch, tmp_path
):
    _use(monkeypatch, secure_broker.client_env("SSL"))
    stranger = make_certificates(tmp_path / "another-ca").ca_file
    before = _refused_logins(secure_broker)  # a failed TLS handshake counts as one
    status, text = _run_refused({"KAFKA_SSL_CAFILE": str(stranger)}, tmp_path / "worker.log")
    line = _assert_one_error_line(status, text, "KAFKA_SSL_CAFILE", "CERTIFICATE_VERIFY_FAILED",
                                  secrets=())  # fmt: skip
    assert str(stranger) in line
    _assert_refused_a_few_times(secure_broker, before, text)


@pytest.mark.parametrize(
    ("protocol", "env", "names"),
    [
        ("SASL_PLAINTEXT", {"KAFKA_SASL_MECHANISM": "FOO"}, ["KAFKA_SASL_MECHANISM", "'FOO'"]),
        ("SASL_PLAINTEXT", {"KAFKA_SASL_MECHANISM": None},
         ["KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM"]),
        ("SASL_PLAINTEXT", {"KAFKA_SASL_PASSWORD": None},
         ["KAFKA_SASL_MECHANISM=PLAIN", "KAFKA_SASL_PASSWORD"]),
        ("SSL", {"KAFKA_SSL_CAFILE": "{tmp}/missing-ca.pem"},
         ["KAFKA_SSL_CAFILE", "missing-ca.pem", "No such file"]),
        ("SSL", {"KAFKA_SSL_CAFILE": "{tmp}"}, ["KAFKA_SSL_CAFILE", "Is a directory"]),
        ("SSL", {"KAFKA_SSL_CAFILE": "{tmp}/not-a-ca.pem"},
         ["KAFKA_SSL_CAFILE", "not-a-ca.pem", "no PEM CA certificate"]),
    ],
    ids=["unknown-mechanism", "no-mechanism", "no-password", "ca-file-missing",
         "ca-file-a-directory", "ca-file-not-pem"],
)  # fmt: skip
def test_bad_settings_stop_the_worker_before_any_connection(
    settings, secure_broker, monkeypatch, tmp_path, protocol, env, names
):
    _use(monkeypatch, secure_broker.client_env(protocol))
    (tmp_path / "not-a-ca.pem").write_text("-----BEGIN NOTHING-----\nhello\n")
    env = {name: None if value is None else value.format(tmp=tmp_path)
           for name, value in env.items()}  # fmt: skip
    before = _refused_logins(secure_broker)
    status, text = _run_refused(env, tmp_path / "worker.log")
    _assert_one_error_line(status, text, *names, secrets=(secure_broker.password,))
    assert "kafka.net" not in text  # refused by the settings: no client was even built
    assert _refused_logins(secure_broker) == before
