"""Helpers of the transactions integration tests: produce, read back, and the reference."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from tasks.kafka import ensure_topics, make_producer, project_topics
from tasks.transactions import Transaction
from tests.helpers import read_topic

# Malformed messages (key, raw value) and the start of the reason each must get.
MALFORMED = [
    (b"Rex", b'{"amount": "10", "time": "2024-05-01T12:00:00+00:00"}', "missing user"),
    (b"Rex", b'{"user": "Rex", "amount": "ten", "time": "2024-05-01T12:00:00+00:00"}',
     "amount 'ten' is not a decimal number"),
    (b"Rex", b'{"user": "Rex", "amount": "5000000000", "time": "2024-05-01T12:00:00+00:00"}',
     "absurd amount"),
    (b"Rex", b'{"user": "Rex", "amount": 12.5, "time": "2024-05-01T12:00:00+00:00"}',
     "amount must be a decimal string"),
    (b"Rex", b"not json at all", "not valid JSON"),
]  # fmt: skip


def produce(settings, messages: list[Transaction | tuple[bytes, bytes]]) -> None:
    """Send transactions (as their JSON) and raw (key, value) pairs, in order."""
    ensure_topics(project_topics(settings), settings)
    producer = make_producer(settings, key_serializer=None, value_serializer=None)
    for m in messages:
        if isinstance(m, Transaction):
            key, value = m.user.encode(), json.dumps(m.as_value()).encode()
        else:
            key, value = m
        producer.send(settings.transactions_topic, key=key, value=value)
    producer.flush()
    producer.close()


def reference(transactions: list[Transaction], deposit=Decimal(2000), withdrawal=Decimal(-2000)):
    """Written independently of tasks.transactions: one loop, Decimal, plain dicts.

    Returns ({user: [(kind, total, time), ...]}, {user: (total, count)}).
    """
    totals: dict[str, Decimal] = defaultdict(Decimal)
    counts: dict[str, int] = defaultdict(int)
    alerts: dict[str, list] = defaultdict(list)
    for t in transactions:
        totals[t.user] += t.amount
        counts[t.user] += 1
        if totals[t.user] > deposit:
            alerts[t.user].append(("deposit", totals[t.user], t.time))
        elif totals[t.user] < withdrawal:
            alerts[t.user].append(("withdrawal", totals[t.user], t.time))
    return dict(alerts), {u: (totals[u], counts[u]) for u in totals}


def alerts_by_user(settings) -> dict[str, list]:
    """The alerts topic (read committed), per user in order, totals as Decimal."""
    got: dict[str, list] = defaultdict(list)
    records = sorted(read_topic(settings, settings.transaction_alerts_topic),
                     key=lambda r: (r.partition, r.offset))  # fmt: skip
    for r in records:
        value = json.loads(r.value)
        assert r.key.decode() == value["user"]
        got[value["user"]].append((value["kind"], Decimal(value["total"]), value["time"]))
    return dict(got)


def changelog_totals(settings) -> dict[str, tuple[Decimal, int]]:
    """Latest value per key of the changelog topic, read plainly."""
    latest: dict[str, Any] = {}
    records = read_topic(settings, settings.transaction_totals_changelog_topic)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        latest[r.key.decode()] = r.value
    values = {u: json.loads(v) for u, v in latest.items() if v is not None}
    return {u: (Decimal(v["total"]), v["transactions"]) for u, v in values.items()}


def dead_letters(settings, topic: str | None = None) -> list[dict]:
    """The dead letters of `topic` (default: the transactions topic), in offset order."""
    dlq = settings.dlq_topic(topic or settings.transactions_topic)
    return [json.loads(r.value) for r in read_topic(settings, dlq)]


@contextmanager
def worker_thread(settings, **options) -> Iterator[Any]:
    """A TransactionAlertsWorker running in a thread of this process; stopped on exit."""
    from stream_workers.transaction_alerts import TransactionAlertsWorker
    from tasks.kafka import StopSignal

    worker = TransactionAlertsWorker(settings, **options)
    stop = StopSignal()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as error:  # surfaced in the test below
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=30)
        worker.close()
    assert not thread.is_alive(), "worker did not stop within 30 s of its stop signal"
    assert not errors, errors
