"""The Prometheus endpoint of real worker daemons (subprocesses, the real broker): the
counters equal what was produced and consumed, the lag comes back to 0, the labels name
the worker, its instance and (jobs) its lanes; a port in use stops a daemon at once."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sources.transactions import generate
from tasks.jobs import Job, Priority
from tasks.kafka import ensure_topics, job_topics, make_producer
from tests.conftest import subprocess_env
from tests.helpers import eventually, group_report, read_topic, settled, status_report
from tests.integration._transactions import MALFORMED, produce, reference

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m stream_workers <argv>` in the background, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "stream_workers", *argv],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self) -> int:
        """SIGTERM: the batch in hand commits and the daemon exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def tail(self) -> str:
        return f"--- {self.log} (last 4000 characters)\n{self.log.read_text()[-4000:]}"


@pytest.fixture
def daemons(tmp_path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


class Endpoint:
    """Scrapes http://127.0.0.1:<port>/metrics; keeps the last text for the diagnosis."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.text = "(not scraped yet)"

    def samples(self) -> Samples:
        """Every sample as (name, labels) -> value; empty while nothing answers."""
        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.text = response.read().decode()
        except (urllib.error.URLError, ConnectionError) as error:
            self.text = f"(no answer: {error})"
            return {}
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(self.text)
                for s in family.samples}  # fmt: skip

    def value(self, samples: Samples, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` whose labels include `labels`."""
        values = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
        return sum(values) if values else None


def test_transaction_alerts_metrics_equal_what_was_produced_and_consumed(
    settings, tmp_path, seed, daemons
):
    port = free_port()
    status_dir = tmp_path / "status"
    env = subprocess_env() | {
        "STREAM_HEARTBEAT_INTERVAL_S": "1",  # the lag refreshed every second
        "STREAM_STATUS_DIR": str(status_dir),
        "TRANSACTION_ALERTS_BATCH_SIZE": "100",  # several transactions
        "STREAM_EVENTS_ENABLED": "false",
    }
    good = list(generate(6, 600, seed=seed))
    bad = [m[:2] for m in MALFORMED]
    produce(settings, good[:250] + bad + good[250:])
    worker = Daemon(["transaction-alerts", "--instance", "m0", "--metrics-port", str(port)],
                    tmp_path / "worker.log", env)  # fmt: skip
    daemons.append(worker)
    endpoint = Endpoint(port)
    topic = settings.transactions_topic
    outputs = [settings.transaction_alerts_topic, settings.transaction_totals_changelog_topic]

    def diagnose() -> str:
        group = group_report(settings, settings.transaction_alerts_group, [topic])
        return (f"seed {seed}\n{group}\n{status_report(status_dir)}\nlast scrape:\n"
                f"{endpoint.text}\n{worker.tail()}")  # fmt: skip

    ident = {"worker": "transaction-alerts", "instance": "m0"}

    def caught_up() -> Samples | None:
        samples = endpoint.samples()
        lag = [v for (n, ls), v in samples.items() if n == "stream_worker_lag_records"]
        done = (
            endpoint.value(samples, "stream_worker_records_total", **ident) == len(good) + len(bad)
            and len(lag) == settings.kafka_default_partitions
            and not any(lag)
        )
        return samples if done else None

    samples = eventually(caught_up, 120, 0.25, diagnose)
    eventually(lambda: settled(settings, outputs), 60, 0.1, diagnose)

    def value(name: str, **labels: str) -> float | None:
        return endpoint.value(samples, name, **ident, **labels)

    assert value("stream_worker_dead_letters_total") == len(bad), diagnose()
    # Outputs: every alert and every changelog update on the topics (read_committed).
    alerts = sum(map(len, reference(good)[0].values()))
    on_topics = [len(read_topic(settings, t)) for t in outputs]
    assert on_topics[0] == alerts
    assert value("stream_worker_outputs_total") == sum(on_topics), diagnose()
    assert value("stream_worker_counts_total", count="alerts") == alerts
    committed = value("stream_worker_transactions_total", outcome="committed")
    assert committed >= 1 and value("stream_worker_batch_seconds_count") == committed
    # The same numbers as the worker's own status file (written on the same tick).
    status = eventually(lambda: next((s for s in _statuses(status_dir)
                                      if s["commits"] == committed), None), 30, 0.2, diagnose)  # fmt: skip
    assert value("stream_worker_transactions_total", outcome="aborted") == status["aborts"]
    # Every series names the worker and its instance; the lag each assigned partition.
    for _, labels in samples:
        assert ident.items() <= dict(labels).items()
    partitions = {dict(ls)["partition"] for n, ls in samples if n == "stream_worker_lag_records"}
    topics = {dict(ls)["topic"] for n, ls in samples if n == "stream_worker_lag_records"}
    assert (topics, partitions) == ({topic}, {"0", "1", "2"})
    assert worker.stop() == 0, diagnose()


def _statuses(status_dir: Path) -> list[dict]:
    from tests.helpers import worker_statuses

    return worker_statuses(status_dir) if status_dir.exists() else []


def test_a_metrics_port_in_use_stops_the_worker_at_once_with_one_line(settings, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "stream_workers", "transaction-alerts", "--metrics-port",
             str(port)], env=subprocess_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port {port})" in line


def _send_jobs(settings, priority: Priority, count: int) -> None:
    producer = make_producer(settings)
    topic = settings.jobs_topic("payments", priority.value)
    try:
        for n in range(count):
            job = Job(processor="payments", group="payment-submit", priority=priority,
                      data={"amount": f"{n + 1}.00", "currency": "EUR"})  # fmt: skip
            producer.send(topic, key=str(job.id), value=job)
        producer.flush()
    finally:
        producer.close()


def test_the_jobs_daemon_serves_both_lanes_on_one_endpoint(settings, tmp_path, daemons):
    ensure_topics(job_topics("payments", settings), settings)
    port = free_port()
    env = subprocess_env() | {"STREAM_HEARTBEAT_INTERVAL_S": "1", "STREAM_EVENTS_ENABLED": "false"}
    realtime, normal = 5, 8
    _send_jobs(settings, Priority.REALTIME, realtime)
    _send_jobs(settings, Priority.NORMAL, normal)
    daemon = Daemon(["jobs", "--processor", "payments", "--instance", "7", "--metrics-port",
                     str(port)], tmp_path / "daemon.log", env)  # fmt: skip
    daemons.append(daemon)
    endpoint = Endpoint(port)
    ident = {"worker": "jobs-payments", "instance": "7"}

    def diagnose() -> str:
        return f"last scrape:\n{endpoint.text}\n{daemon.tail()}"

    def lag_of(samples: Samples, lane: str) -> list[float]:
        return [v for (n, ls), v in samples.items()
                if n == "stream_worker_lag_records" and ("lane", lane) in ls]  # fmt: skip

    def served() -> Samples | None:
        samples = endpoint.samples()
        records = {lane: endpoint.value(samples, "stream_worker_records_total", lane=lane,
                                        **ident) for lane in ("realtime", "normal")}  # fmt: skip
        lags = {lane: lag_of(samples, lane) for lane in ("realtime", "normal")}
        caught_up = [len(lag) == settings.kafka_default_partitions and not any(lag)
                     for lag in lags.values()]  # fmt: skip
        done = records == {"realtime": realtime, "normal": normal} and all(caught_up)
        return samples if done else None

    samples = eventually(served, 120, 0.25, diagnose)

    for lane, count in (("realtime", realtime), ("normal", normal)):
        assert endpoint.value(samples, "stream_worker_outputs_total", lane=lane) == count
        assert endpoint.value(samples, "stream_worker_counts_total", lane=lane, count="ok") == (
            count
        )  # fmt: skip
        committed = endpoint.value(samples, "stream_worker_transactions_total", lane=lane,
                                   outcome="committed")  # fmt: skip
        assert committed >= 1, diagnose()
        topics = {dict(ls)["topic"] for (n, ls) in samples
                  if n == "stream_worker_lag_records" and ("lane", lane) in ls}  # fmt: skip
        assert topics == {settings.jobs_topic("payments", lane)}
    for _, labels in samples:
        assert ident.items() <= dict(labels).items() and dict(labels)["lane"] in {
            "realtime", "normal",
        }  # fmt: skip
    assert daemon.stop() == 0, diagnose()
