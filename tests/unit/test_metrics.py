"""A worker daemon's metrics and events (stream_workers/metrics.py), fed by a runtime on the
fakes of tests/unit/fakes.py; the endpoint is a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import socket
import time
import urllib.request
from types import SimpleNamespace
from typing import ClassVar

import pytest
from kafka.errors import CommitFailedError
from prometheus_client.parser import text_string_to_metric_families

from stream_workers.metrics import (
    EventsObserver,
    MetricsObserver,
    MetricsPortError,
    Telemetry,
    WorkerMetrics,
)
from stream_workers.runtime import BatchReport, Runtime, Transactor
from tasks.kafka import StopSignal
from tasks.settings import Settings
from tests.helpers import eventually
from tests.unit.fakes import FakeConsumer, ProducerFactory
from tests.unit.test_runtime import TOPIC, Processor, log_of, tp

SETTINGS = Settings(_env_file=None, stream_heartbeat_interval_s=30)
NAMES = {
    "stream_worker_records",
    "stream_worker_outputs",
    "stream_worker_dead_letters",
    "stream_worker_transactions",
    "stream_worker_batch_seconds",
    "stream_worker_lag_records",
    "stream_worker_counts",
    "stream_worker_events_dropped",
}


class StandInEvents:
    """What stream_workers.events.WorkerEvents offers, recording the calls."""

    made: ClassVar[list[StandInEvents]] = []

    def __init__(self, worker, instance, *, group, settings) -> None:
        self.worker, self.instance, self.group, self.settings = worker, instance, group, settings
        self.calls: list[tuple[str, dict]] = []
        self.dropped = 0
        self.closed = False
        StandInEvents.made.append(self)

    def started(self, status):
        self.calls.append(("started", status))

    def rebalanced(self, status):
        self.calls.append(("rebalanced", status))

    def heartbeat(self, status):
        self.calls.append(("heartbeat", status))

    def stopped(self, status):
        self.calls.append(("stopped", status))

    def alert_fired(self, alert):
        self.calls.append(("alert_fired", alert))

    def close(self, timeout_s=2.0):
        self.closed = True


@pytest.fixture(autouse=True)
def _no_events_left():
    StandInEvents.made.clear()
    yield
    StandInEvents.made.clear()


def value(metrics: WorkerMetrics, name: str, **labels) -> float | None:
    base = {"worker": metrics.worker, "instance": metrics.instance}
    return metrics.registry.get_sample_value(name, base | labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


# --- from batch reports and progress ------------------------------------------------------


def test_committed_batches_count_records_outputs_dead_letters_and_their_seconds():
    metrics = WorkerMetrics("w", "0")
    metrics.apply(("batch", None, BatchReport("w", "committed", 5, 4, 1, 0.02)))
    metrics.apply(("batch", None, BatchReport("w", "committed", 2, 2, 0, 3.0)))
    metrics.apply(("batch", None, BatchReport("w", "aborted", 7, 7, 0, 0.1)))

    assert value(metrics, "stream_worker_records_total") == 7  # the aborted batch: not
    assert value(metrics, "stream_worker_outputs_total") == 6
    assert value(metrics, "stream_worker_dead_letters_total") == 1
    assert value(metrics, "stream_worker_transactions_total", outcome="committed") == 2
    assert value(metrics, "stream_worker_transactions_total", outcome="aborted") == 1
    assert value(metrics, "stream_worker_batch_seconds_count") == 2
    assert value(metrics, "stream_worker_batch_seconds_bucket", le="0.025") == 1
    assert value(metrics, "stream_worker_batch_seconds_sum") == pytest.approx(3.02)


def test_every_series_exists_from_the_start_at_zero():
    metrics = WorkerMetrics("w", "7")
    for name in ("stream_worker_records_total", "stream_worker_outputs_total",
                 "stream_worker_dead_letters_total", "stream_worker_events_dropped_total",
                 "stream_worker_batch_seconds_count"):  # fmt: skip
        assert value(metrics, name) == 0, name
    for outcome in ("committed", "aborted"):
        assert value(metrics, "stream_worker_transactions_total", outcome=outcome) == 0


def test_progress_sets_the_lag_of_assigned_partitions_and_drops_revoked_ones():
    metrics = WorkerMetrics("w", "0")
    metrics.apply(("progress", None, [("t", 0, 5), ("t", 1, 0)], {}, None))
    assert value(metrics, "stream_worker_lag_records", topic="t", partition="0") == 5
    assert value(metrics, "stream_worker_lag_records", topic="t", partition="1") == 0

    metrics.apply(("progress", None, [("t", 1, 3)], {}, None))  # partition 0 revoked

    assert value(metrics, "stream_worker_lag_records", topic="t", partition="0") is None
    assert value(metrics, "stream_worker_lag_records", topic="t", partition="1") == 3


def test_the_workers_own_counts_and_dropped_events_advance_by_what_is_new():
    metrics = WorkerMetrics("w", "0")
    metrics.apply(("progress", None, [], {"fired": 2}, 0))
    metrics.apply(("progress", None, [], {"fired": 5, "rebuilds": 1}, 3))
    metrics.apply(("progress", None, [], {"fired": 5, "rebuilds": 1}, 3))  # nothing new

    assert value(metrics, "stream_worker_counts_total", count="fired") == 5
    assert value(metrics, "stream_worker_counts_total", count="rebuilds") == 1
    assert value(metrics, "stream_worker_events_dropped_total") == 3


def test_an_unknown_message_is_refused():
    with pytest.raises(ValueError, match="unknown metrics message 'x'"):
        WorkerMetrics("w", "0").apply(("x", None))


# --- from a runtime ---------------------------------------------------------------------


def test_a_runtime_observed_gives_the_metrics_of_its_batches_and_lag():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"bad", b"c"), topics={TOPIC: 1})
    consumer.highwaters = {tp(0): 3}
    consumer.then(lambda c: c.rebalance(assigned={tp(0)}) or {})
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    factory.made[0].fail("commit_transaction", CommitFailedError("rebalanced"), at=1)
    metrics = WorkerMetrics("test-worker", "0")
    dropped = iter([0, 0, 1, 2, 2, 2, 2])
    observer = MetricsObserver(metrics.apply, dropped=lambda: next(dropped))
    runtime = Runtime(processor, consumer, [TOPIC], max_records=100, abort_backoff_s=0,
                      poll_timeout_ms=0, progress_interval_s=0, observers=[observer])  # fmt: skip
    processor.during_process = lambda records: runtime.stats.counts.update(fired=1)

    runtime.run(StopSignal().also(lambda: consumer.count("poll") >= 4))

    assert value(metrics, "stream_worker_records_total") == 3
    assert value(metrics, "stream_worker_outputs_total") == 2
    assert value(metrics, "stream_worker_dead_letters_total") == 1
    assert value(metrics, "stream_worker_transactions_total", outcome="committed") == 1
    assert value(metrics, "stream_worker_transactions_total", outcome="aborted") == 1
    assert value(metrics, "stream_worker_lag_records", topic=TOPIC, partition="0") == 0
    assert value(metrics, "stream_worker_counts_total", count="fired") == 2  # both tries
    assert value(metrics, "stream_worker_events_dropped_total") == 2


# --- events -------------------------------------------------------------------------------


def test_events_get_the_status_at_start_rebalance_stop_and_a_heartbeat_per_interval():
    events = StandInEvents("w", "0", group="g", settings=SETTINGS)
    clock = SimpleNamespace(now=100.0)
    observer = EventsObserver(events, 30, clock=lambda: clock.now)
    runtime = SimpleNamespace(progress_interval_s=10, status=lambda: {"at": clock.now})

    observer.started(runtime)
    observer.rebalanced(runtime)
    for _ in range(7):  # ticks every 10 s (a little late each time)
        clock.now += 10.2
        observer.tick(runtime)
    observer.stopped(runtime)

    assert [(name, status["at"]) for name, status in events.calls] == [
        ("started", 100.0),
        ("rebalanced", 100.0),
        ("heartbeat", pytest.approx(130.6)),  # the tick nearest to 30 s
        ("heartbeat", pytest.approx(161.2)),
        ("stopped", pytest.approx(171.4)),
    ]


def test_telemetry_makes_one_events_per_runtime_and_closes_them():
    with Telemetry("jobs-payments", "3", SETTINGS, lanes=("realtime", "normal"),
                   events=StandInEvents) as telemetry:  # fmt: skip
        metrics_observer, events_observer = telemetry.observers("the-group", lane="normal")
        assert isinstance(metrics_observer, MetricsObserver) and metrics_observer.lane == "normal"
        [events] = StandInEvents.made
        assert events_observer.events is events and telemetry.events_of("normal") is events
        assert (events.worker, events.instance, events.group) == (
            "jobs-payments-normal", "3", "the-group",
        )  # fmt: skip
        assert events.settings is SETTINGS
        events.dropped = 4
        metrics_observer.stopped(SimpleNamespace(assigned=set(), stats=SimpleNamespace(
            lag={}, counts={})))  # fmt: skip
        metrics = telemetry.metrics
        assert value(metrics, "stream_worker_events_dropped_total", lane="normal") == 4
    assert events.closed


def test_without_an_instance_the_pid_names_it():
    import os

    with Telemetry("w", None, SETTINGS, events=StandInEvents) as telemetry:
        assert telemetry.instance == str(os.getpid()) == telemetry.metrics.instance


# --- another process's lane ---------------------------------------------------------------


def test_a_lane_in_another_process_forwards_its_metrics_to_the_daemon_labelled_by_lane():
    queue = multiprocessing.get_context("spawn").Queue(100)
    with Telemetry("jobs-payments", "0", SETTINGS, lanes=("realtime", "normal"),
                   events=StandInEvents) as daemon:  # fmt: skip
        daemon.receive(queue)
        child = Telemetry("jobs-payments", "0", SETTINGS, forward=queue, events=StandInEvents)
        assert child.metrics is None and child.server is None
        forwarding, _ = child.observers("g", lane="realtime")
        local, _ = daemon.observers("g", lane="normal")
        runtime = SimpleNamespace(assigned={tp(0)}, stats=SimpleNamespace(
            lag={tp(0): 4}, counts={"ok": 2}))  # fmt: skip
        forwarding.batch(runtime, BatchReport("x", "committed", 3, 3, 0, 0.01))
        forwarding.tick(runtime)
        local.batch(runtime, BatchReport("x", "committed", 1, 1, 0, 0.01))

        metrics = daemon.metrics

        def lane(name: str, lane: str, **labels) -> float | None:
            return value(metrics, name, lane=lane, **labels)

        eventually(lambda: lane("stream_worker_lag_records", "realtime", topic=TOPIC,
                                partition="0") == 4, 10, 0.01)  # fmt: skip
        assert lane("stream_worker_records_total", "realtime") == 3
        assert lane("stream_worker_records_total", "normal") == 1
        assert lane("stream_worker_counts_total", "realtime", count="ok") == 2
        child.close()
    queue.close()


def test_a_full_queue_drops_a_lane_message_rather_than_wait():
    queue = multiprocessing.get_context("spawn").Queue(1)
    child = Telemetry("w", "0", SETTINGS, forward=queue, events=StandInEvents)
    forwarding, _ = child.observers(None, lane="realtime")
    started = time.monotonic()
    for _ in range(3):
        forwarding.batch(None, BatchReport("x", "committed", 1, 1, 0, 0.0))
    assert time.monotonic() - started < 5  # no wait for a reader (there is none)
    assert forwarding.send.lost == 2
    queue.cancel_join_thread()
    queue.close()


# --- the endpoint -----------------------------------------------------------------------


def test_the_endpoint_serves_exactly_the_documented_names_with_worker_and_instance():
    port = free_port()
    with Telemetry("w", "0", SETTINGS, port=port, events=StandInEvents) as telemetry:
        telemetry.metrics.apply(("progress", None, [("t", 0, 5)], {"fired": 1}, 0))
        families = {f.name: f for f in text_string_to_metric_families(scrape(port))}
    assert set(families) == NAMES
    for family in families.values():
        for sample in family.samples:
            assert (sample.labels["worker"], sample.labels["instance"]) == ("w", "0")
    with pytest.raises(OSError):  # closed: the port is free again, nothing answers
        scrape(port)


def test_a_port_in_use_or_out_of_range_is_one_error_naming_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError) as error:
            Telemetry("w", "0", SETTINGS, port=port, events=StandInEvents)
    expected = f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port {port}): "
    assert str(error.value) == expected + "Address already in use"
    for bad in (0, 65536, -1):
        with pytest.raises(MetricsPortError, match=f"--metrics-port {bad}: not a TCP port"):
            Telemetry("w", "0", SETTINGS, port=bad, events=StandInEvents)
    assert StandInEvents.made == []  # nothing started for a daemon that cannot start
