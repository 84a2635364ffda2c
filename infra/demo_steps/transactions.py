"""Transactions: two exactly-once workers share the partitions; the daily check agrees."""

from __future__ import annotations

from argparse import Namespace

from infra import services
from sources import transactions as source
from tasks.kafka import (
    ensure_topics,
    group_lag,
    make_consumer,
    make_producer,
    partitions_of,
    project_topics,
    read_to_end,
)
from tasks.warehouse import connect, run_sql

ORDER = 20
USERS, TRANSACTIONS = 30, 3000


def prepare(ctx) -> None:
    ensure_topics(project_topics(ctx.settings), ctx.settings)
    ctx.start_worker("transaction-alerts", "--instance", "0")
    ctx.start_worker("transaction-alerts", "--instance", "1")


def produce(ctx) -> None:
    s = ctx.settings
    args = Namespace(users=USERS, count=TRANSACTIONS, seed=1, rate=0, start=None)
    source.produce(source.generated(args, s), TRANSACTIONS, 0, s)
    producer = make_producer(s)  # one malformed transaction: the workers dead-letter it
    producer.send(s.transactions_topic, key="Rex", value={"user": "Rex", "amount": "ten"})
    producer.flush()
    producer.close()
    ctx.add("transactions", "transactions produced", TRANSACTIONS + 1)
    # The check tolerates lag, but the summary reads better once the workers caught up.
    services.wait_for(
        lambda: group_lag(s.transaction_alerts_group, [s.transactions_topic], s) == 0, 60, 0.5
    )


def batch(ctx) -> None:
    ctx.run_deployment("transaction_totals/transaction-totals")


def summarize(ctx) -> None:
    s = ctx.settings
    ctx.add("transactions", "alerts (read committed)", _count(s, s.transaction_alerts_topic))
    ctx.add("transactions", "dead letters", _count(s, s.dlq_topic(s.transactions_topic)))
    con = connect(s, read_only=True)
    try:
        rows = run_sql(con, "transactions/latest_check").fetchall()
    finally:
        con.close()
    if rows:
        users, compared, mismatches, _ = rows[0]
        ctx.add("transactions", "users compared stream vs batch", f"{compared} of {users}")
        ctx.add("transactions", "total mismatches (batch check)", mismatches)


def _count(settings, topic: str) -> int:
    """Committed messages on `topic` (aborted transactions and markers are not counted)."""
    consumer = make_consumer(settings=settings, group_id=None)
    try:
        return sum(map(len, read_to_end(consumer, partitions_of(consumer, topic), 30)))
    finally:
        consumer.close()
