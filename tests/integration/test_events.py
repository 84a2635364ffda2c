"""Stream worker Prefect events against a real Prefect API (the session's harness server),
an unreachable one, and from a real `python -m stream_workers price-alerts` process."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventOrder
from prefect.events.schemas.events import ReceivedEvent
from prefect.settings import PREFECT_API_URL, temporary_settings

from sources.price_alerts import create_alert
from stream_workers import events
from stream_workers.events import WorkerEvents
from tasks.settings import Settings
from tests.conftest import subprocess_env
from tests.helpers import eventually
from tests.integration.prices_support import notifications, produce, produce_raw, trade

pytestmark = pytest.mark.integration

STATUS = {"worker": "price-alerts", "instance": "x", "pid": 1, "group": "g", "state": "running",
          "assigned": ["trades[0]", "trades[1]"], "records": 10, "outputs": 2, "dead_letters": 0,
          "commits": 3, "aborts": 0, "rebalances": 1, "counts": {"fired": 1},
          "lag": {"trades[0]": 4, "trades[1]": 0}, "updated_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip


def api_events(resource_id_prefix: str) -> list[ReceivedEvent]:
    """Every event the API stored whose resource or a related one starts with the prefix,
    oldest first (all pages)."""
    query = EventFilter(
        any_resource=EventAnyResourceFilter(id_prefix=[resource_id_prefix]),
        order=EventOrder.ASC,
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(query, limit=50)  # the server allows at most 50
        found = list(page.events)
        while page.next_page is not None:
            page = client.read_events_page(str(page.next_page))
            found += page.events
    return found


def names(found: list[ReceivedEvent]) -> list[str]:
    return [f"{e.event} {e.resource.id} {dict(e.payload)}" for e in found]


def test_events_reach_the_prefect_api(prefect_api, unique):
    instance = f"it-{unique}"
    worker_id = f"stream-worker.price-alerts.{instance}"
    worker_events = WorkerEvents("price-alerts", instance, group=f"pa-{unique}",
                                 settings=Settings(stream_events_enabled=True))  # fmt: skip
    assert worker_events.enabled
    alert = {"alert_id": f"alert-{unique}", "user_id": "ann", "product_id": "BTC-USD",
             "threshold": "105.00", "average_price": "105.00000000",
             "window_end": "2026-01-01T00:10:00+00:00",
             "fired_at": "2026-01-01T00:10:01+00:00", "source": "stream"}  # fmt: skip
    before = datetime.now(UTC)
    worker_events.started(STATUS | {"state": "joining", "assigned": []})
    worker_events.rebalanced(STATUS)
    worker_events.heartbeat(STATUS)
    worker_events.alert_fired(alert)
    worker_events.heartbeat(STATUS | {"dead_letters": 2, "records": 12})
    worker_events.stopped(STATUS | {"state": "stopped", "dead_letters": 2, "records": 12})
    closing = time.monotonic()
    worker_events.close(timeout_s=15)  # the first connection: a version check and a handshake
    assert time.monotonic() - closing < 16
    assert not worker_events._thread.is_alive()
    assert worker_events.dropped == 0

    def all_six() -> list[ReceivedEvent]:
        found = api_events(worker_id)
        return found if len(found) >= 6 else []

    found = eventually(all_six, 60, 0.5, lambda: "\n".join(names(api_events(worker_id))))
    assert [e.event for e in found] == [events.STARTED, events.REBALANCED, events.HEARTBEAT,
        events.ALERT_FIRED, events.HEARTBEAT, events.STOPPED], names(found)  # fmt: skip
    started, rebalanced, beat1, fired, beat2, stopped = found
    for e in (started, rebalanced, beat1, beat2, stopped):
        assert e.resource.id == worker_id
        assert e.resource.get("prefect.resource.name") == f"price-alerts.{instance}"
        assert e.resource.get("worker") == "price-alerts"
        assert e.resource.get("instance") == instance
        assert e.resource.get("group") == f"pa-{unique}"
        assert e.resource.get("host") == socket.gethostname()
        assert before - timedelta(seconds=5) <= e.occurred <= datetime.now(UTC)
    assert started.payload["state"] == "joining" and started.payload["assigned"] == []
    assert rebalanced.payload["assigned"] == ["trades[0]", "trades[1]"]
    assert beat1.resource.get(events.NEW_DEAD_LETTERS_LABEL) == "false"
    assert beat2.resource.get(events.NEW_DEAD_LETTERS_LABEL) == "true"
    assert beat1.payload == {"state": "running", "pid": 1,
                             "assigned": ["trades[0]", "trades[1]"], "records": 10,
                             "outputs": 2, "dead_letters": 0, "commits": 3, "aborts": 0,
                             "rebalances": 1, "counts": {"fired": 1},
                             "lag": {"trades[0]": 4, "trades[1]": 0}, "events_dropped": 0,
                             "new_dead_letters": 0}  # fmt: skip
    assert beat2.payload["new_dead_letters"] == 2 and beat2.payload["records"] == 12
    assert stopped.payload["state"] == "stopped"
    assert fired.resource.id == f"price-alert.alert-{unique}"
    assert fired.payload == alert
    assert [(r.id, r.role) for r in fired.related] == [(worker_id, "stream-worker")]
    assert fired.related[0].get("group") == f"pa-{unique}"


@pytest.fixture(params=["refused", "silent"])
def unreachable_api(request) -> Iterator[str]:
    """A Prefect API URL nobody answers: a closed port (refused at once), or a port that
    accepts connections and never reads or answers them (every call waits until its timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if request.param == "refused":
        listener.close()
    else:
        listener.listen(128)
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        listener.close()


def test_an_unreachable_api_never_holds_up_the_worker(unreachable_api, unique, caplog):
    with (
        temporary_settings(updates={PREFECT_API_URL: unreachable_api}),
        caplog.at_level(logging.INFO),
    ):
        worker_events = WorkerEvents("price-alerts", f"down-{unique}", group="g",
                                     settings=Settings(stream_events_buffer=100))  # fmt: skip
        try:
            started = time.monotonic()
            worker_events.started(STATUS)
            for n in range(3333):
                worker_events.heartbeat(STATUS | {"dead_letters": n})
                worker_events.rebalanced(STATUS)
                worker_events.alert_fired({"alert_id": f"a{n}", "product_id": "BTC-USD"})
            elapsed = time.monotonic() - started
            # About 50 µs a call: a worker never waits on the API (a budget for a loaded
            # machine, far below one connection timeout).
            assert elapsed < 10, elapsed
            calls = 1 + 3 * 3333
            # All but the 100 buffered and at most one in the sender's hands.
            assert calls - 101 <= worker_events.dropped <= calls - 100
            closing = time.monotonic()
            worker_events.close(timeout_s=1.0)
            assert time.monotonic() - closing < 2
            assert worker_events.dropped == calls  # nothing was sent
        finally:
            # The sender gives up at close(): a connect in progress is cancelled.
            thread = worker_events._thread
            eventually(lambda: not thread.is_alive(), 30)
    ours = [r for r in caplog.records if r.name.startswith(("stream_workers.events", "prefect"))]
    assert not [r for r in ours if r.levelno >= logging.ERROR], [r.getMessage() for r in ours]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    # Rate-limited: the first full buffer, the first failed connection (refused; the silent
    # API times out only after the close), the events left at close.
    assert len(warnings) <= 3, warnings
    assert not [w for w in warnings if "Unable to connect" in w]  # Prefect's own, per attempt


def _start_worker(group: str, instance: str, log: Path) -> subprocess.Popen:
    env = subprocess_env() | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "STREAM_HEARTBEAT_INTERVAL_S": "1",
        "STREAM_EVENTS_ENABLED": "true",
    }
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_workers", "price-alerts", "--group", group,
             "--instance", instance],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_a_price_alerts_worker_reports_its_life_and_fired_alerts(
    prefect_api, settings, unique, tmp_path
):
    group, instance, alert_id = f"pa-ev-{unique}", f"ev-{unique}", f"ev-alert-{unique}"
    worker_id = f"stream-worker.price-alerts.{instance}"
    create_alert("ann", "BTC-USD", "100.00", alert_id=alert_id)
    log = tmp_path / "worker.log"
    worker = _start_worker(group, instance, log)

    def report() -> str:
        seen = "\n".join(names(api_events(worker_id)))
        return f"events of {worker_id}:\n{seen}\n--- worker log\n{log.read_text()[-4000:]}"

    def of(name: str, found: list[ReceivedEvent]) -> list[ReceivedEvent]:
        return [e for e in found if e.event == name]

    try:
        eventually(lambda: of(events.STARTED, api_events(worker_id)), 90, 0.5, report)
        running = eventually(lambda: [e for e in of(events.HEARTBEAT, api_events(worker_id))
                                      if e.payload["state"] == "running"], 90, 0.5, report)  # fmt: skip
        assert running[-1].resource.get(events.NEW_DEAD_LETTERS_LABEL) == "false"
        assert running[-1].payload["assigned"], running[-1].payload

        at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        produce(settings, settings.trades_topic, [("BTC-USD", trade(1, "BTC-USD", "101", at))])
        fired = eventually(lambda: of(events.ALERT_FIRED, api_events(worker_id)), 90, 0.5,
                           report)  # fmt: skip
        assert len(fired) == 1, names(fired)
        assert fired[0].resource.id == f"price-alert.{alert_id}"
        assert [(r.id, r.role) for r in fired[0].related] == [(worker_id, "stream-worker")]
        sent = [n for n in notifications(settings) if n["alert_id"] == alert_id]
        assert [fired[0].payload] == sent  # the notification itself

        # A dead letter: the next heartbeat says so in its label, the one after does not.
        produce_raw(settings, settings.trades_topic, "BTC-USD", b"\xff not json")

        def after_the_dead_letter() -> list[ReceivedEvent]:
            beats = of(events.HEARTBEAT, api_events(worker_id))
            labels = [e.resource.get(events.NEW_DEAD_LETTERS_LABEL) for e in beats]
            first = labels.index("true") if "true" in labels else None
            return beats[first:] if first is not None and len(beats) > first + 1 else []

        beats = eventually(after_the_dead_letter, 90, 0.5, report)
        assert beats[0].payload["new_dead_letters"] == 1
        assert beats[0].payload["dead_letters"] == 1
        assert beats[1].resource.get(events.NEW_DEAD_LETTERS_LABEL) == "false"
        assert beats[1].payload["new_dead_letters"] == 0

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, report()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    stopped = eventually(lambda: of(events.STOPPED, api_events(worker_id)), 60, 0.5, report)
    assert stopped[0].payload["state"] == "stopped"
    assert stopped[0].payload["counts"].get("fired") == 1
    assert stopped[0].payload["dead_letters"] == 1
    assert stopped[0].payload["events_dropped"] == 0
