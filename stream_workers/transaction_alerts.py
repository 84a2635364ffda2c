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

import argparse
import logging
import queue
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import FencedInstanceIdError, KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from tasks.kafka import (
    StopSignal,
    encode_json,
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
    send_to_dlq,
)
from tasks.settings import Settings, get_settings
from tasks.transactions import (
    Rules,
    UserTotal,
    apply_batch,
    encode_alerts,
    encode_changelog,
    parse_records,
    read_changelog,
)

log = logging.getLogger("transaction-alerts")


def _bytes_or_json(value) -> bytes | None:
    return value if isinstance(value, bytes) else encode_json(value)


class _Rebalances(ConsumerRebalanceListener):
    # kafka-python runs listeners on its IO thread, which must not block (heartbeats): they
    # only queue the change; the worker applies it on its own thread right after poll().
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, set[TopicPartition]]] = queue.SimpleQueue()

    def on_partitions_revoked(self, revoked) -> None:
        self.events.put(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        self.events.put(("assigned", set(assigned)))


@dataclass
class Stats:
    transactions: int = 0
    alerts: int = 0
    dead_letters: int = 0
    batches: int = 0
    aborted: int = 0
    restored_users: int = 0


class TransactionAlertsWorker:
    """The daemon's logic; `run(stop)` loops until `stop` is truthy (e.g. a StopSignal)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        instance: str | None = None,
        exactly_once: bool = True,
        batch_size: int | None = None,
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
        }
        ensure_topics([t for t in project_topics(s) if t.name in mine], s)

        self.totals: dict[str, UserTotal] = {}
        self.users_of: dict[int, set[str]] = defaultdict(set)
        self.owned: set[int] = set()  # source partitions assigned AND restored
        self.stats = Stats()
        self.paused_until: float | None = None  # after an abort: wait to rejoin the group
        self.rebalances = _Rebalances()
        self.restorer = make_consumer(settings=s, group_id=None, max_poll_records=10_000)
        self.partitions = self._co_partitioned()

        # One transactional id per worker instance: a restart under the same --instance
        # fences its predecessor and aborts the transaction it left open at once.
        self.instance = instance or uuid.uuid4().hex[:12]
        self.producer = self._make_producer()
        session = s.transaction_alerts_session_timeout_ms
        self.consumer = make_consumer(
            settings=s,
            group_id=s.transaction_alerts_group,
            # static membership only with an explicit instance: a quick restart then gets its
            # partitions back without a rebalance of the others.
            group_instance_id=instance,
            session_timeout_ms=session,
            heartbeat_interval_ms=session // 3,
            max_poll_records=self.batch_size,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.consumer.subscribe([self.topic], listener=self.rebalances)

    def _make_producer(self):
        s = self.settings
        # Alerts and changelog values come pre-encoded (vectorised); dead letters are dicts.
        options = {"batch_size": 256 * 1024, "value_serializer": _bytes_or_json}
        if not self.exactly_once:
            return make_producer(s, **options)
        producer = make_producer(
            s,
            transactional_id=f"{s.transaction_alerts_group}-{self.instance}",
            transaction_timeout_ms=s.transaction_alerts_txn_timeout_ms,
            **options,
        )
        producer.init_transactions()  # fences older producers of this id, aborts their txn
        return producer

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

    # --- the loop ---------------------------------------------------------------------

    def run(self, stop: StopSignal | None = None) -> None:
        stop = StopSignal() if stop is None else stop
        last_log, logged = time.monotonic(), 0
        while not stop:
            polled = self.consumer.poll(timeout_ms=500, max_records=self.batch_size)
            self._apply_rebalances()
            if self.paused_until is not None and time.monotonic() >= self.paused_until:
                self.consumer.resume(*self.consumer.paused())
                self.paused_until = None
            # Only partitions we (still) own and have restored.
            polled = {tp: rs for tp, rs in polled.items() if tp.partition in self.owned}
            if polled:
                self._process(polled)
            if time.monotonic() - last_log >= 10:
                rate = (self.stats.transactions - logged) / (time.monotonic() - last_log)
                log.info("%s; %.0f transactions/s; partitions %s",
                         self.stats, rate, sorted(self.owned))  # fmt: skip
                last_log, logged = time.monotonic(), self.stats.transactions

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
        self.restorer.close()

    def _apply_rebalances(self) -> None:
        while True:
            try:
                kind, tps = self.rebalances.events.get_nowait()
            except queue.Empty:
                return
            partitions = {tp.partition for tp in tps if tp.topic == self.topic}
            if self.paused_until is not None:  # a rebalance: the group has caught up
                self.paused_until = time.monotonic()
            self._drop(partitions)
            if kind == "assigned":
                self._restore(partitions)

    def _drop(self, partitions: set[int]) -> None:
        self.owned -= partitions
        for p in partitions:
            for user in self.users_of.pop(p, ()):
                self.totals.pop(user, None)

    def _restore(self, partitions: set[int]) -> None:
        if not partitions:
            return
        started = time.monotonic()
        restored = read_changelog(partitions, settings=self.settings, consumer=self.restorer)
        for p, totals in restored.items():
            self.totals.update(totals)
            self.users_of[p] = set(totals)
            self.owned.add(p)
            self.stats.restored_users += len(totals)
        log.info("restored %d users of partitions %s from the changelog in %.2fs",
                 sum(map(len, restored.values())), sorted(partitions),
                 time.monotonic() - started)  # fmt: skip

    def _process(self, polled: dict[TopicPartition, list]) -> None:
        records = [r for rs in polled.values() for r in rs]
        frame, rejects = parse_records(records, self.rules, self.partitions)
        new_totals, alerts = apply_batch(self.totals, frame, self.rules)
        homes = dict(frame.select("user", "partition").unique("user").iter_rows())
        offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1) for tp, rs in polled.items()}
        if self.exactly_once:
            if not self._commit_transaction(alerts, new_totals, homes, rejects, offsets):
                return
        else:
            self._send(alerts, new_totals, homes, rejects)
            self.producer.flush()
            try:
                self.consumer.commit(offsets)
            except KafkaError as error:  # at least once: the batch comes again, outputs twice
                log.warning("offset commit failed (%s); the batch will be redelivered", error)
        # Committed: only now does the in-memory state move on.
        for user, total in new_totals.items():
            self.totals[user] = total
            self.users_of[homes[user]].add(user)
        self.stats.transactions += len(records)
        self.stats.alerts += alerts.height
        self.stats.dead_letters += len(rejects)
        self.stats.batches += 1

    def _send(self, alerts, new_totals, homes, rejects) -> None:
        s = self.settings
        scale = self.rules.scale
        send = self.producer.send
        for key, value, partition in encode_alerts(alerts, scale):
            # A user's alerts stay in one partition, the one its key hashes to (= its
            # source partition when the counts match: no pure-Python murmur2 per alert).
            send(s.transaction_alerts_topic, key=key, value=value,
                 partition=partition if self.alerts_copartitioned else None)  # fmt: skip
        changelog = s.transaction_totals_changelog_topic
        for key, value in encode_changelog(new_totals, scale):
            # co-partitioned: a restore of partition p reads changelog partition p
            send(changelog, key=key, value=value, partition=homes[key.decode()])
        for record, reason in rejects:
            send_to_dlq(self.producer, record, reason, s)

    def _commit_transaction(self, alerts, new_totals, homes, rejects, offsets) -> bool:
        try:
            self.producer.begin_transaction()
            self._send(alerts, new_totals, homes, rejects)
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
            return True
        except ProducerFencedError:
            # Our epoch is stale: the broker aborted our transaction after a pause longer
            # than the transaction timeout (a zombie), or a restart of this instance
            # started. A new producer re-fences; if another live process really has this
            # --instance, its consumer's FencedInstanceIdError stops one of the two.
            log.warning("producer fenced; recreating it and rewinding to the last commit")
            self.producer.close(timeout=0)
            self.producer = self._make_producer()
            self.stats.aborted += 1
            self._rewind()
            return False
        except KafkaError as error:
            # Typically a rebalance between poll and commit (stale generation): nothing of
            # this batch is visible. Abort, then go back to the last committed state.
            log.warning("batch aborted (%s: %s); rewinding to the last commit",
                        type(error).__name__, error)  # fmt: skip
            try:
                self.producer.abort_transaction()
            except Exception as abort_error:  # unusable producer (e.g. a broker outage)
                # "A broker restart: reconnect and go on": replace it like a fenced one.
                log.warning("abort failed (%s); recreating the producer",
                            type(abort_error).__name__)  # fmt: skip
                self.producer.close(timeout=0)
                self.producer = self._make_producer()
            self.stats.aborted += 1
            self._rewind()
            return False

    def _rewind(self) -> None:
        owned = {tp for tp in self.consumer.assignment() if tp.topic == self.topic}
        committed = {tp: self.consumer.committed(tp) for tp in owned}
        for tp, offset in committed.items():
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        partitions = {tp.partition for tp in owned}
        self._drop(set(self.owned) | partitions)
        self._restore(partitions)
        # Most aborts mean the group moved on (a zombie's stale generation): poll without
        # fetching until it has rejoined (a rebalance) or a heartbeat interval has passed,
        # rather than redoing the same batch only to be refused again.
        self.consumer.pause(*owned)
        self.paused_until = (
            time.monotonic() + self.settings.transaction_alerts_session_timeout_ms / 3000
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream_workers transaction-alerts",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument(
        "--instance",
        help="stable name of this worker (e.g. 0, 1): static group membership and a fixed "
        "transactional id, so a restart takes its partitions back at once; default: random",
    )
    parser.add_argument(
        "--at-least-once",
        action="store_true",
        help="no Kafka transactions, plain offset commits (benchmark comparison only: a "
        "crash can duplicate alerts and double-count totals)",
    )
    parser.add_argument("--batch-size", type=int, help="max records per poll batch")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per connection
    stop = StopSignal().install()
    worker = TransactionAlertsWorker(
        instance=args.instance, exactly_once=not args.at_least_once, batch_size=args.batch_size
    )
    log.info("instance %s consuming %s in group %s (%s)", worker.instance, worker.topic,
             worker.settings.transaction_alerts_group,
             "exactly once" if worker.exactly_once else "at least once")  # fmt: skip
    try:
        worker.run(stop)
    except FencedInstanceIdError as error:
        log.error("stopping: another process runs as instance %r (%s)", args.instance, error)
        return 1
    finally:
        log.info("stopped: %s", worker.stats)
        worker.close()
    return 0
