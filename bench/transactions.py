"""Transactions/s of one transaction-alerts worker process: exactly once (Kafka
transactions), at least once (plain commits), and a bare kafka-python consumer that only
polls, all on the same topic in the same run. Prints the rates and their ratios to the
bare consumer.

    .venv/bin/python bench/transactions.py [--transactions 100000] [--batch-size 5000]

Each run reads the whole topic from the beginning in its own consumer group; the clock
runs from its first record to its last commit (group join and restore are left out).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import uuid

from rich.console import Console
from rich.table import Table

from sources.transactions import generate
from stream_workers.transaction_alerts import TransactionAlertsWorker
from tasks.kafka import (
    StopSignal,
    TopicSpec,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    project_topics,
)
from tasks.settings import Settings, get_settings

console = Console()


def bench_settings(run: str, topic: str, partitions: int) -> Settings:
    """Own alerts / changelog / group per run; the same source topic for all."""
    return get_settings().model_copy(
        update={
            "transactions_topic": topic,
            "transaction_alerts_topic": f"bench-transaction-alerts-{run}",
            "transaction_totals_changelog_topic": f"bench-transaction-totals-{run}",
            "transaction_alerts_group": f"bench-transaction-alerts-{run}",
            "kafka_default_partitions": partitions,
        }
    )


def produce(topic: str, count: int, users: int, partitions: int) -> None:
    base = get_settings()
    ensure_topics([TopicSpec(topic, partitions)], base)
    producer = make_producer(base, key_serializer=None, value_serializer=None,
                             batch_size=512 * 1024, linger_ms=20)  # fmt: skip
    for t in generate(users, count, seed=7):
        producer.send(topic, key=t.user.encode(), value=json.dumps(t.as_value()).encode())
    producer.flush()
    producer.close()


def bare(settings: Settings, count: int, batch_size: int) -> float:
    """Poll only: the ceiling any worker on this client can reach."""
    consumer = make_consumer(settings.transactions_topic, settings=settings,
                             group_id=settings.transaction_alerts_group,
                             max_poll_records=batch_size,
                             max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
    seen, started = 0, None
    try:
        while seen < count:
            polled = consumer.poll(timeout_ms=500, max_records=batch_size)
            n = sum(map(len, polled.values()))
            if n and started is None:
                started = time.perf_counter()
            seen += n
        consumer.commit()
        return count / (time.perf_counter() - started)
    finally:
        consumer.close()


def worker(
    settings: Settings, count: int, batch_size: int, exactly_once: bool
) -> tuple[float, int]:
    """One in-process worker until it has committed `count` transactions."""
    ensure_topics(project_topics(settings), settings)
    w = TransactionAlertsWorker(settings, exactly_once=exactly_once, batch_size=batch_size)
    marks: dict[str, float] = {}
    handle = w.runtime.handle

    def timed(polled):
        marks.setdefault("first", time.perf_counter())
        handle(polled)
        marks["last"] = time.perf_counter()

    w.runtime.handle = timed

    try:
        w.run(StopSignal(lambda: w.stats.records >= count))
        return count / (marks["last"] - marks["first"]), w.stats.counts["alerts"]
    finally:
        w.close()


BARE, ALO, EOS = "bare consumer (poll only)", "at least once", "exactly once"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=get_settings().transaction_alerts_batch_size,
                        help="max records per poll (default: the worker's setting)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median shown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = uuid.uuid4().hex[:8]
    topic = f"bench-transactions-{run}"
    n, size, parts = args.transactions, args.batch_size, args.partitions

    console.print(f"producing {n} transactions for {args.users} users to {topic} ...")
    produce(topic, n, args.users, parts)
    rates: dict[str, list[float]] = {BARE: [], ALO: [], EOS: []}
    alerts = 0
    try:
        # Interleaved, so load from other processes on the machine hits every mode alike.
        for i in range(args.repeat):
            rates[BARE].append(bare(bench_settings(f"bare{i}-{run}", topic, parts), n, size))
            rate, alerts = worker(bench_settings(f"alo{i}-{run}", topic, parts), n, size, False)
            rates[ALO].append(rate)
            rate, _ = worker(bench_settings(f"eos{i}-{run}", topic, parts), n, size, True)
            rates[EOS].append(rate)
            console.print(
                f"  run {i + 1}: " + ", ".join(f"{m} {r[-1]:,.0f}/s" for m, r in rates.items())
            )
    finally:
        _delete_topics(run)

    medians = {mode: statistics.median(r) for mode, r in rates.items()}
    table = Table(title=f"transactions/s, one process, {n} transactions of {args.users} users, "
                        f"{alerts} alerts ({alerts / n:.0%}), batch {size}, "
                        f"median of {args.repeat}")  # fmt: skip
    for column in ("mode", "transactions/s", "ratio to bare", "aim"):
        table.add_column(column)
    aims = {ALO: ">= 0.6", EOS: ">= 0.5"}
    for mode, rate in medians.items():
        table.add_row(mode, f"{rate:,.0f}", f"{rate / medians[BARE]:.2f}", aims.get(mode, "1.00"))
    console.print(table)
    return 0


def _delete_topics(run: str) -> None:
    # The broker is shared: leave nothing of this run behind.
    admin = make_admin(get_settings())
    try:
        admin.delete_topics([t for t in admin.list_topics() if t.startswith("bench-") and run in t])
    finally:
        admin.close()


if __name__ == "__main__":
    raise SystemExit(main())
