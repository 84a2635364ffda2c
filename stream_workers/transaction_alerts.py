"""`python -m stream_workers transaction-alerts`: per-user running totals and deposit /
withdrawal alerts, exactly once across crashes and rebalances.

Consumes `transactions` in a consumer group. The state (each user's total) is held for the
partitions this process owns and backed by a compacted changelog co-partitioned with the
source (a record of partition p updates changelog partition p). Per poll batch, ONE Kafka
transaction carries the alerts, the changelog updates, the dead letters and the consumer
offsets (bound to the group generation, so a zombie that lost its partitions is fenced).
On every assignment the new partitions' totals are restored from the changelog
(read_committed, to its end) before any of their records is processed; on revocation they
are dropped. Run several processes to share the partitions.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable

from kafka import TopicPartition
from kafka.errors import FencedInstanceIdError, KafkaError

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
    encode_json,
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
    read_records,
)
from tasks.settings import Settings, get_settings
from tasks.transactions import (
    Rules,
    UserTotal,
    apply_batch,
    encode_alerts,
    encode_changelog,
    fold_changelog,
    parse_records,
)

log = logging.getLogger("transaction-alerts")


def _bytes_or_json(value) -> bytes | None:
    return value if isinstance(value, bytes) else encode_json(value)


class TransactionAlertsWorker:
    """Parse -> running totals (tasks.transactions) -> alerts and changelog, per poll batch.

    `with worker: worker.run(stop)`; `stop` is e.g. a StopSignal.
    """

    name = "transaction-alerts"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        instance: str | None = None,
        exactly_once: bool = True,
        batch_size: int | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        s = self.settings = settings or get_settings()
        self.rules = Rules.from_settings(s)
        self.exactly_once = exactly_once
        self.batch_size = batch_size or s.transaction_alerts_batch_size
        self.topic = s.transactions_topic
        mine = {
            s.transactions_topic,
            s.transaction_alerts_topic,
            s.transaction_totals_changelog_topic,
            s.dlq_topic(s.transactions_topic),
            s.dlq_topic(s.transaction_totals_changelog_topic),
        }
        ensure_topics([t for t in project_topics(s) if t.name in mine], s)

        self.totals: dict[str, UserTotal] = {}
        self.users_of: dict[int, set[str]] = defaultdict(set)
        self.owned: set[int] = set()  # source partitions assigned AND restored
        self.restored_users = 0
        self.bad_changelog_records = 0
        self.restorer = make_consumer(settings=s, group_id=None, max_poll_records=10_000)
        self.partitions = self._co_partitioned()
        # The changelog's high watermarks (read_uncommitted), to see when every transaction
        # on a partition has its markers written.
        self.watermarks = make_consumer(settings=s, group_id=None,
                                        isolation_level="read_uncommitted")  # fmt: skip

        # One transactional id per worker instance: a restart under the same --instance
        # fences its predecessor and aborts the transaction it left open at once.
        self.instance = instance or uuid.uuid4().hex[:12]
        self.transactor = Transactor(self._make_producer, s, exactly_once=exactly_once)
        session = s.transaction_alerts_session_timeout_ms
        consumer = make_consumer(
            settings=s,
            group_id=s.transaction_alerts_group,
            # static membership only with an explicit instance: a quick restart then gets its
            # partitions back without a rebalance of the others.
            group_instance_id=static_member_id(s.transaction_alerts_group, instance),
            session_timeout_ms=session,
            heartbeat_interval_ms=session // 3,
            max_poll_records=self.batch_size,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.runtime = Runtime(
            self, consumer, [self.topic], max_records=self.batch_size,
            closers=[self.transactor.close, self.restorer.close, self.watermarks.close],
            instance=instance, status_dir=s.stream_status_dir, observers=observers,
            progress_interval_s=progress_interval(s),
        )  # fmt: skip
        self.stats = self.runtime.stats

    def _make_producer(self):
        s = self.settings
        # Alerts and changelog values come pre-encoded (vectorised); dead letters are dicts.
        options = {"batch_size": 256 * 1024, "value_serializer": _bytes_or_json}
        if not self.exactly_once:
            return make_producer(s, **options)
        return make_producer(
            s,
            transactional_id=f"{s.transaction_alerts_group}-{self.instance}",
            transaction_timeout_ms=s.transaction_alerts_txn_timeout_ms,
            **options,
        )

    def _co_partitioned(self) -> int:
        s = self.settings
        source = self.restorer.partitions_for_topic(self.topic) or set()
        changelog = self.restorer.partitions_for_topic(s.transaction_totals_changelog_topic)
        if not source or source != changelog:
            self.restorer.close()
            raise SystemExit(
                f"{s.transaction_totals_changelog_topic} must have the same partitions as "
                f"{self.topic} (co-partitioned state); found {len(changelog or ())} and "
                f"{len(source)}"
            )
        alerts = self.restorer.partitions_for_topic(s.transaction_alerts_topic)
        self.alerts_copartitioned = alerts == source
        return len(source)

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> TransactionAlertsWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stop: StopSignal | None = None) -> None:
        self.runtime.run(stop)

    def close(self) -> None:
        self.runtime.close()

    # --- the processor hooks ------------------------------------------------------------

    def scopes(self, polled: Records) -> list[tuple[Transactor, Records]]:
        return [(self.transactor, polled)]  # one transaction per poll batch

    def process(self, records: Records) -> Batch:
        flat = [r for rs in records.values() for r in rs]
        frame, rejects = parse_records(flat, self.rules, self.partitions)
        new_totals, alerts = apply_batch(self.totals, frame, self.rules)
        homes = dict(frame.select("user", "partition").unique("user").iter_rows())
        batch = Batch(records, dead_letters=rejects, state=(new_totals, homes, alerts.height))
        s = self.settings
        scale = self.rules.scale
        emit = batch.outputs.append
        alerts_topic = s.transaction_alerts_topic
        for key, value, partition in encode_alerts(alerts, scale):
            # A user's alerts stay in one partition, the one its key hashes to (= its
            # source partition when the counts match: no pure-Python murmur2 per alert).
            emit((alerts_topic, key, value, partition if self.alerts_copartitioned else None))
        changelog = s.transaction_totals_changelog_topic
        for key, value in encode_changelog(new_totals, scale):
            # co-partitioned: a restore of partition p reads changelog partition p
            emit((changelog, key, value, homes[key.decode()]))
        return batch

    def on_committed(self, batch: Batch) -> None:
        # Committed: only now does the in-memory state move on.
        if batch.state is None:  # only dead letters (a record the rules failed on)
            return
        new_totals, homes, alerts = batch.state
        self.stats.counts["alerts"] += alerts
        for user, total in new_totals.items():
            self.totals[user] = total
            self.users_of[homes[user]].add(user)

    def on_aborted(self, records: Records) -> None:
        """Nothing to drop: a batch's totals are applied only once it committed."""

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        mine = {tp for tp in partitions if tp.topic == self.topic}
        self.runtime.retry(lambda: self._restore(mine), "restoring from the changelog")

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self._drop({tp.partition for tp in partitions if tp.topic == self.topic})

    # --- state --------------------------------------------------------------------------

    def _drop(self, partitions: set[int]) -> None:
        self.owned -= partitions
        for p in partitions:
            for user in self.users_of.pop(p, ()):
                self.totals.pop(user, None)

    def _restore(self, partitions: set[TopicPartition]) -> None:
        """The partitions' totals from the changelog, read_committed, to its end."""
        if not partitions:
            return
        started = time.monotonic()
        s = self.settings
        # Stable committed offsets first (read_committed asks for them): the transaction of
        # the partitions' previous owner is complete, so its changelog updates are too.
        for tp in partitions:
            self.runtime.consumer.committed(tp)
        topic = s.transaction_totals_changelog_topic
        tps = [TopicPartition(topic, tp.partition) for tp in sorted(partitions)]
        end = self._stable_end(tps)
        records = read_records(self.restorer, tps, max(30.0, s.kafka_timeout_s), end=end)
        self.restorer.assign([])  # holds no partitions between restores
        restored, bad = fold_changelog(records, {tp.partition for tp in tps}, self.rules.scale)
        if bad:
            self._dead_letter_changelog(bad, restored)
        for p, totals in restored.items():
            self._drop({p})
            self.totals.update(totals)
            self.users_of[p] = set(totals)
            self.owned.add(p)
            self.restored_users += len(totals)
        log.info("restored %d users of partitions %s from the changelog (to offsets %s) in "
                 "%.2fs", sum(map(len, restored.values())), sorted(restored),
                 [end[tp] for tp in tps], time.monotonic() - started)  # fmt: skip

    def _dead_letter_changelog(self, bad, restored: dict[int, dict[str, UserTotal]]) -> None:
        """Poison changelog records to the changelog's DLQ, and each one's key written again
        with its last good total (or a tombstone), in one transaction.

        A poison record must not stop the worker, now or on every restart: the user's
        total is the last good value before it, and the rewrite supersedes the poison, so
        the next restore neither meets it nor dead-letters it again.
        """
        s = self.settings
        batch = Batch({}, dead_letters=bad)
        for record, reason in bad:
            log.error("bad changelog record %s[%d]@%d to %s: %s", record.topic,
                      record.partition, record.offset, s.dlq_topic(record.topic),
                      reason)  # fmt: skip
            if record.key is None:
                continue  # nothing to supersede: no total depends on a record without key
            user = record.key.decode(errors="replace")
            good = restored.get(record.partition, {}).get(user)
            value = encode_changelog({user: good}, self.rules.scale)[0][1] if good else None
            batch.emit(record.topic, record.key, value, record.partition)
        try:
            self.transactor.commit(self.runtime.consumer, batch)
        except KafkaError as error:
            self.transactor.abort(error)
            raise  # the restore is retried as a whole
        self.bad_changelog_records += len(bad)

    def _stable_end(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The changelog's last stable offsets, once they reach the high watermarks: a
        transaction that committed may still be writing its markers. An open transaction
        that stays open (a dead owner's, aborted at its timeout) is waited for a moment only:
        its updates will not count."""
        deadline = time.monotonic() + 2.0
        while True:
            stable = self.restorer.end_offsets(tps)
            high = self.watermarks.end_offsets(tps)
            if stable == high:
                return stable
            if time.monotonic() >= deadline:
                open_ = {
                    tp.partition: (stable[tp], high[tp]) for tp in tps if stable[tp] != high[tp]
                }
                log.warning("changelog partitions with a transaction still open after 2 s "
                            "(last stable offset, high watermark): %s; restoring to the last "
                            "stable offsets", open_)  # fmt: skip
                return stable
            self.runtime.stop.wait(0.02)


def main(argv: list[str]) -> int:
    settings = s = get_settings()
    parser = worker_parser(
        "transaction-alerts",
        "Per-user running totals and deposit / withdrawal alerts, exactly once.",
        settings,
        reads=[topic_text(s, "transactions_topic"),
               topic_text(s, "transaction_totals_changelog_topic") + ": restores"],
        writes=[topic_text(s, "transaction_alerts_topic"),
                topic_text(s, "transaction_totals_changelog_topic"),
                topic_text(s, "transactions_topic", dlq=True),
                topic_text(s, "transaction_totals_changelog_topic", dlq=True)],
        own_settings=["transaction_alerts_group", "transaction_alerts_batch_size",
                      "deposit_alert_threshold", "withdrawal_alert_threshold",
                      "transaction_amount_scale", "transaction_max_abs_amount",
                      "transaction_alerts_session_timeout_ms",
                      "transaction_alerts_txn_timeout_ms"],
        instance_help="stable name of this worker (e.g. 0, 1): static group membership and a "
        "fixed transactional id, so a restart takes its partitions back at once; without "
        "one: a random transactional id, and metrics and status files name the pid",
    )  # fmt: skip
    parser.add_argument(
        "--at-least-once",
        action="store_true",
        help="no Kafka transactions, plain offset commits (benchmark comparison only: a "
        "crash can duplicate alerts and double-count totals)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=s.transaction_alerts_batch_size,
        help="max records per poll batch (and per transaction)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    stop = StopSignal().install()
    with Telemetry("transaction-alerts", args.instance, settings, port=args.metrics_port,
                   host=args.metrics_host) as telemetry:  # fmt: skip
        worker = TransactionAlertsWorker(
            settings, instance=args.instance, exactly_once=not args.at_least_once,
            batch_size=args.batch_size,
            observers=telemetry.observers(s.transaction_alerts_group),
        )  # fmt: skip
        log.info("instance %s consuming %s in group %s (%s)", worker.instance, worker.topic,
                 s.transaction_alerts_group,
                 "exactly once" if worker.exactly_once else "at least once")  # fmt: skip
        with worker:
            try:
                worker.run(stop)
            except FencedInstanceIdError as error:
                log.error("stopping: another process runs as instance %r (%s)", args.instance,
                          error)  # fmt: skip
                return 1
    return 0
