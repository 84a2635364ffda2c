"""The automations of prefect.yaml and automations.yaml on a real Prefect server (the
session's harness, which runs Prefect's triggers and actions services), driven by a real
`python -m stream_workers price-alerts` process, `python -m flows` and real flow runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)
from prefect.events.schemas.automations import Automation
from prefect.events.schemas.events import ReceivedEvent

from flows.automations import apply_automations, declared_automations
from flows.deployments import declared_deployments, load_flow
from flows.transaction_totals import TotalsMismatchError, transaction_totals
from stream_workers import events
from tasks.kafka import ensure_topics, make_producer, project_topics
from tasks.transactions import Transaction, UserTotal, changelog_value
from tasks.warehouse import connect
from tests.helpers import eventually
from tests.integration.prefect_support import (
    background,
    flow_run,
    prefect_env,
    python,
    remove_automations,
    remove_deployments,
    run_report,
    tail,
)
from tests.integration.prices_support import produce_raw

pytestmark = pytest.mark.integration

DEPLOYMENTS = {f"{load_flow(d['entrypoint']).name}/{d['name']}" for d in declared_deployments()}
SILENT = "price-averages when price-alerts is silent"  # prefect.yaml's trigger
FAILED = "transaction-totals failed"  # automations.yaml
DEAD_LETTERS = "stream worker dead letters"
TIMEOUT_S = 10  # STREAM_HEARTBEAT_TIMEOUT_S: its smallest allowed value


@pytest.fixture
def clean_prefect(prefect_api):
    """None of our deployments or automations before and after (the server is shared by
    the session: a heartbeat automation left behind would keep creating runs)."""
    names = [SILENT, *(a.name for a in declared_automations())]
    remove_deployments(DEPLOYMENTS)
    remove_automations(names)
    yield
    remove_deployments(DEPLOYMENTS)
    remove_automations(names)


def api_events(name: str, resource_id: str, since: datetime | None = None) -> list[ReceivedEvent]:
    """The events `name` of resource `resource_id` the API stored, oldest first."""
    query = EventFilter(
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[resource_id]),
        order=EventOrder.ASC,
        **({"occurred": EventOccurredFilter(since=since)} if since else {}),
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(query, limit=50)
        found = list(page.events)
        while page.next_page is not None:
            page = client.read_events_page(str(page.next_page))
            found += page.events
    return found


def automation(name: str) -> Automation | None:
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name)
    assert len(found) <= 1, f"{len(found)} automations named {name!r}"
    return found[0] if found else None


def triggered(automation_id: UUID, since: datetime | None = None) -> list[ReceivedEvent]:
    return api_events("prefect.automation.triggered", f"prefect.automation.{automation_id}", since)


def started_runs(automation_id: UUID) -> list[UUID]:
    """The flow runs the automation's actions created."""
    executed = api_events(
        "prefect.automation.action.executed", f"prefect.automation.{automation_id}"
    )
    return [UUID(r.id.removeprefix("prefect.flow-run."))
            for e in executed for r in e.related if r.role == "flow-run"]  # fmt: skip


def _start_price_worker(unique: str, log):
    env = prefect_env(STREAM_HEARTBEAT_INTERVAL_S="1", STREAM_EVENTS_ENABLED="true")
    argv = python("-m", "stream_workers", "price-alerts", "--group", f"pa-auto-{unique}",
                  "--instance", f"auto-{unique}")  # fmt: skip
    return background(argv, env, log), f"stream-worker.price-alerts.auto-{unique}"


def test_a_stopped_price_worker_makes_the_batch_side_run(clean_prefect, settings, unique, tmp_path):
    ensure_topics(project_topics(settings), settings)
    worker_log, flows_log = tmp_path / "worker.log", tmp_path / "flows.log"
    started, worker_id = _start_price_worker(unique, worker_log)

    def heartbeats(since: datetime | None = None) -> list[ReceivedEvent]:
        return api_events(events.HEARTBEAT, worker_id, since)

    def report() -> str:
        found = automation(SILENT)
        fired = [f"{e.occurred:%H:%M:%S}" for e in triggered(found.id)] if found else "none"
        beats = [f"{e.occurred:%H:%M:%S}" for e in heartbeats()]
        return (
            f"automation fired at {fired}\nheartbeats at {beats}\n{tail(worker_log)}\n"
            f"{tail(flows_log)}"
        )

    env = prefect_env(STREAM_HEARTBEAT_TIMEOUT_S=str(TIMEOUT_S), PREFECT_RUNNER_POLL_FREQUENCY="1")
    with started as worker, background(python("-m", "flows"), env, flows_log):
        # The worker beats before the automation exists: it must not fire at its creation.
        eventually(heartbeats, 120, 0.5, report)
        silent = eventually(lambda: automation(SILENT), 120, 0.5, report)
        seen_at = datetime.now(UTC)
        assert silent.trigger.within == timedelta(seconds=TIMEOUT_S)  # the setting, not 120
        # Two timeouts with heartbeats arriving: nothing fires.
        eventually(lambda: heartbeats(seen_at + timedelta(seconds=2 * TIMEOUT_S)), 120, 0.5, report)
        assert triggered(silent.id) == [], report()

        stopped_at = datetime.now(UTC)
        worker.terminate()
        assert worker.wait(60) == 0, tail(worker_log)
        fired = eventually(lambda: triggered(silent.id), 120, 0.5, report)
        # Not before a whole timeout without heartbeats (the last came just before the stop).
        assert fired[0].occurred >= stopped_at + timedelta(seconds=TIMEOUT_S - 2), fired
        (run_id, *_) = eventually(lambda: started_runs(silent.id), 60, 0.5, report)

        def finished() -> bool:
            state = flow_run(run_id).state
            return state is not None and state.is_final()

        eventually(finished, 180, 0.5, lambda: f"{run_report(run_id)}\n{report()}")
        run = flow_run(run_id)
        assert run.state.is_completed(), f"{run_report(run_id)}\n{report()}"
    with get_client(sync_client=True) as client:
        assert client.read_deployment(run.deployment_id).name == "price-averages"
    con = connect(settings, read_only=True)
    try:
        rows = con.execute(
            "SELECT product_id FROM price_average_history WHERE flow_run_id = ?", [str(run_id)]
        ).fetchall()
    finally:
        con.close()
    assert rows == [("BTC-USD",)]


def _plant_a_wrong_total(settings) -> str:
    """One transaction of 10.00 for a user, and a stream total of 11.00 for it."""
    user = "mismatched-user"
    producer = make_producer(settings, key_serializer=None, value_serializer=None)
    value = Transaction(user, Decimal("10.00"), datetime.now(UTC).isoformat()).as_value()
    sent = producer.send(settings.transactions_topic, key=user.encode(),
                         value=json.dumps(value).encode()).get(30)  # fmt: skip
    producer.close()
    wrong = UserTotal(minor=1100, transactions=1, offset=sent.offset, time=value["time"])
    producer = make_producer(settings)
    producer.send(settings.transaction_totals_changelog_topic, key=user, partition=sent.partition,
                  value=changelog_value(user, wrong, settings.transaction_amount_scale))  # fmt: skip
    producer.flush()
    producer.close()
    return user


def test_a_failed_transaction_totals_run_triggers_its_automation(clean_prefect, settings):
    with get_client(sync_client=True) as client:
        assert apply_automations(client) == [f"automation {FAILED!r}: created",
                                             f"automation {DEAD_LETTERS!r}: created"]  # fmt: skip
        before = automation(FAILED)
        # Applying again updates in place: same automation, same id.
        assert apply_automations(client) == [f"automation {FAILED!r}: updated",
                                             f"automation {DEAD_LETTERS!r}: updated"]  # fmt: skip
    failed = automation(FAILED)
    assert failed.id == before.id
    assert "README.md#transaction-totals-failed" in failed.description

    ensure_topics(project_topics(settings), settings)
    _plant_a_wrong_total(settings)
    state = transaction_totals(return_state=True)
    assert state.is_failed(), state
    with pytest.raises(TotalsMismatchError, match="1 of 1 users' totals differ"):
        state.result()
    run_id = state.state_details.flow_run_id
    assert flow_run(run_id).state.is_failed()

    def fired_by_this_run() -> list[ReceivedEvent]:
        return [e for e in triggered(failed.id)
                if e.payload["triggering_event"]["resource"]["prefect.resource.id"]
                == f"prefect.flow-run.{run_id}"]  # fmt: skip

    (fired,) = eventually(fired_by_this_run, 90, 0.5, lambda: f"{triggered(failed.id)}")
    assert fired.payload["triggering_event"]["event"] == "prefect.flow-run.Failed"
    assert fired.resource.get("prefect.resource.name") == FAILED


def test_new_dead_letters_trigger_their_automation(clean_prefect, settings, unique, tmp_path):
    with get_client(sync_client=True) as client:
        apply_automations(client)
    dead = automation(DEAD_LETTERS)
    assert "README.md#dead-letters" in dead.description
    ensure_topics(project_topics(settings), settings)
    log = tmp_path / "worker.log"
    started, worker_id = _start_price_worker(unique, log)

    def mine() -> list[ReceivedEvent]:
        return [
            e
            for e in triggered(dead.id)
            if e.payload["triggering_event"]["resource"]["prefect.resource.id"] == worker_id
        ]

    def report() -> str:
        beats = api_events(events.HEARTBEAT, worker_id)
        labels = [(f"{b.occurred:%H:%M:%S}", b.resource.get(events.NEW_DEAD_LETTERS_LABEL),
                   b.payload.get("dead_letters")) for b in beats]  # fmt: skip
        fired = [(f"{e.occurred:%H:%M:%S}", e.payload["triggering_event"]["resource"])
                 for e in triggered(dead.id)]  # fmt: skip
        return (
            f"heartbeats (time, label, dead letters) {labels}\nautomation fired {fired}\n"
            f"{tail(log)}"
        )

    with started:
        # Heartbeats without new dead letters fire nothing ...
        eventually(lambda: len(api_events(events.HEARTBEAT, worker_id)) >= 3, 180, 0.5, report)
        produce_raw(settings, settings.trades_topic, "BTC-USD", b"\xff not json")
        # ... the one that reports the dead letter does, once.
        (fired,) = eventually(mine, 180, 0.5, report)
        beat = fired.payload["triggering_event"]
        assert beat["event"] == events.HEARTBEAT
        assert beat["resource"][events.NEW_DEAD_LETTERS_LABEL] == "true"
        assert beat["payload"]["new_dead_letters"] == 1
        # The heartbeats after it (no new dead letters) fire nothing more.
        eventually(lambda: [b for b in api_events(events.HEARTBEAT, worker_id)
                            if b.occurred > fired.occurred + timedelta(seconds=5)], 120, 0.5,
                   report)  # fmt: skip
        assert len(mine()) == 1, report()
