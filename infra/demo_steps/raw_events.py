"""Foundation step: sample events on the source topics, loaded into DuckDB by a deployment."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tasks.kafka import make_producer
from tasks.warehouse import connect, run_sql

ORDER = 90  # after the domain steps: it loads whatever they produced too
SAMPLE_EVENTS = 200


def produce(ctx) -> None:
    rng = random.Random(7)
    start = datetime.now(UTC) - timedelta(minutes=5)
    producer = make_producer(ctx.settings)
    for i in range(SAMPLE_EVENTS):
        at = (start + timedelta(seconds=i)).isoformat()
        user = f"user-{rng.randrange(10)}"
        amount = Decimal(rng.randrange(-150_000, 150_000)) / 100
        producer.send(ctx.settings.transactions_topic, key=user,
                      value={"user": user, "amount": str(amount), "time": at})  # fmt: skip
    producer.flush()
    producer.close()
    ctx.add("foundation", "sample events produced", SAMPLE_EVENTS)


def batch(ctx) -> None:
    ctx.run_deployment("load_events/load-events")


def summarize(ctx) -> None:
    con = connect(ctx.settings, read_only=True)
    try:
        for topic, events, *_ in run_sql(con, "warehouse/count_raw_events").fetchall():
            ctx.add("foundation", f"raw_events[{topic}]", events)
    finally:
        con.close()
