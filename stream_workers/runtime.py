"""The stream runtime every worker runs on: one poll loop, one commit path, one abort policy.

A worker (a `Processor`) supplies only what is its own: how it splits a poll into
transaction scopes, how a scope's records become a `Batch` (outputs, dead letters, derived
state) through the pure rules in `tasks/`, what to do once a batch committed or aborted,
and what to do when partitions are assigned or revoked. The runtime owns the rest:

- the loop: poll, apply rebalance events (queued by the listener, which kafka-python runs
  on its network thread, and applied here, on the worker's thread, right after `poll()`),
  process, commit, a progress line every `progress_interval_s`;
- the commit of a batch (`Transactor.commit`): outputs, dead letters and the consumer
  offsets in one Kafka transaction (or, at least once, sent then committed);
- the abort policy, the same for every worker: abort guarded; a fenced or failed producer
  is replaced, and so is one whose offset commit failed (kafka-python would send those
  offsets again with its next transaction); the consumer goes back to the first offsets of
  every scope not committed (for partitions still assigned); the worker drops the derived
  state of those scopes;
- a batch whose processing raises (a bug, not bad input) is retried `max_attempts` times,
  then re-run one record at a time, and the record that raises is dead-lettered with the
  exception text: the worker goes on;
- the lifecycle: `with Runtime(...) as runtime: runtime.run(stop)`; SIGTERM finishes the
  batch, commits and returns (a second one exits at once, see `StopSignal`);
- one `Stats` object, and the `Observer` hooks metrics and events hang on: started,
  rebalanced, every batch report, a periodic tick (lag refreshed), stopped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from tasks.kafka import StopSignal, send_to_dlq
from tasks.settings import Settings

Records = dict[TopicPartition, list[ConsumerRecord]]

log = logging.getLogger("stream_workers.runtime")


def static_member_id(group: str, instance: str | None) -> str | None:
    """The group.instance.id of a worker started with `--instance` (static membership)."""
    return f"{group}.{instance}" if instance else None


def progress_interval(settings: Settings) -> float:
    """A worker's tick (lag refresh, progress line, status file, observers' `tick`): every
    10 s, or as often as heartbeats are due (STREAM_HEARTBEAT_INTERVAL_S) when that is more."""
    return min(10.0, settings.stream_heartbeat_interval_s)


# --- a batch ------------------------------------------------------------------------------


@dataclass
class Batch:
    """What one transaction consumes and emits.

    `records` are the consumed records (their offsets commit with the batch); `outputs` are
    (topic, key, value, partition or None); `state` is whatever derived state the worker
    applies once the batch committed (nothing of it is applied before).
    """

    records: Records
    outputs: list[tuple[str, Any, Any, int | None]] = field(default_factory=list)
    dead_letters: list[tuple[ConsumerRecord, str]] = field(default_factory=list)
    state: Any = None
    seconds: float = 0.0  # from the start of its processing to the end of its commit

    def emit(self, topic: str, key: Any, value: Any, partition: int | None = None) -> None:
        self.outputs.append((topic, key, value, partition))

    def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        self.dead_letters.append((record, reason))

    @property
    def size(self) -> int:
        return sum(map(len, self.records.values()))

    def first_offsets(self) -> dict[TopicPartition, int]:
        return {tp: rs[0].offset for tp, rs in self.records.items() if rs}

    def next_offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1)
                for tp, rs in self.records.items() if rs}  # fmt: skip


# --- stats and observers ------------------------------------------------------------------


@dataclass(frozen=True)
class BatchReport:
    """One batch's outcome, handed to every observer."""

    worker: str
    outcome: str  # "committed" | "aborted"
    records: int
    outputs: int
    dead_letters: int
    seconds: float


@dataclass
class Stats:
    """The counters of one worker (what its progress lines, status file and metrics say)."""

    worker: str
    records: int = 0
    outputs: int = 0
    dead_letters: int = 0
    commits: int = 0
    aborts: int = 0
    rebalances: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # the worker's own (e.g. fired)
    lag: dict[TopicPartition, int] = field(default_factory=dict)

    def observe(self, report: BatchReport) -> None:
        if report.outcome == "committed":
            self.commits += 1
            self.records += report.records
            self.outputs += report.outputs
            self.dead_letters += report.dead_letters
        else:
            self.aborts += 1

    def summary(self) -> str:
        return (f"{self.records} records, {self.outputs} outputs, {self.dead_letters} dead "
                f"letters, {self.commits} commits, {self.aborts} aborts, "
                f"{self.rebalances} rebalances"
                + "".join(f", {n} {name}" for name, n in sorted(self.counts.items())))  # fmt: skip


class Observer:
    """Lifecycle hooks of a runtime, for metrics and events; override the ones needed.

    Each hook runs on the worker's thread between batches, so it must return at once
    (anything that can wait, e.g. a network call, goes to a thread behind a bounded
    buffer). An exception in a hook is logged and the worker goes on.
    """

    def started(self, runtime: Runtime) -> None:
        """`run` began: subscribed, state "joining"."""

    def rebalanced(self, runtime: Runtime) -> None:
        """A rebalance was applied: `runtime.assigned` is the new assignment, its state
        restored by the worker (state "running")."""

    def batch(self, runtime: Runtime, report: BatchReport) -> None:
        """A transaction committed or aborted (`runtime.stats` counts it already)."""

    def tick(self, runtime: Runtime) -> None:
        """Every `progress_interval_s` while running: `runtime.stats.lag` was just refreshed."""

    def stopped(self, runtime: Runtime) -> None:
        """`run` ended: state "stopped", or "failed" when it raised."""


# --- the transaction of a batch -----------------------------------------------------------


class Transactor:
    """A producer that writes each batch in one transaction, with the one abort policy.

    `make_producer` builds the producer (with its transactional id when exactly once);
    `init_transactions` runs here, also on every replacement, which fences the older
    producer of the id and aborts whatever it left open.
    """

    def __init__(
        self,
        make_producer: Callable[[], KafkaProducer],
        settings: Settings,
        *,
        exactly_once: bool = True,
    ) -> None:
        self._make_producer = make_producer
        self.settings = settings
        self.exactly_once = exactly_once
        self.producer: KafkaProducer | None = None
        # The producer's offset commit failed: kafka-python keeps those offsets pending across
        # the abort and sends them with the next transaction's, which would move a partition's
        # committed offset back behind what committed since (its state counted twice then).
        self._offsets_refused = False
        # Test seam: called with the batch right before its commit.
        self.before_commit: Callable[[Batch], None] | None = None
        self.ensure_producer()

    def ensure_producer(self) -> KafkaProducer:
        if self.producer is None:
            producer = self._make_producer()
            if self.exactly_once:
                try:
                    producer.init_transactions()
                except BaseException:
                    _close_quietly(producer)
                    raise
            self.producer = producer
        return self.producer

    def commit(self, consumer: KafkaConsumer, batch: Batch) -> None:
        """Send the batch's outputs and dead letters and commit them with its offsets.
        Raises KafkaError (the transaction aborted) for `abort` to handle."""
        producer = self.ensure_producer()
        if self.exactly_once:
            producer.begin_transaction()
        send = producer.send
        sent = [send(topic, key=key, value=value, partition=partition)
                for topic, key, value, partition in batch.outputs]  # fmt: skip
        sent += [send_to_dlq(producer, record, reason, self.settings)
                 for record, reason in batch.dead_letters]  # fmt: skip
        if self.before_commit is not None:
            self.before_commit(batch)
        offsets = batch.next_offsets()
        if self.exactly_once:
            if offsets:  # a batch may consume nothing (a repair written during a restore)
                try:
                    producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
                except BaseException:
                    self._offsets_refused = True
                    raise
            producer.commit_transaction()
            return
        # At least once: offsets only after every output is acknowledged (flush does not
        # raise for failed sends); a failure reads the batch again (outputs twice).
        producer.flush()
        for future in sent:
            if future.failed():
                raise future.exception
        if offsets:
            consumer.commit(offsets)

    def abort(self, error: BaseException) -> None:
        """Abort the open transaction; replace the producer when it is fenced or unusable,
        or when its offset commit failed (the offsets would go with its next transaction)."""
        producer = self.producer
        if producer is None:
            return
        fenced = isinstance(error, ProducerFencedError)
        replace = fenced or not self.exactly_once or self._offsets_refused
        self._offsets_refused = False
        if self.exactly_once and not fenced:
            try:
                producer.abort_transaction()
            except Exception as abort_error:  # fenced meanwhile, or the broker is gone
                log.warning("abort failed (%s: %s); replacing the producer",
                            type(abort_error).__name__, abort_error)  # fmt: skip
                replace = True
        if replace:
            self.producer = None  # a new one (init_transactions) before the next batch
            _close_quietly(producer)

    def close(self, timeout_s: float = 5) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout_s)
            except Exception as error:  # e.g. a flush that times out: do not stop the worker
                log.warning("closing a producer: %s: %s", type(error).__name__, error)


def _close_quietly(producer: KafkaProducer) -> None:
    """Close a fenced or failed producer without waiting for it.

    kafka-python's close() flushes first, and a flush raises (KafkaTimeoutError) while the
    sender thread has not yet failed the batches of a fenced transaction: unguarded, that
    killed a worker on its way to replacing the producer.
    """
    for timeout_s in (0, 5):  # the second try lets the sender fail those batches first
        try:
            producer.close(timeout=timeout_s)
            return
        except Exception as error:
            log.warning("closing the old producer: %s: %s", type(error).__name__, error)


# --- what a worker supplies ---------------------------------------------------------------


class Processor(Protocol):
    """The worker-specific part of a stream worker."""

    name: str

    def scopes(self, polled: Records) -> list[tuple[Transactor, Records]]:
        """Split a poll into transaction scopes, each with the transactor that commits it."""
        ...

    def process(self, records: Records) -> Batch:
        """Parse, apply the pure rules, and say what to emit; derived state goes into
        `Batch.state`, or is dropped by `on_aborted` when the batch does not commit."""
        ...

    def on_committed(self, batch: Batch) -> None: ...

    def on_aborted(self, records: Records) -> None:
        """Drop the derived state of records whose batch did not commit."""
        ...

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_revoked(self, partitions: set[TopicPartition]) -> None: ...


class _QueuedRebalances(ConsumerRebalanceListener):
    """Queues rebalance events: listeners run on kafka-python's network thread, which must
    not block (heartbeats); the runtime applies them on the worker's thread after poll()."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer
        self.events: queue.SimpleQueue[tuple[str, set[TopicPartition]]] = queue.SimpleQueue()

    def on_partitions_revoked(self, revoked) -> None:
        self.events.put(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        # The whole assignment at this moment (an incremental rebalance passes only the
        # added partitions), so the runtime can tell the partitions kept throughout.
        self.events.put(("assigned", set(self.consumer.assignment()) | set(assigned)))

    def on_partitions_lost(self, lost) -> None:
        self.events.put(("lost", set(lost)))


# --- the runtime --------------------------------------------------------------------------


class Runtime:
    """The loop of one worker over one consumer group subscription."""

    def __init__(
        self,
        processor: Processor,
        consumer: KafkaConsumer,
        topics: Iterable[str],
        *,
        max_records: int,
        poll_timeout_ms: int = 500,
        max_attempts: int = 3,
        abort_backoff_s: float = 0.2,
        progress_interval_s: float = 10.0,
        closers: Iterable[Callable[[], Any]] = (),
        instance: str | None = None,
        status_dir: Path | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.processor = processor
        self.consumer = consumer
        self.topics = list(topics)
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.max_attempts = max_attempts
        self.abort_backoff_s = abort_backoff_s
        self.progress_interval_s = progress_interval_s
        self.stats = Stats(processor.name)
        self.assigned: set[TopicPartition] = set()  # as applied to the processor
        self._closers = list(closers)
        self._rebalances = _QueuedRebalances(consumer)
        # Per partition: (first offset of a batch whose processing raised, attempts so far).
        self._failures: dict[TopicPartition, tuple[int, int]] = {}
        self.stop: StopSignal = StopSignal()
        self._subscribed = False
        self.instance = instance
        # "joining" until the first assignment is applied (its state restored), "running",
        # then "stopped" (or "failed" when `run` raised): what readiness checks and `make
        # status` read from the status file.
        self.state = "joining"
        self.status_path = (
            status_dir / f"{processor.name}.{instance or os.getpid()}.json" if status_dir else None
        )
        self.observers: list[Observer] = list(observers)
        self._observer_failures: set[tuple[int, str]] = set()

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def subscribe(self) -> None:
        if not self._subscribed:
            self.consumer.subscribe(self.topics, listener=self._rebalances)
            # Metadata before the first join: a leader that assigns before it has the topics'
            # metadata rejoins right after (a second rebalance, and a second state rebuild,
            # on every start).
            self.consumer.topics()
            self._subscribed = True

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception as error:  # closing must not hide the reason we stop
                log.warning("%s: close failed: %s", self.processor.name, error)
        self.consumer.close(autocommit=False)

    def run(self, stop: StopSignal | None = None, *, before_poll=None, after_poll=None) -> None:
        """Poll, process and commit until `stop` is set; the batch in hand always finishes.
        Every `progress_interval_s`: the lag refreshed, a progress line, the status file and
        the observers' `tick`."""
        self.stop = stop if stop is not None else StopSignal()
        self.subscribe()
        self.write_status()
        self._notify("started")
        stopped = False
        try:
            last_progress, records_then = time.monotonic(), 0
            while not self.stop:
                if before_poll is not None:
                    before_poll()
                self.step()
                if after_poll is not None:
                    after_poll()
                if time.monotonic() - last_progress >= self.progress_interval_s:
                    elapsed = time.monotonic() - last_progress
                    rate = (self.stats.records - records_then) / max(elapsed, 1e-9)
                    self._update_lag()
                    log.info("%s: %s; %.0f records/s; lag %s", self.processor.name,
                             self.stats.summary(), rate, self._lag_text())  # fmt: skip
                    self.write_status()
                    self._notify("tick")
                    last_progress, records_then = time.monotonic(), self.stats.records
            stopped = True
        finally:
            self.state = "stopped" if stopped else "failed"
            self.write_status()
            self._notify("stopped")
            log.info("%s %s: %s", self.processor.name, self.state, self.stats.summary())

    def step(self, max_records: int | None = None) -> int:
        """One poll and its batches; returns the records processed (committed or not)."""
        _restore_parked_records(self.consumer)
        polled = self.consumer.poll(
            timeout_ms=self.poll_timeout_ms, max_records=max_records or self.max_records
        )
        polled = self.apply_rebalances(polled)
        if not polled:
            return 0
        self.handle(polled)
        return sum(map(len, polled.values()))

    # --- rebalances ---------------------------------------------------------------------

    def apply_rebalances(self, polled: Records) -> Records:
        """Apply queued rebalance events as one net change against the consumer's assignment
        now: partitions kept across a rebalance keep their state; lost ones (this member was
        removed from the group, others may have processed them) are revoked and, if given
        back, assigned afresh. The records of a poll that brought events are read again."""
        events = []
        while True:
            try:
                events.append(self._rebalances.events.get_nowait())
            except queue.Empty:
                break
        if not events:
            return polled
        self._rewind([polled])
        now = set(self.consumer.assignment())
        before = self.assigned
        # Kept: ours before, now and in every assignment in between (one poll can see two
        # rebalances: a partition handed to another member and back was processed there).
        kept = before & now
        for kind, tps in events:
            kept = kept & tps if kind == "assigned" else kept - tps if kind == "lost" else kept
        gone = before - kept
        fresh = now - kept
        self.assigned = now
        for tp in gone:
            self._failures.pop(tp, None)
        if gone:
            log.info("%s: revoked %s", self.processor.name, _names(gone))
            self.processor.on_revoked(gone)
        if any(kind == "assigned" for kind, _ in events):
            self.stats.rebalances += 1
            log.info("%s: assigned %s (new: %s)", self.processor.name, _names(now),
                     _names(fresh))  # fmt: skip
            if fresh:
                self.processor.on_assigned(fresh)
        self.state = "running"
        self.write_status()
        self._notify("rebalanced")
        return {}

    # --- batches ------------------------------------------------------------------------

    def handle(self, polled: Records) -> None:
        """Process and commit each transaction scope of a poll, in order; after an abort the
        scopes not committed are read again."""
        scopes = self.processor.scopes(polled)
        for i, (transactor, records) in enumerate(scopes):
            if not self._process_scope(transactor, records):
                self._rewind([r for _, r in scopes[i + 1 :]])
                return

    def _process_scope(self, transactor: Transactor, records: Records) -> bool:
        started = time.monotonic()
        try:
            batch = self.processor.process(records)
            committed = self._commit(transactor, batch, started)
        except Exception as error:  # the worker's own code failed: a bug, not bad input
            return self._failed(transactor, records, error)
        if committed:
            # Outside the handler above: a batch that committed is never read again.
            self._committed(batch)
        return committed

    def _failed(self, transactor: Transactor, records: Records, error: Exception) -> bool:
        """A batch whose processing raised: read again up to `max_attempts` times (counted
        per partition and first offset), then re-run one record at a time."""
        firsts = [(tp, rs[0].offset) for tp, rs in records.items() if rs]
        attempts = 0
        for tp, offset in firsts:
            seen = self._failures.get(tp)
            count = seen[1] + 1 if seen is not None and seen[0] == offset else 1
            self._failures[tp] = (offset, count)
            attempts = max(attempts, count)
        log.error("%s: processing a batch of %d records failed (attempt %d of %d)",
                  self.processor.name, sum(map(len, records.values())), attempts,
                  self.max_attempts, exc_info=error)  # fmt: skip
        self.processor.on_aborted(records)
        self._report(BatchReport(self.processor.name, "aborted", 0, 0, 0, 0.0))
        if attempts < self.max_attempts:
            self._rewind([records])
            self._backoff()
            return False
        return self._one_by_one(transactor, records, error)

    def _one_by_one(self, transactor: Transactor, records: Records, error: Exception) -> bool:
        """A batch that kept failing: each record alone; the one that raises is dead-lettered
        with the exception text."""
        log.warning("%s: re-running the batch record by record to isolate the failure (%s)",
                    self.processor.name, error)  # fmt: skip
        ordered = [(tp, r) for tp, rs in records.items() for r in rs]
        for n, (tp, record) in enumerate(ordered):
            single = {tp: [record]}
            started = time.monotonic()
            try:
                batch = self.processor.process(single)
                committed = self._commit(transactor, batch, started)
            except Exception as failure:
                self.processor.on_aborted(single)
                reason = f"processing failed: {type(failure).__name__}: {failure}"
                log.error("%s: %s[%d]@%d to the DLQ: %s", self.processor.name, record.topic,
                          record.partition, record.offset, reason)  # fmt: skip
                batch = Batch(single, dead_letters=[(record, reason)])
                committed = self._commit(transactor, batch, started)
            if committed:
                self._committed(batch)
            if not committed or self.stop:
                rest: Records = {}
                for rest_tp, rest_record in ordered[n + (1 if committed else 0) :]:
                    rest.setdefault(rest_tp, []).append(rest_record)
                self._rewind([rest])
                return False
        # The worker's abort hook may have moved the positions back: on past what committed.
        assigned = self.consumer.assignment()
        for tp, rs in records.items():
            if tp in assigned:
                self.consumer.seek(tp, rs[-1].offset + 1)
        return True

    def _commit(self, transactor: Transactor, batch: Batch, started: float) -> bool:
        """Commit `batch` (processed since `started`); False if Kafka aborted it (handled
        here: the batch is read again). Any other exception (an output the worker cannot
        encode) aborts the transaction and propagates."""
        try:
            transactor.commit(self.consumer, batch)
        except KafkaError as error:
            # A rebalance between poll and commit (stale generation), a fencing producer
            # (a restart of this instance, a batch flow taking the id) or the broker:
            # nothing of this batch is visible.
            log.warning("%s: batch of %d records aborted (%s: %s); reading it again",
                        self.processor.name, batch.size, type(error).__name__, error)  # fmt: skip
            transactor.abort(error)
            self._rewind([batch.records])
            self.processor.on_aborted(batch.records)
            self._report(BatchReport(self.processor.name, "aborted", batch.size,
                                     len(batch.outputs), len(batch.dead_letters),
                                     time.monotonic() - started))  # fmt: skip
            self._backoff()
            return False
        except Exception as error:
            transactor.abort(error)
            raise
        batch.seconds = time.monotonic() - started
        return True

    def _committed(self, batch: Batch) -> None:
        for tp in batch.records:
            self._failures.pop(tp, None)
        self.processor.on_committed(batch)
        self._report(BatchReport(self.processor.name, "committed", batch.size,
                                 len(batch.outputs), len(batch.dead_letters),
                                 batch.seconds))  # fmt: skip

    def _report(self, report: BatchReport) -> None:
        self.stats.observe(report)
        self._notify("batch", report)

    def _notify(self, hook: str, *args: Any) -> None:
        """Call `hook` of every observer; a failing observer never stops the worker (its
        first failure per hook is logged with the traceback, later ones in one line)."""
        for observer in self.observers:
            try:
                getattr(observer, hook)(self, *args)
            except Exception as error:
                key = (id(observer), hook)
                first = key not in self._observer_failures
                self._observer_failures.add(key)
                log.warning("%s: observer %s.%s failed: %s: %s", self.processor.name,
                            type(observer).__name__, hook, type(error).__name__, error,
                            exc_info=error if first else None)  # fmt: skip

    def _rewind(self, scopes: Iterable[Records]) -> None:
        """Back to the first offset of each scope, for partitions still assigned."""
        assigned = self.consumer.assignment()
        for records in scopes:
            for tp, rs in records.items():
                if rs and tp in assigned:
                    self.consumer.seek(tp, rs[0].offset)

    def _backoff(self) -> None:
        # Most aborts mean the group is moving on: give it a moment rather than redoing the
        # batch only to be refused again. Polling (which rejoins) resumes right after.
        self.stop.wait(self.abort_backoff_s)

    # --- holding partitions (priorities) ------------------------------------------------

    def hold(self) -> None:
        """Fetch nothing of the assigned partitions until `release()` (membership stays)."""
        unpaused = self.consumer.assignment() - self.consumer.paused()
        if unpaused:
            self.consumer.pause(*unpaused)

    def release(self) -> None:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)
            _restore_parked_records(self.consumer)

    def retry(self, action: Callable[[], Any], what: str) -> None:
        """Run `action` until it does not raise a KafkaError (a broker restart, a timeout),
        waiting between tries; gives up only when stopping."""
        while True:
            try:
                action()
                return
            except KafkaError as error:
                log.warning("%s: %s failed (%s: %s); retrying", self.processor.name, what,
                            type(error).__name__, error)  # fmt: skip
                if self.stop.wait(1.0):
                    return

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What this worker process is doing, from its own state (JSON-able)."""
        stats = self.stats
        return {
            "worker": self.processor.name,
            "instance": self.instance,
            "pid": os.getpid(),
            "group": self.consumer.config.get("group_id"),
            "state": self.state,
            # Applied to the worker: on_assigned (e.g. a restore) has returned for these.
            "assigned": _names(self.assigned),
            "records": stats.records,
            "outputs": stats.outputs,
            "dead_letters": stats.dead_letters,
            "commits": stats.commits,
            "aborts": stats.aborts,
            "rebalances": stats.rebalances,
            "counts": dict(stats.counts),
            "lag": {f"{tp.topic}[{tp.partition}]": n for tp, n in sorted(stats.lag.items())},
            "updated_at": datetime.now(UTC).isoformat(),
        }

    def write_status(self) -> None:
        """Replace the status file (atomically: readers never see half a file)."""
        if self.status_path is None:
            return
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.status_path.with_suffix(".tmp")
            partial.write_text(json.dumps(self.status()))
            os.replace(partial, self.status_path)
        except OSError as error:  # a status file must never stop a worker
            log.warning("%s: cannot write %s: %s", self.processor.name, self.status_path, error)

    # --- lag ----------------------------------------------------------------------------

    def _update_lag(self) -> None:
        lag = {}
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                try:
                    lag[tp] = max(0, highwater - self.consumer.position(tp, timeout_ms=0))
                except (KafkaError, TypeError):
                    continue
        self.stats.lag = lag

    def _lag_text(self) -> str:
        return ", ".join(f"{tp.topic}[{tp.partition}]={n}"
                         for tp, n in sorted(self.stats.lag.items())) or "-"  # fmt: skip


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


def _restore_parked_records(consumer: KafkaConsumer) -> None:
    """Work around a kafka-python 3.0 fetcher bug that stalls a resumed partition for good.

    Records already parsed for a partition that gets paused are parked and handed back on
    resume only if the fetcher's in-line slot `is None`; but a drained slot keeps its empty
    (falsy) PartitionRecords, so the parked records never come back, and a partition with
    parked records is never fetched again (not even after a revoke and re-assignment).
    Clearing a drained slot restores the intended `not slot` check. A no-op when nothing is
    parked or the internals differ; `tests/unit/test_runtime.py` fails when they change.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if not getattr(fetcher, "_paused_partition_records", None):
        return
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot:
        fetcher._next_partition_records = None
