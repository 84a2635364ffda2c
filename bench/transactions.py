"""Transactions/s of one transaction-alerts worker process: exactly once (Kafka
transactions), at least once (plain commits), and a bare kafka-python consumer that only
polls, all on the same topic in the same run. Prints the rates and their ratios to the
bare consumer.

    .venv/bin/python bench/transactions.py [--transactions N] [--users N] [--batch-size N]

Each run reads the whole topic from the beginning. Clocks: the bare consumer (assigned by
hand, offsets resolved first) from its first poll to the poll that brings the last record (no
decoding, no commit); a worker (its own consumer group) from the end of the restore of its
first assignment to the commit of the batch holding the last record (every fetch, parse,
validation, the rule, alerts, changelog, commit); group join and restore are left out of both.

After every worker run (not timed) its alerts topic and changelog are read to the end
(read_committed) and compared with a reference computed here in plain Decimal from the
transactions sent: the same alerts per user, in order, and the same final totals. Any
difference exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid
from collections import defaultdict
from decimal import Decimal

from rich.console import Console
from rich.table import Table

from sources.transactions import generate
from stream_workers.transaction_alerts import TransactionAlertsWorker
from tasks.kafka import (
    StopSignal,
    TopicSpec,
    decode_json,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    project_topics,
    read_to_end,
)
from tasks.settings import Settings, get_settings

console = Console(soft_wrap=True)
failures: list[str] = []
Alerts = dict[str, list[tuple[str, Decimal]]]  # user -> [(kind, total after), ...] in order


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


def produce(topic: str, count: int, users: int, partitions: int) -> list[tuple[str, str]]:
    """Send the transactions; returns (user, amount text) of each, in order."""
    base = get_settings()
    ensure_topics([TopicSpec(topic, partitions)], base)
    producer = make_producer(base, key_serializer=None, value_serializer=None,
                             batch_size=512 * 1024, linger_ms=20)  # fmt: skip
    sent = []
    for t in generate(users, count, seed=7):
        value = t.as_value()
        producer.send(topic, key=t.user.encode(), value=json.dumps(value).encode())
        sent.append((value["user"], value["amount"]))
    producer.flush()
    producer.close()
    return sent


def reference(sent: list[tuple[str, str]], settings: Settings) -> tuple[Alerts, dict[str, Decimal]]:
    """The rule in plain Decimal: after each transaction the user's total; above the deposit
    threshold a `deposit` alert, below the withdrawal threshold a `withdrawal` alert."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    alerts: Alerts = defaultdict(list)
    for user, amount in sent:
        totals[user] += Decimal(amount)
        if totals[user] > settings.deposit_alert_threshold:
            alerts[user].append(("deposit", totals[user]))
        elif totals[user] < settings.withdrawal_alert_threshold:
            alerts[user].append(("withdrawal", totals[user]))
    return dict(alerts), dict(totals)


def fail(message: str) -> None:
    failures.append(message)
    console.print(f"  [bold red]FAILED[/]: {message}", highlight=False)


def read_topic(settings: Settings, topic: str) -> list:
    consumer = make_consumer(settings=settings, group_id=None)
    try:
        from kafka import TopicPartition

        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return [r for batch in read_to_end(consumer, tps, 60) for r in batch]
    finally:
        consumer.close()


def check(settings: Settings, mode: str, expected: tuple[Alerts, dict[str, Decimal]]) -> int:
    """Compare the run's alerts topic and changelog with the reference; returns the alerts."""
    alerts: Alerts = defaultdict(list)
    records = read_topic(settings, settings.transaction_alerts_topic)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = decode_json(record.value)
        alerts[value["user"]].append((value["kind"], Decimal(value["total"])))
    totals = {}
    changelog = read_topic(settings, settings.transaction_totals_changelog_topic)
    for record in sorted(changelog, key=lambda r: (r.partition, r.offset)):
        if record.value is not None:
            totals[record.key.decode()] = Decimal(decode_json(record.value)["total"])
    want_alerts, want_totals = expected
    wrong_alerts = sorted(u for u in set(alerts) | set(want_alerts)
                          if alerts.get(u, []) != want_alerts.get(u, []))  # fmt: skip
    wrong_totals = sorted(u for u in set(totals) | set(want_totals)
                          if totals.get(u) != want_totals.get(u))  # fmt: skip
    if wrong_alerts or wrong_totals:
        u = (wrong_alerts or wrong_totals)[0]
        got, want = alerts.get(u, []), want_alerts.get(u, [])
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                  min(len(got), len(want)))  # fmt: skip
        message = (f"{mode}: {len(wrong_alerts)} users with alerts and {len(wrong_totals)} "
                   f"with final totals differing from the reference; e.g. {u}: alerts from "
                   f"#{at} {got[at:at + 2]} vs {want[at:at + 2]} ({len(got)} vs {len(want)}), "
                   f"total {totals.get(u)} vs {want_totals.get(u)}")  # fmt: skip
        fail(message)
    return len(records)


def bare(settings: Settings, count: int, batch_size: int) -> float:
    """Poll only: the ceiling any worker on this client can reach. Assigned by hand (no group
    join) and positioned before the clock starts, so the clock covers every fetch."""
    from kafka import TopicPartition

    topic = settings.transactions_topic
    consumer = make_consumer(settings=settings, group_id=None, max_poll_records=batch_size,
                             max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        for tp in tps:
            consumer.position(tp)  # resolves the offsets now, not inside the clock
        seen, started = 0, time.perf_counter()
        while seen < count:
            polled = consumer.poll(timeout_ms=500, max_records=batch_size)
            seen += sum(map(len, polled.values()))
        return count / (time.perf_counter() - started)
    finally:
        consumer.close()


def worker(
    settings: Settings, count: int, batch_size: int, exactly_once: bool
) -> tuple[float, int]:
    """One in-process worker until it has committed `count` transactions; the clock starts
    when the restore of its first assignment has finished (before its first fetch)."""
    ensure_topics(project_topics(settings), settings)
    w = TransactionAlertsWorker(settings, exactly_once=exactly_once, batch_size=batch_size)
    marks: dict[str, float] = {}
    on_assigned = w.on_assigned

    def restored(partitions) -> None:
        on_assigned(partitions)
        marks.setdefault("first", time.perf_counter())

    def committed(_report) -> None:
        if w.stats.records >= count:
            marks.setdefault("last", time.perf_counter())

    w.on_assigned = restored  # the runtime calls its processor's hook
    w.stats.listeners.append(committed)
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
    sent = produce(topic, n, args.users, parts)
    expected = reference(sent, get_settings())
    alerts = sum(map(len, expected[0].values()))
    rates: dict[str, list[float]] = {BARE: [], ALO: [], EOS: []}
    try:
        # Interleaved, so load from other processes on the machine hits every mode alike.
        for i in range(args.repeat):
            rates[BARE].append(bare(bench_settings(f"bare{i}-{run}", topic, parts), n, size))
            for mode, exactly_once in ((ALO, False), (EOS, True)):
                settings = bench_settings(f"{'eos' if exactly_once else 'alo'}{i}-{run}", topic,
                                          parts)  # fmt: skip
                rate, counted = worker(settings, n, size, exactly_once)
                rates[mode].append(rate)
                on_topic = check(settings, mode, expected)
                if counted != alerts:
                    fail(f"{mode}: the worker counted {counted} alerts, the reference "
                         f"{alerts} ({on_topic} on the topic)")  # fmt: skip
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
    console.print("clocks: bare = first poll (assigned by hand, offsets resolved) -> the poll "
                  "that brings the last record (no decoding, no commit); workers = end of the "
                  "restore of the first assignment -> commit of the batch holding the last "
                  "record (parse, rule, alerts, changelog, commit); group join and restore "
                  "excluded from both")  # fmt: skip
    console.print(f"checked after every worker run: alerts per user and final totals equal the "
                  f"Decimal reference ({alerts} alerts) -> "
                  f"{'agree' if not failures else 'DISAGREE'}")  # fmt: skip
    if failures:
        print(f"\nFAILED ({len(failures)}):", *failures, sep="\n  ", file=sys.stderr)
        return 1
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
