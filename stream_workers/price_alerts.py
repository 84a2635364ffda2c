"""`python -m stream_workers price-alerts`: the realtime side of price alerts.

On every trade the product's ten-minute window (event time, tasks.prices.ProductWindow) is
updated and every live alert of that product whose threshold the average reached is
notified on `notifications` (source "stream") and tombstoned on `price-alerts`, in one
Kafka transaction with the consumer offsets (one transaction per partition and poll batch).

Transactions run under the transactional id of the `trades` partition
(`<prefix>-<trades topic>-<partition>`), which the batch flow uses too when it fires
alerts of a product of that partition: whoever initialises that id last fences the other,
so a product's alerts are fired by one writer at a time, and each writer re-reads the alert
state after taking the id (see README, "One notification per alert").

State is rebuilt from Kafka on start, on a rebalance and after being fenced: alerts from
the compacted topic (read_committed, from the beginning), each partition's windows by
replaying `trades` from ten minutes (plus a margin) before the last committed trade,
found with offsets_for_times.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from tasks.kafka import (
    StopSignal,
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
    send_to_dlq,
)
from tasks.prices import (
    InvalidRecord,
    PriceState,
    fire_transactional_id,
    notification,
    parse_alert,
    parse_trade,
    time_from_us,
)
from tasks.settings import Settings, get_settings

log = logging.getLogger("stream_workers.price_alerts")


class PriceAlertsWorker:
    """The daemon's loop and state; `run()` until `stop` is truthy."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        group_id: str | None = None,
        batch_size: int | None = None,
        instance: str | None = None,
        stop: Any = None,
    ) -> None:
        self.s = s = settings or get_settings()
        self.instance = instance
        self.group_id = group_id or s.price_alerts_group
        self.batch_size = batch_size or s.price_alerts_batch_size
        self.stop = stop if stop is not None else StopSignal()
        self.state = PriceState(s.price_window_minutes)
        self.stats: Counter[str] = Counter()
        self.producers: dict[int, KafkaProducer] = {}
        self.assigned: set[TopicPartition] = set()
        self.consumer: KafkaConsumer | None = None
        self.alerts_consumer: KafkaConsumer | None = None
        # Bad alert records go to `<price-alerts>.dlq` through a plain producer; the highest
        # offset dead-lettered per partition keeps a rebuild (re-reading the topic from the
        # beginning) from sending them again. A new process sends them again (at least once).
        self.dlq_producer: KafkaProducer | None = None
        self.alerts_dead_lettered: dict[int, int] = {}
        # Test seam: called inside each transaction right before its commit.
        self.before_commit: Callable[[], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def ensure_topics(self) -> None:
        s = self.s
        mine = {s.trades_topic, s.price_alerts_topic, s.notifications_topic,
                s.dlq_topic(s.trades_topic), s.dlq_topic(s.price_alerts_topic)}  # fmt: skip
        ensure_topics([t for t in project_topics(s) if t.name in mine], s)

    def open(self) -> None:
        s = self.s
        self.consumer = make_consumer(
            settings=s,
            group_id=self.group_id,
            max_poll_records=self.batch_size,
            # Static membership with an explicit --instance: a restart takes its partitions
            # back at once instead of waiting for the dead member's session to expire.
            group_instance_id=f"{self.group_id}.{self.instance}" if self.instance else None,
            session_timeout_ms=s.price_alerts_session_timeout_ms,
        )
        self.consumer.subscribe([s.trades_topic])
        self.alerts_consumer = make_consumer(settings=s, group_id=None)
        self.dlq_producer = make_producer(s)
        partitions = self.alerts_consumer.partitions_for_topic(s.price_alerts_topic) or set()
        self.alerts_consumer.assign(
            [TopicPartition(s.price_alerts_topic, p) for p in sorted(partitions)]
        )

    def close(self) -> None:
        for producer in self.producers.values():
            producer.close(timeout=5)
        self.producers.clear()
        if self.dlq_producer is not None:
            self.dlq_producer.close(timeout=5)
        for consumer in (self.consumer, self.alerts_consumer):
            if consumer is not None:
                consumer.close(autocommit=False)

    def run(self) -> int:
        self.ensure_topics()
        self.open()
        assert self.consumer is not None
        last_report = time.monotonic()
        try:
            while not self.stop:
                self.poll_alerts()
                polled = self.consumer.poll(timeout_ms=100, max_records=self.batch_size)
                assignment = self.consumer.assignment()
                if assignment != self.assigned:
                    # New partitions (start or rebalance): their records wait for a rebuild.
                    self.rebuild(assignment)
                    continue
                for tp, records in polled.items():
                    if not self.process(tp, records):
                        break  # fenced or failed: state was rebuilt, positions rewound
                if time.monotonic() - last_report > 30:
                    last_report = time.monotonic()
                    log.info("stats: %s", dict(self.stats))
        finally:
            log.info("stopping; stats: %s", dict(self.stats))
            self.close()
        return 0

    # --- alerts ----------------------------------------------------------------------------

    def poll_alerts(self, timeout_ms: int = 0) -> int:
        assert self.alerts_consumer is not None
        applied = 0
        for records in self.alerts_consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                self.apply_alert(record)
                applied += 1
        return applied

    def apply_alert(self, record: ConsumerRecord) -> None:
        try:
            alert = parse_alert(record.key, record.value)
        except InvalidRecord as error:
            self.stats["bad_alerts"] += 1
            if record.offset > self.alerts_dead_lettered.get(record.partition, -1):
                assert self.dlq_producer is not None
                send_to_dlq(self.dlq_producer, record, str(error), self.s)
                self.alerts_dead_lettered[record.partition] = record.offset
                self.stats["alerts_dlq"] += 1
                log.warning("bad alert at %s[%d]@%d to the DLQ: %s",
                            record.topic, record.partition, record.offset, error)  # fmt: skip
            return
        if alert is None:
            self.state.alerts.remove(record.key.decode())
        else:
            self.state.alerts.upsert(alert)

    def catch_up_alerts(self) -> None:
        """Read the compacted alert topic from the beginning to its current end (committed)."""
        consumer = self.alerts_consumer
        assert consumer is not None
        self.state.alerts.clear()
        tps = list(consumer.assignment())
        if not tps:
            return
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + max(self.s.kafka_timeout_s, 30)
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise KafkaError(f"alerts not caught up to {end} in time")
            self.poll_alerts(timeout_ms=200)

    # --- rebuild ---------------------------------------------------------------------------

    def rebuild(self, assignment: set[TopicPartition]) -> None:
        """Producers for the assigned partitions (fencing zombies), alerts, windows, positions."""
        started = time.monotonic()
        assert self.consumer is not None
        for producer in self.producers.values():
            producer.close(timeout=1)
        self.producers.clear()
        self.assigned = set(assignment)
        self.state = PriceState(self.s.price_window_minutes)
        for tp in sorted(assignment):
            producer = make_producer(
                self.s,
                transactional_id=fire_transactional_id(
                    self.s.price_fire_transactional_prefix, tp.topic, tp.partition
                ),
                transaction_timeout_ms=self.s.price_alerts_txn_timeout_ms,
                # A transaction right after a commit often meets CONCURRENT_TRANSACTIONS while
                # the previous markers are written: retry soon, not after the default 100 ms+.
                retry_backoff_ms=10,
            )
            # Waits for (or aborts) any earlier transaction under this id: a killed worker's
            # or a batch firing's. From here on, no other writer fires these products' alerts
            # without fencing us first.
            producer.init_transactions()
            self.producers[tp.partition] = producer
        self.catch_up_alerts()
        replayed = 0
        for tp in sorted(assignment):
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
                continue
            replayed += self.replay_window(tp, committed)
            self.consumer.seek(tp, committed)
        self.stats["rebuilds"] += 1
        log.info(
            "rebuilt %d partition(s): %d alerts, %d trades replayed into %d window(s) in %.2fs",
            len(assignment), len(self.state.alerts), replayed, len(self.state.windows),
            time.monotonic() - started,
        )  # fmt: skip

    def replay_window(self, tp: TopicPartition, committed: int) -> int:
        """Re-add the trades before `committed` that can still be in a window (no firing)."""
        s = self.s
        replay = make_consumer(settings=s, group_id=None)
        try:
            replay.assign([tp])
            begin = replay.beginning_offsets([tp])[tp]
            if committed <= begin:
                return 0
            last = _last_record_before(replay, tp, max(begin, committed - 16), committed)
            if last is None:
                start = begin  # only control records near the end: replay everything
            else:
                target_ms = (
                    last.timestamp
                    - s.price_window_minutes * 60_000
                    - int(s.price_rebuild_margin_s * 1000)
                )
                found = replay.offsets_for_times({tp: max(target_ms, 0)})[tp]
                start = found.offset if found is not None else begin
            replay.seek(tp, start)
            count = 0
            deadline = time.monotonic() + max(s.kafka_timeout_s, 60)
            while replay.position(tp) < committed and time.monotonic() < deadline:
                for records in replay.poll(timeout_ms=200, max_records=10_000).values():
                    for record in records:
                        if record.offset >= committed:
                            break
                        try:
                            self.state.replay(parse_trade(record.value))
                            count += 1
                        except InvalidRecord:
                            pass  # went to the DLQ when it was first processed
            return count
        finally:
            replay.close()

    # --- processing ------------------------------------------------------------------------

    def process(self, tp: TopicPartition, records: list[ConsumerRecord]) -> bool:
        """One transaction: outputs of `records` and the offset after them. False: rebuilt."""
        s = self.s
        producer = self.producers[tp.partition]
        stats = self.stats
        state = self.state
        try:
            producer.begin_transaction()
            for record in records:
                try:
                    trade = parse_trade(record.value)
                except InvalidRecord as error:
                    send_to_dlq(producer, record, str(error), s)
                    stats["dlq"] += 1
                    continue
                evaluation = state.on_trade(trade)
                if not evaluation.accepted:
                    window = state.windows[trade.product_id]
                    reason = (
                        f"too late: event time {time_from_us(trade.time_us).isoformat()} is "
                        f"before the window start {time_from_us(window.start_us).isoformat()} "
                        f"of {trade.product_id} (watermark {time_from_us(window.watermark_us).isoformat()})"
                    )  # fmt: skip
                    send_to_dlq(producer, record, reason, s)
                    stats["too_late"] += 1
                    continue
                for alert in evaluation.fired:
                    message = notification(
                        alert, evaluation.average_units, evaluation.window_end_us, "stream"
                    )
                    producer.send(s.notifications_topic, key=alert.user_id, value=message)
                    producer.send(s.price_alerts_topic, key=alert.alert_id, value=None)
                    stats["fired"] += 1
            offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)}
            producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            if self.before_commit is not None:
                self.before_commit()
            producer.commit_transaction()
            stats["trades"] += len(records)
            return True
        except KafkaError as error:
            # Fenced (a batch firing took the id), a rebalance, or the broker: nothing of this
            # transaction is visible; rewind to the committed offsets with fresh state.
            log.warning("transaction on %s failed (%r); rebuilding state", tp, error)
            stats["aborted"] += 1
            try:
                producer.abort_transaction()
            except Exception:  # the producer may be fenced: it is replaced below anyway
                pass
            time.sleep(s.price_fence_backoff_s)
            self.rebuild_after_failure()
            return False

    def rebuild_after_failure(self) -> None:
        assert self.consumer is not None
        while not self.stop:
            try:
                self.rebuild(self.consumer.assignment())
                return
            except KafkaError as error:
                log.warning("rebuild failed (%r); retrying", error)
                time.sleep(max(self.s.price_fence_backoff_s, 1.0))


def _last_record_before(
    consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int
) -> ConsumerRecord | None:
    consumer.seek(tp, start)
    last = None
    deadline = time.monotonic() + 10
    while consumer.position(tp) < end and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                if record.offset < end:
                    last = record
    return last


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream_workers price-alerts",
        description="Ten-minute average price alerts on every trade (stream side).",
    )
    settings = get_settings()
    parser.add_argument("--group", default=settings.price_alerts_group, help="consumer group")
    parser.add_argument(
        "--batch-size", type=int, default=settings.price_alerts_batch_size,
        help="max trades per poll (and per transaction)",
    )  # fmt: skip
    parser.add_argument(
        "--instance", default=None,
        help="stable name of this instance (static group membership: fast restarts)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    stop = StopSignal().install()
    worker = PriceAlertsWorker(
        settings, group_id=args.group, batch_size=args.batch_size, instance=args.instance,
        stop=stop,
    )  # fmt: skip
    log.info(
        "price-alerts worker: %s -> %s (group %s)",
        settings.trades_topic, settings.notifications_topic, args.group,
    )  # fmt: skip
    return worker.run()
