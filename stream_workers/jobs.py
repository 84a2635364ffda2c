"""`python -m stream_workers jobs --processor payments`: the job processor daemon.

Consumes `jobs.<processor>.realtime` and `jobs.<processor>.normal` (SLOW jobs are drained by
the `slow_job_batches` flow) in two lanes. Each lane is a consumer (its own group,
`<JOBS_TOPIC_PREFIX>.<processor>.processor.<priority>`) plus a transactional producer, and
runs in its own process, so the REALTIME lane never waits for the interpreter behind NORMAL
work (the daemon's main process runs NORMAL and supervises the REALTIME child):

- the REALTIME lane takes REALTIME jobs as soon as they arrive;
- the NORMAL lane keeps its partitions paused while any REALTIME job is pending (the
  REALTIME lane's end offsets against its positions, or jobs in its hands, shared through
  an event) and otherwise works in slices of about `JOBS_NORMAL_SLICE_MS`, stepping aside
  inside a slice while the REALTIME lane is busy.

Each slice is one Kafka transaction: the results on `job-results.<processor>`, the dead
letters and the consumer offsets commit together. Job ids that already have a result
(rebuilt from the results topic on start, read_committed) are skipped, and the handlers'
upstream calls are idempotent by job id: a redelivered job never gives a second result or
a second upstream call.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata

from tasks.job_queues import result_ids_since
from tasks.jobs import (
    BadJobMessage,
    Job,
    JobStatus,
    Priority,
    UnknownProcessorError,
    check_processor,
    parse_job,
    process_jobs,
    processor_registry,
)
from tasks.kafka import (
    StopSignal,
    encode_json,
    ensure_topics,
    job_topics,
    make_consumer,
    make_producer,
    send_to_dlq,
)
from tasks.settings import Settings, get_settings

log = logging.getLogger("stream_workers.jobs")

FAULTS = ("kill-before-commit",)  # test hook: SIGKILL after the handlers ran, before commit
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def _restore_resumed_records(consumer) -> None:
    """Work around a kafka-python 3.0 bug that stalls resumed partitions for good.

    Records already parsed for a partition that gets paused are parked, and handed back on
    resume only if the fetcher's in-line slot `is None`; but a drained slot keeps its empty
    (falsy) PartitionRecords, so the parked records never come back and the partition is
    never fetched again (NORMAL would stop after its first pause). Clearing a drained slot
    restores the intended `not slot` check. A no-op if the internals differ.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot and hasattr(fetcher, "_paused_partition_records"):
        fetcher._next_partition_records = None


class _Listener(ConsumerRebalanceListener):
    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def on_partitions_assigned(self, assigned):
        if self.lane.priority is Priority.NORMAL and assigned:
            # Start paused: nothing NORMAL is fetched before the first REALTIME check.
            self.lane.consumer.pause(*assigned)
        self.lane.joined.set()
        log.info("%s lane assigned %s", self.lane.priority.value,
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))  # fmt: skip

    def on_partitions_revoked(self, revoked):
        # Nothing to flush: every slice commits before the next poll. Until the REALTIME
        # lane has its new assignment and has checked it, NORMAL starts no slice.
        self.lane.joined.clear()
        if self.lane.priority is Priority.REALTIME:
            self.lane.realtime_idle.clear()
        log.info("%s lane: %d partitions revoked", self.lane.priority.value, len(revoked))


class Lane:
    """One priority's consumer and transactional producer, and its processing loop.

    `realtime_idle` is set by the REALTIME lane while it has nothing pending; the NORMAL
    lane only works while it is set (a multiprocessing event: the lanes are processes).
    """

    def __init__(
        self,
        processor: str,
        priority: Priority,
        realtime_idle,
        settings: Settings | None = None,
        *,
        instance: str = "0",
        fault: str | None = None,
    ) -> None:
        s = self.settings = settings or get_settings()
        self.processor, self.priority, self.fault = processor, priority, fault
        self.realtime_idle = realtime_idle
        self.registry = processor_registry(processor, s)
        self.results_topic = s.job_results_topic(processor)
        self.topic = s.jobs_topic(processor, priority.value)
        self.joined = threading.Event()
        self.stats = dict.fromkeys(("ok", "error", "dlq", "duplicate", "aborted"), 0)
        group = f"{s.jobs_processor_group(processor)}.{priority.value.lower()}"
        member = f"{group}.{instance}"
        # A stable transactional id: on restart, init_transactions aborts whatever a
        # killed predecessor left open, so read_committed readers are not held back.
        self.producer = make_producer(
            s,
            transactional_id=member,
            transaction_timeout_ms=s.jobs_txn_timeout_ms,
            linger_ms=0,
            retry_backoff_ms=10,  # the default 100 ms stalls back-to-back transactions
            # Results go out as pydantic's own JSON bytes (several times faster than
            # model_dump + json.dumps); dead letters are dicts.
            value_serializer=lambda v: v if isinstance(v, bytes) else encode_json(v),
        )
        self.producer.init_transactions()
        # After init_transactions, a dead predecessor's open transaction is aborted, so
        # the results topic reads to its end.
        since = datetime.now(UTC) - timedelta(hours=s.jobs_results_lookback_h)
        self.known: set[str] = result_ids_since(processor, since, s)
        log.info("%s lane: %d job ids already have results", priority.value, len(self.known))
        self.consumer = make_consumer(
            settings=s,
            group_id=group,
            group_instance_id=member,  # static membership: a restart takes over at once
            session_timeout_ms=s.jobs_session_timeout_ms,
            fetch_max_wait_ms=50,
            max_poll_records=s.jobs_processor_max_batch,
        )
        # Metadata first: a group joined before the topic's metadata is known gets an empty
        # assignment, which would look like "no REALTIME pending" until the next rebalance.
        self.consumer.partitions_for_topic(self.topic)
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        self._result_partitions = len(self.producer.partitions_for(self.results_topic))
        self.slice_s = s.jobs_normal_slice_ms / 1000
        self._per_job_s = 0.0005  # running estimate, sizes NORMAL polls to fit a slice

    def run(self, running) -> None:
        """Steps until `running()` turns false; each step finishes and commits its slice."""
        step = self.realtime_step if self.priority is Priority.REALTIME else self.normal_step
        while running():
            if not step() and self.priority is Priority.NORMAL:
                self.realtime_idle.wait(0.05)
        log.info("%s lane stopped: %s", self.priority.value, self.stats)

    # --- the steps ------------------------------------------------------------------------

    def realtime_step(self) -> int:
        polled = self.consumer.poll(timeout_ms=100)
        if polled:
            self.realtime_idle.clear()  # REALTIME jobs in hand: NORMAL steps aside
            self._process([r for tp in sorted(polled) for r in polled[tp]])
        if self.joined.is_set() and not self._realtime_pending():
            self.realtime_idle.set()
        else:
            self.realtime_idle.clear()
        return sum(map(len, polled.values()))

    def _realtime_pending(self) -> bool:
        """End offsets of the REALTIME partitions against this lane's positions."""
        partitions = list(self.consumer.assignment())
        if not partitions:
            return False
        try:
            ends = self.consumer.end_offsets(partitions)
        except KafkaError as error:  # e.g. a slow broker: err on the side of REALTIME
            log.warning("REALTIME lag check failed (%s); NORMAL waits", error)
            return True
        return any(ends[tp] > self.consumer.position(tp) for tp in partitions)

    def normal_step(self) -> int:
        """One NORMAL slice if no REALTIME job is pending; returns the records handled."""
        partitions = list(self.consumer.assignment())
        if not self.realtime_idle.is_set():
            self.consumer.pause(*partitions)
            self.consumer.poll(timeout_ms=0)  # keeps the membership alive while paused
            return 0
        self.consumer.resume(*partitions)
        _restore_resumed_records(self.consumer)
        max_records = max(1, min(self.settings.jobs_processor_max_batch,
                                 int(self.slice_s / self._per_job_s)))  # fmt: skip
        polled = self.consumer.poll(timeout_ms=50, max_records=max_records)
        records = [r for tp in sorted(polled) for r in polled[tp]]
        if records:
            handling_s = self._process(records)
            if handling_s is not None:  # commit time left out: it does not grow with jobs
                per_job = max(handling_s / len(records), 1e-6)
                self._per_job_s = 0.5 * self._per_job_s + 0.5 * per_job
        return len(records)

    def _partition(self, key: str) -> int:
        """REALTIME results go to partition 0 of the results topic, NORMAL ones to the others.

        A read_committed reader sees a partition only up to its oldest open transaction: on
        shared partitions a REALTIME result would wait for the NORMAL lane's (longer)
        transaction to commit. Keys stay job ids; with one partition, both share it.
        """
        if self.priority is Priority.REALTIME or self._result_partitions < 2:
            return 0
        return 1 + murmur2(key.encode()) % (self._result_partitions - 1)

    def _yield_to_realtime(self) -> None:
        """Inside a NORMAL slice: while REALTIME jobs are in hand, step aside (a few ms at a
        time) so the REALTIME lane has the CPU."""
        if self.priority is Priority.NORMAL and not self.realtime_idle.is_set():
            self.realtime_idle.wait(0.005)

    # --- one transaction ------------------------------------------------------------------

    def _process(self, records: Sequence[ConsumerRecord]) -> float | None:
        """Handle records in one transaction with their offsets. Returns the seconds spent
        before the commit, or None if the transaction was aborted."""
        started = time.monotonic()
        first: dict[TopicPartition, int] = {}
        done: dict[TopicPartition, int] = {}
        jobs: list[Job] = []
        self.producer.begin_transaction()
        try:
            for i, record in enumerate(records):
                if i % 64 == 63:
                    self._yield_to_realtime()
                tp = TopicPartition(record.topic, record.partition)
                first.setdefault(tp, record.offset)
                done[tp] = record.offset + 1
                job = self._accept(record)
                if job is not None:
                    jobs.append(job)
            for result in process_jobs(jobs, self.registry):
                key = str(result.job_id)
                value = result.model_dump_json().encode()
                self.producer.send(
                    self.results_topic, key=key, value=value, partition=self._partition(key)
                )
                self.stats["ok" if result.status is JobStatus.PROCESSED_OK else "error"] += 1
            handling_s = time.monotonic() - started
            if self.fault == "kill-before-commit" and jobs:
                self.producer.flush()  # the results reach the broker, uncommitted
                _crash()
            self.producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in done.items()},
                self.consumer.group_metadata(),
            )
            self.producer.commit_transaction()
        except KafkaError as error:
            # A rebalance fenced this slice (or the broker failed it): nothing of it is
            # visible; forget its ids and re-read it if the partitions are still ours.
            log.warning("%s slice aborted (%s); it will be re-read", self.priority.value, error)
            self.known.difference_update(str(job.id) for job in jobs)
            self.stats["aborted"] += 1
            self.producer.abort_transaction()
            assigned = self.consumer.assignment()
            for tp, offset in first.items():
                if tp in assigned:
                    self.consumer.seek(tp, offset)
            return None
        return handling_s

    def _accept(self, record: ConsumerRecord) -> Job | None:
        """The record's job, unless it is malformed (-> DLQ) or already has a result."""
        try:
            job = parse_job(record.value, self.processor, self.priority, record.key)
        except BadJobMessage as error:
            send_to_dlq(self.producer, record, str(error), self.settings)
            self.stats["dlq"] += 1
            return None
        if str(job.id) in self.known:
            self.stats["duplicate"] += 1
            log.info("job %s already has a result: skipped", job.id)
            return None
        self.known.add(str(job.id))
        return job

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()


def _crash() -> None:
    """The fault hook: the whole daemon dies at once, as if its machine failed."""
    if multiprocessing.parent_process() is not None:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _realtime_process(processor: str, instance: str, fault, realtime_idle, stop_all) -> None:
    """The REALTIME lane, in a child process of the daemon."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stop = StopSignal().install()
    parent = os.getppid()
    lane = Lane(processor, Priority.REALTIME, realtime_idle, instance=instance, fault=fault)
    try:
        # Stops with the daemon: its stop event, a signal of its own, or the parent gone.
        lane.run(lambda: not (stop or stop_all.is_set() or os.getppid() != parent))
    finally:
        realtime_idle.clear()
        lane.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream_workers jobs",
        description="Process REALTIME then NORMAL jobs of one processor (SLOW: the flow).",
    )
    parser.add_argument("--processor", required=True, help="e.g. payments")
    parser.add_argument(
        "--instance",
        default="0",
        help="this daemon's stable id among the processor's daemons (default 0); "
        "restarting with the same id takes over its transactions and partitions at once",
    )
    parser.add_argument("--fault", choices=FAULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        check_processor(args.processor)
    except UnknownProcessorError as error:
        print(error, file=sys.stderr)
        return 2
    settings = get_settings()
    ensure_topics(job_topics(args.processor, settings), settings)
    stop = StopSignal().install()
    # spawn: a clean interpreter for the child (no forked Kafka threads or sockets).
    context = multiprocessing.get_context("spawn")
    realtime_idle, stop_all = context.Event(), context.Event()
    child = context.Process(
        target=_realtime_process,
        args=(args.processor, args.instance, args.fault, realtime_idle, stop_all),
        name="realtime-lane",
    )
    child.start()
    # The NORMAL lane yields the CPU to the REALTIME lane (and the broker) when they need it.
    os.nice(settings.jobs_normal_niceness)
    normal = Lane(args.processor, Priority.NORMAL, realtime_idle, settings,
                  instance=args.instance, fault=args.fault)  # fmt: skip
    log.info("processing %s jobs: REALTIME (pid %s) first, then NORMAL", args.processor, child.pid)
    try:
        normal.run(lambda: not stop and child.is_alive())
    finally:
        stop_all.set()
        normal.close()
        child.join(60)
    if child.exitcode != 0:
        log.error("the REALTIME lane exited with %s", child.exitcode)
        return 1
    return 0
