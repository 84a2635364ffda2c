"""WorkerEvents (stream_workers/events.py) against a fake events client: the bounded buffer,
a stuck or refusing API, the dead-letter label, disabled mode."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from stream_workers import events
from stream_workers.events import WorkerEvents
from tasks.settings import Settings
from tests.helpers import eventually

STATUS = {"worker": "price-alerts", "instance": "a", "pid": 1, "group": "g", "state": "running",
          "assigned": ["trades[0]", "trades[1]"], "records": 10, "outputs": 2, "dead_letters": 0,
          "commits": 3, "aborts": 0, "rebalances": 1, "counts": {"fired": 1},
          "lag": {"trades[0]": 4}, "updated_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip


class FakeApi:
    """Stands for the Prefect API behind the events client: records what arrives; can
    refuse connections, refuse chosen events, or block (the sender's whole thread, as a
    hung socket call would)."""

    def __init__(self) -> None:
        self.received: list = []
        self.connects = 0
        self.refuse = False
        self.refused_events: set[str] = set()
        self.stuck_in: str | None = None  # "connect" | "emit"
        self.blocked = threading.Event()  # the sender is stuck now
        self.release = threading.Event()

    def client(self) -> FakeClient:
        return FakeClient(self)

    def _block(self) -> None:
        self.blocked.set()
        self.release.wait()


class FakeClient:
    def __init__(self, api: FakeApi) -> None:
        self.api = api

    async def __aenter__(self) -> FakeClient:
        self.api.connects += 1
        if self.api.stuck_in == "connect":
            self.api._block()
        if self.api.refuse:
            raise ConnectionRefusedError(111, "Connect call failed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def emit(self, event) -> None:
        if self.api.stuck_in == "emit":
            self.api._block()
        if event.event in self.api.refused_events:
            raise OSError("connection reset")
        self.api.received.append(event)


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(events, "_make_client", fake.client)
    monkeypatch.setattr(events, "_BACKOFF_INITIAL_S", 0.05)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield fake
    fake.release.set()


@pytest.fixture
def make_events(api):
    """WorkerEvents of this test; each closed and its sender thread ended at teardown."""
    made: list[WorkerEvents] = []

    def make(buffer: int = 1000, **kwargs) -> WorkerEvents:
        worker_events = WorkerEvents(
            kwargs.pop("worker", "price-alerts"), kwargs.pop("instance", "a"),
            group=kwargs.pop("group", "price-alerts"),
            settings=Settings(stream_events_buffer=buffer, **kwargs),
        )  # fmt: skip
        made.append(worker_events)
        return worker_events

    yield make
    api.release.set()
    for worker_events in made:
        worker_events.close(timeout_s=5)
        if worker_events._thread is not None:
            worker_events._thread.join(timeout=10)
            assert not worker_events._thread.is_alive(), "the sender thread did not end"


def test_a_full_buffer_drops_the_oldest_and_counts(api, make_events):
    api.stuck_in = "emit"
    worker_events = make_events(buffer=5)
    worker_events.started(STATUS)
    eventually(api.blocked.is_set, 10)  # `started` is in hand, the sender stuck on it
    for n in range(1, 13):
        worker_events.heartbeat(STATUS | {"records": n})
    assert worker_events.dropped == 7  # 12 heartbeats, room for 5
    api.stuck_in = None
    api.release.set()
    worker_events.close(timeout_s=5)
    # The newest stayed; each event says how many were dropped before it was made.
    beats = [e for e in api.received if e.event == events.HEARTBEAT]
    assert [e.payload["records"] for e in beats] == [8, 9, 10, 11, 12]
    assert [e.payload["events_dropped"] for e in beats] == [2, 3, 4, 5, 6]
    assert api.received[0].event == events.STARTED
    assert worker_events.dropped == 7


@pytest.mark.parametrize("stuck_in", ["connect", "emit"])
def test_methods_return_at_once_while_the_sender_is_stuck(api, make_events, stuck_in):
    api.stuck_in = stuck_in
    worker_events = make_events(buffer=100)
    worker_events.started(STATUS)
    eventually(api.blocked.is_set, 10)
    started = time.monotonic()
    for n in range(2000):
        before = time.monotonic()
        worker_events.heartbeat(STATUS | {"dead_letters": n})
        worker_events.alert_fired({"alert_id": f"a{n}", "product_id": "BTC-USD"})
        worker_events.rebalanced(STATUS)
        # ~50 µs a call; generous bounds for a loaded machine, far below any network timeout.
        took = time.monotonic() - before
        assert took < 1, f"round {n} took {took:.2f}s"
    worker_events.stopped(STATUS)
    assert time.monotonic() - started < 10
    assert worker_events.dropped == 6001 - 100  # `started` is in hand, 100 wait
    before = time.monotonic()
    worker_events.close(timeout_s=0.5)
    assert time.monotonic() - before < 1.5
    assert worker_events.dropped == 6002  # the buffer and the one in hand: never sent
    assert api.received == []


def test_the_dead_letter_label_says_whether_dead_letters_arrived_since_the_last_heartbeat(
    api, make_events
):
    worker_events = make_events()
    worker_events.started(STATUS)
    for total in (0, 2, 2, 5, 5, 1):  # the last: counters started over (a new runtime)
        worker_events.heartbeat(STATUS | {"dead_letters": total})
    worker_events.close(timeout_s=5)
    beats = [e for e in api.received if e.event == events.HEARTBEAT]
    assert [e.resource[events.NEW_DEAD_LETTERS_LABEL] for e in beats] == [
        "false", "true", "false", "true", "false", "true"]  # fmt: skip
    assert [e.payload["new_dead_letters"] for e in beats] == [0, 2, 0, 3, 0, 1]
    assert [e.payload["dead_letters"] for e in beats] == [0, 2, 2, 5, 5, 1]
    assert events.NEW_DEAD_LETTERS_LABEL not in api.received[0].resource  # heartbeats only


def test_events_name_the_worker_and_the_fired_alert(api, make_events):
    worker_events = make_events(worker="price-alerts", instance="b", group="pa-group")
    notification = {"alert_id": "alert-7", "user_id": "ann", "product_id": "BTC-USD",
                    "threshold": "105.00", "average_price": "105.00000000",
                    "window_end": "2026-01-01T00:10:00+00:00", "source": "stream"}  # fmt: skip
    before = datetime.now(UTC)
    worker_events.started(STATUS)
    worker_events.rebalanced(STATUS)
    worker_events.heartbeat(STATUS)
    worker_events.alert_fired(notification)
    worker_events.stopped(STATUS)
    worker_events.close(timeout_s=5)
    assert [e.event for e in api.received] == [events.STARTED, events.REBALANCED,
        events.HEARTBEAT, events.ALERT_FIRED, events.STOPPED]  # fmt: skip
    assert len({e.id for e in api.received}) == 5
    for e in api.received:
        assert before - timedelta(seconds=1) <= e.occurred <= datetime.now(UTC)
        assert e.occurred.utcoffset() == timedelta(0)
    lifecycle = [e for e in api.received if e.event != events.ALERT_FIRED]
    for e in lifecycle:
        labels = dict(e.resource)
        labels.pop(events.NEW_DEAD_LETTERS_LABEL, None)
        assert labels == {"prefect.resource.id": "stream-worker.price-alerts.b",
                          "prefect.resource.name": "price-alerts.b", "worker": "price-alerts",
                          "instance": "b", "group": "pa-group", "host": labels["host"]}  # fmt: skip
        assert labels["host"]
        assert e.payload["assigned"] == ["trades[0]", "trades[1]"]
        assert e.payload["lag"] == {"trades[0]": 4}
        assert e.payload["counts"] == {"fired": 1}
        assert e.payload["events_dropped"] == 0
    fired = api.received[3]
    assert fired.resource.id == "price-alert.alert-7"
    assert fired.payload == notification
    assert [r.id for r in fired.related] == ["stream-worker.price-alerts.b"]
    assert fired.related[0].role == "stream-worker"


def test_a_refusing_api_is_retried_with_backoff_and_warned_about_once(api, make_events, caplog):
    api.refuse = True
    worker_events = make_events(buffer=10)
    with caplog.at_level(logging.INFO, logger="stream_workers.events"):
        worker_events.heartbeat(STATUS)
        eventually(lambda: api.connects >= 1, 10)  # the first is in hand
        for _ in range(49):
            worker_events.heartbeat(STATUS)
        eventually(lambda: api.connects >= 4, 20)  # 0.05, 0.1, 0.2 s apart: backing off
        api.refuse = False
        eventually(lambda: len(api.received) == 11, 20)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "cannot send" in w]) == 1, warnings
    assert len([w for w in warnings if "buffer full" in w]) == 1, warnings
    assert any("again after" in r.getMessage() for r in caplog.records)
    assert worker_events.dropped == 39


def test_an_event_refused_three_times_is_dropped_and_the_rest_go_on(api, make_events, caplog):
    api.refused_events = {events.REBALANCED}  # connections work, that send fails
    worker_events = make_events()
    with caplog.at_level(logging.INFO, logger="stream_workers.events"):
        worker_events.started(STATUS)
        worker_events.rebalanced(STATUS)
        worker_events.stopped(STATUS)
        eventually(lambda: len(api.received) == 2, 20)
    assert [e.event for e in api.received] == [events.STARTED, events.STOPPED]
    assert worker_events.dropped == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # the first failure, then the drop
    assert "dropped: 3 failed sends (OSError: connection reset)" in warnings[1]


def test_malformed_input_is_dropped_and_counted_never_raised(api, make_events, caplog):
    worker_events = make_events()
    with caplog.at_level(logging.WARNING, logger="stream_workers.events"):
        worker_events.started(None)  # type: ignore[arg-type]
        worker_events.heartbeat(STATUS | {"dead_letters": "many"})
        worker_events.alert_fired(["not", "a", "notification"])  # type: ignore[arg-type]
        worker_events.rebalanced(STATUS | {"counts": {"fired": object()}})  # built; not JSON
        worker_events.heartbeat(STATUS | {"dead_letters": 1})
    # Three counted at once; the sender may have dropped the fourth already.
    assert worker_events.dropped in (3, 4)
    not_built = [r.getMessage() for r in caplog.records if "not built" in r.getMessage()]
    assert len(not_built) == 1, not_built  # rate-limited
    # The sender drops the one JSON cannot hold before sending it; the rest go on.
    eventually(lambda: [e.event for e in api.received] == [events.HEARTBEAT], 20)
    assert api.received[0].resource[events.NEW_DEAD_LETTERS_LABEL] == "true"
    assert worker_events.dropped == 4
    assert any("not JSON-serialisable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("off", ["STREAM_EVENTS_ENABLED=false", "no PREFECT_API_URL"])
def test_disabled_is_a_no_op(monkeypatch, caplog, off):
    def no_client():
        raise AssertionError("a client was made while events are off")

    monkeypatch.setattr(events, "_make_client", no_client)
    threads = set(threading.enumerate())
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        caplog.at_level(logging.INFO, logger="stream_workers.events"),
    ):
        worker_events = WorkerEvents("price-alerts", "a", group=None, settings=Settings(
            stream_events_enabled=off != "STREAM_EVENTS_ENABLED=false", stream_events_buffer=1))  # fmt: skip
        started = time.monotonic()
        for _ in range(1000):
            worker_events.started(STATUS)
            worker_events.heartbeat(STATUS | {"dead_letters": 5})
            worker_events.alert_fired({"alert_id": "x"})
        worker_events.close()
        assert time.monotonic() - started < 1  # ~a microsecond a call
    assert not worker_events.enabled
    assert worker_events.dropped == 0
    assert set(threading.enumerate()) == threads  # no sender thread
    lines = [r.getMessage() for r in caplog.records if r.name == "stream_workers.events"]
    assert lines == [f"price-alerts: Prefect events off ({off})"]
