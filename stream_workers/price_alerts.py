"""`python -m stream_workers price-alerts`: the realtime side of price alerts.

On every trade the product's ten-minute window (event time, tasks.prices.ProductWindow) is
updated and every live alert of that product whose threshold the average reached is
notified on `notifications` (source "stream") and tombstoned on `price-alerts`, in one
Kafka transaction with the consumer offsets (one transaction per partition and poll batch).

Transactions run under the transactional id of the `trades` partition
(`<prefix>-<trades topic>-<partition>`), which the batch flow uses too when it fires
alerts of a product of that partition: whoever initialises that id last fences the other,
so a product's alerts are fired by one writer at a time, and each writer re-reads the alert
state after taking the id (see docs/prices.md, "One notification per alert when both sides run").

State is rebuilt from Kafka on start, on a rebalance and after being fenced: alerts from
the compacted topic (read_committed, from the beginning), each partition's windows by
replaying `trades` from ten minutes (plus a margin) before the last committed trade,
found with offsets_for_times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from stream_workers.metrics import Telemetry
from stream_workers.runtime import (
    Batch,
    Observer,
    Records,
    Runtime,
    Transactor,
    progress_interval,
    static_member_id,
)
from tasks.commands import topic_text, worker_parser
from tasks.kafka import (
    StopSignal,
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
    read_records,
    read_to_end,
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
    """Trades -> ten-minute windows (tasks.prices) -> notifications and tombstones, one
    transaction per trades partition and poll. `with worker: worker.run(stop)`."""

    name = "price-alerts"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        group_id: str | None = None,
        batch_size: int | None = None,
        instance: str | None = None,
        observers: Iterable[Observer] = (),
        on_fired: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.s = s = settings or get_settings()
        self.instance = instance
        self.group_id = group_id or s.price_alerts_group
        self.batch_size = batch_size or s.price_alerts_batch_size
        self.state = PriceState(s.price_window_minutes)
        self.transactors: dict[int, Transactor] = {}
        # Test seam: called inside each transaction right before its commit.
        self.before_commit: Callable[[], None] | None = None
        # Told each fired alert (its notification) once its transaction committed.
        self.on_fired = on_fired
        self.ensure_topics()
        consumer = make_consumer(
            settings=s,
            group_id=self.group_id,
            max_poll_records=self.batch_size,
            # Static membership with an explicit --instance: a restart takes its partitions
            # back at once instead of waiting for the dead member's session to expire.
            group_instance_id=static_member_id(self.group_id, instance),
            session_timeout_ms=s.price_alerts_session_timeout_ms,
        )
        self.alerts_consumer = make_consumer(settings=s, group_id=None)
        # Bad alert records go to `<price-alerts>.dlq` through a plain producer; the highest
        # offset dead-lettered per partition keeps a rebuild (re-reading the topic from the
        # beginning) from sending them again. A new process sends them again (at least once).
        self.dlq_producer: KafkaProducer = make_producer(s)
        self.alerts_dead_lettered: dict[int, int] = {}
        self.alert_partitions = [
            TopicPartition(s.price_alerts_topic, p)
            for p in sorted(self.alerts_consumer.partitions_for_topic(s.price_alerts_topic) or ())
        ]
        self.alerts_consumer.assign(self.alert_partitions)
        self.runtime = Runtime(
            self, consumer, [s.trades_topic], max_records=self.batch_size, poll_timeout_ms=100,
            abort_backoff_s=s.price_fence_backoff_s,
            closers=[self._close_transactors, lambda: self.dlq_producer.close(timeout=5),
                     lambda: self.alerts_consumer.close(autocommit=False)],
            instance=instance, status_dir=s.stream_status_dir, observers=observers,
            progress_interval_s=progress_interval(s),
        )  # fmt: skip
        self.stats = self.runtime.stats
        self.counts = self.stats.counts

    def ensure_topics(self) -> None:
        s = self.s
        mine = {s.trades_topic, s.price_alerts_topic, s.notifications_topic,
                s.dlq_topic(s.trades_topic), s.dlq_topic(s.price_alerts_topic)}  # fmt: skip
        ensure_topics([t for t in project_topics(s) if t.name in mine], s)

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> PriceAlertsWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stop: StopSignal | None = None) -> None:
        # New alerts are applied before each poll of trades.
        self.runtime.run(stop, before_poll=self.poll_alerts)

    def close(self) -> None:
        self.runtime.close()

    def _close_transactors(self) -> None:
        for transactor in self.transactors.values():
            transactor.close()
        self.transactors.clear()

    # --- the processor hooks ------------------------------------------------------------

    def scopes(self, polled: Records) -> list[tuple[Transactor, Records]]:
        # One transaction per trades partition: its transactional id is shared with the
        # batch flow firing the alerts of that partition's products.
        return [(self.transactors[tp.partition], {tp: polled[tp]}) for tp in sorted(polled)]

    def process(self, records: Records) -> Batch:
        s = self.s
        counts = self.counts
        state = self.state
        fired: list[dict[str, Any]] = []
        batch = Batch(records, state=fired)
        for record in (r for rs in records.values() for r in rs):
            try:
                trade = parse_trade(record.value)
            except InvalidRecord as error:
                batch.dead_letter(record, str(error))
                continue
            evaluation = state.on_trade(trade)
            if not evaluation.accepted:
                window = state.windows[trade.product_id]
                reason = (
                    f"too late: event time {time_from_us(trade.time_us).isoformat()} is "
                    f"before the window start {time_from_us(window.start_us).isoformat()} "
                    f"of {trade.product_id} (watermark {time_from_us(window.watermark_us).isoformat()})"
                )  # fmt: skip
                batch.dead_letter(record, reason)
                counts["too_late"] += 1
                continue
            for alert in evaluation.fired:
                message = notification(
                    alert, evaluation.average_units, evaluation.window_end_us, "stream"
                )
                batch.emit(s.notifications_topic, alert.user_id, message)
                batch.emit(s.price_alerts_topic, alert.alert_id, None)
                fired.append(message)
                counts["fired"] += 1
        return batch

    def on_committed(self, batch: Batch) -> None:
        """The windows and alerts moved on in `process` already; the fired alerts are told."""
        if self.on_fired is None:
            return
        for message in batch.state or ():  # None: a batch the runtime built (a dead letter)
            try:
                self.on_fired(message)
            except Exception:  # telling must not stop the worker (the alert went out)
                log.exception("telling alert %s fired failed", message.get("alert_id"))

    def on_aborted(self, records: Records) -> None:
        # `process` moved the windows and removed fired alerts: rebuild everything from
        # Kafka (after taking the transactional ids back, so a batch firing that fenced us
        # has committed and its tombstones are read).
        self.rebuild_until_done(self.runtime.assigned)

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.rebuild_until_done(self.runtime.assigned)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            transactor = self.transactors.pop(tp.partition, None)
            if transactor is not None:
                transactor.close(timeout_s=1)

    # --- alerts -------------------------------------------------------------------------

    def poll_alerts(self, timeout_ms: int = 0) -> int:
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
            self.counts["bad_alerts"] += 1
            if record.offset > self.alerts_dead_lettered.get(record.partition, -1):
                send_to_dlq(self.dlq_producer, record, str(error), self.s)
                self.alerts_dead_lettered[record.partition] = record.offset
                self.counts["alerts_dlq"] += 1
                log.warning("bad alert at %s[%d]@%d to the DLQ: %s",
                            record.topic, record.partition, record.offset, error)  # fmt: skip
            return
        if alert is None:
            self.state.alerts.remove(record.key.decode())
        else:
            self.state.alerts.upsert(alert)

    def catch_up_alerts(self) -> None:
        """Read the compacted alert topic from the beginning to its current end (committed)."""
        self.state.alerts.clear()
        timeout_s = max(self.s.kafka_timeout_s, 30)
        for batch in read_to_end(self.alerts_consumer, self.alert_partitions, timeout_s):
            for record in batch:
                self.apply_alert(record)

    # --- rebuild ------------------------------------------------------------------------

    def rebuild_until_done(self, assignment: set[TopicPartition]) -> None:
        self.runtime.retry(lambda: self.rebuild(assignment), "rebuilding the state")

    def rebuild(self, assignment: set[TopicPartition]) -> None:
        """Producers for the assigned partitions (fencing zombies), alerts, windows, positions."""
        started = time.monotonic()
        consumer = self.runtime.consumer
        self.state = PriceState(self.s.price_window_minutes)
        # New producers, each with init_transactions: it waits for (or aborts) every earlier
        # transaction under its id, ours included, until its markers are written; so the
        # alerts read next show every tombstone committed so far. From here on no other
        # writer fires these products' alerts without fencing us first.
        mine = {tp.partition for tp in assignment}
        for partition in set(self.transactors) - mine:
            self.transactors.pop(partition).close(timeout_s=1)
        for tp in sorted(assignment):
            transactor = self.transactors.get(tp.partition)
            if transactor is None:
                self.transactors[tp.partition] = self._transactor(tp)
            else:  # the same object: the runtime may hold it for a batch in hand
                transactor.close(timeout_s=1)
                transactor.ensure_producer()
        self.catch_up_alerts()
        replayed = 0
        for tp in sorted(assignment):
            committed = consumer.committed(tp)
            if committed is None:
                consumer.seek_to_beginning(tp)
                continue
            replayed += self.replay_window(tp, committed)
            consumer.seek(tp, committed)
        self.counts["rebuilds"] += 1
        log.info(
            "rebuilt %d partition(s): %d alerts, %d trades replayed into %d window(s) in %.2fs",
            len(assignment), len(self.state.alerts), replayed, len(self.state.windows),
            time.monotonic() - started,
        )  # fmt: skip

    def _transactor(self, tp: TopicPartition) -> Transactor:
        s = self.s

        def producer() -> KafkaProducer:
            return make_producer(
                s,
                transactional_id=fire_transactional_id(
                    s.price_fire_transactional_prefix, tp.topic, tp.partition
                ),
                transaction_timeout_ms=s.price_alerts_txn_timeout_ms,
                # A transaction right after a commit often meets CONCURRENT_TRANSACTIONS
                # while the previous markers are written: retry at once (1 ms: p99 of a
                # one-record transaction 11 ms here, against 31 ms at 10 ms and 210 at 100).
                retry_backoff_ms=1,
                linger_ms=0,  # the commit flushes anyway: waiting only adds latency
            )

        transactor = Transactor(producer, s)
        transactor.before_commit = self._before_commit
        return transactor

    def _before_commit(self, batch: Batch) -> None:
        if self.before_commit is not None:
            self.before_commit()

    def replay_window(self, tp: TopicPartition, committed: int) -> int:
        """Re-add the trades before `committed` that can still be in a window (no firing)."""
        s = self.s
        replay = make_consumer(settings=s, group_id=None, max_poll_records=10_000)
        timeout_s = max(s.kafka_timeout_s, 30)
        try:
            replay.assign([tp])
            begin = replay.beginning_offsets([tp])[tp]
            if committed <= begin:
                return 0
            tail = read_records(replay, [tp], timeout_s,
                                start={tp: max(begin, committed - 16)}, end={tp: committed})  # fmt: skip
            if not tail:
                start = begin  # only control records near the end: replay everything
            else:
                target_ms = (
                    tail[-1].timestamp
                    - s.price_window_minutes * 60_000
                    - int(s.price_rebuild_margin_s * 1000)
                )
                found = replay.offsets_for_times({tp: max(target_ms, 0)})[tp]
                start = found.offset if found is not None else begin
            count = 0
            for batch in read_to_end(replay, [tp], timeout_s, start={tp: start},
                                     end={tp: committed}):  # fmt: skip
                for record in batch:
                    try:
                        self.state.replay(parse_trade(record.value))
                        count += 1
                    except InvalidRecord:
                        pass  # went to the DLQ when it was first processed
            return count
        finally:
            replay.close()


def main(argv: list[str]) -> int:
    settings = s = get_settings()
    parser = worker_parser(
        "price-alerts",
        "Ten-minute average price alerts on every trade (stream side).",
        settings,
        reads=[topic_text(s, "trades_topic"), topic_text(s, "price_alerts_topic")],
        writes=[topic_text(s, "notifications_topic"),
                topic_text(s, "price_alerts_topic") + ": tombstones of fired alerts",
                topic_text(s, "trades_topic", dlq=True),
                topic_text(s, "price_alerts_topic", dlq=True)],
        own_settings=["price_alerts_group", "price_alerts_batch_size", "price_window_minutes",
                      "price_fire_transactional_prefix", "price_alerts_txn_timeout_ms",
                      "price_alerts_session_timeout_ms", "price_rebuild_margin_s",
                      "price_fence_backoff_s"],
        instance_help="stable name of this instance (static group membership: fast restarts); "
        "metrics and status files name it, or the pid without one",
    )  # fmt: skip
    parser.add_argument("--group", default=settings.price_alerts_group, help="consumer group")
    parser.add_argument(
        "--batch-size", type=int, default=settings.price_alerts_batch_size,
        help="max trades per poll (and per transaction)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    stop = StopSignal().install()
    with Telemetry("price-alerts", args.instance, settings, port=args.metrics_port,
                   host=args.metrics_host) as telemetry:  # fmt: skip
        observers = telemetry.observers(args.group)
        worker = PriceAlertsWorker(
            settings, group_id=args.group, batch_size=args.batch_size, instance=args.instance,
            observers=observers, on_fired=telemetry.events_of().alert_fired,
        )  # fmt: skip
        log.info(
            "price-alerts worker: %s -> %s (group %s)",
            settings.trades_topic, settings.notifications_topic, args.group,
        )  # fmt: skip
        with worker:
            worker.run(stop)
    return 0
