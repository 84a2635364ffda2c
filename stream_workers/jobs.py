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

Metrics (`--metrics-port`): one endpoint, served by the main process; the REALTIME lane
sends its batch reports and lag to it over a bounded queue (stream_workers/metrics.py), and
every series has a `lane` label. Prefect events: each lane is a worker of its own
(`jobs-<processor>-realtime`, `jobs-<processor>-normal`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from kafka import TopicPartition
from kafka.errors import KafkaError

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
from tasks.commands import env_name, setup_logging, worker_parser
from tasks.job_queues import result_ids_since
from tasks.jobs import (
    PROCESSORS,
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
)
from tasks.settings import Settings, get_settings
from tasks.wire import key_partition

log = logging.getLogger("stream_workers.jobs")

FAULTS = ("kill-before-commit",)  # test hook: SIGKILL after the handlers ran, before commit
LANES = ("realtime", "normal")  # the `lane` label of the daemon's metrics
METRICS_QUEUE_SIZE = 1000  # REALTIME lane -> main process; more waiting are dropped


def lane_group(settings: Settings, processor: str, priority: Priority) -> str:
    """The consumer group of a lane (also the prefix of its static member and transactional
    ids)."""
    return f"{settings.jobs_processor_group(processor)}.{priority.value.lower()}"


class Lane:
    """One priority's consumer and transactional producer, and its processing hooks.

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
        observers: Iterable[Observer] = (),
    ) -> None:
        s = self.settings = settings or get_settings()
        self.processor, self.priority = processor, priority
        self.name = f"jobs-{processor}-{priority.value.lower()}"
        self.realtime_idle = realtime_idle
        self.registry = processor_registry(processor, s)
        self.results_topic = s.job_results_topic(processor)
        self.topic = s.jobs_topic(processor, priority.value)
        self.joined = False
        group = lane_group(s, processor, priority)
        member = static_member_id(group, instance)
        # A stable transactional id: on restart, init_transactions aborts whatever a
        # killed predecessor left open, so read_committed readers are not held back.
        self.transactor = Transactor(lambda: make_producer(
            s,
            transactional_id=member,
            transaction_timeout_ms=s.jobs_txn_timeout_ms,
            linger_ms=0,
            # Back-to-back transactions meet CONCURRENT_TRANSACTIONS while the previous
            # markers are written: retry at once, not after the default 100 ms.
            retry_backoff_ms=1,
            # Results go out as pydantic's own JSON bytes (several times faster than
            # model_dump + json.dumps); dead letters are dicts.
            value_serializer=lambda v: v if isinstance(v, bytes) else encode_json(v),
        ), s)  # fmt: skip
        if fault == "kill-before-commit":
            self.transactor.before_commit = self._crash_if_jobs
        # After init_transactions, a dead predecessor's open transaction is aborted, so
        # the results topic reads to its end.
        since = datetime.now(UTC) - timedelta(hours=s.jobs_results_lookback_h)
        self.known: set[str] = result_ids_since(processor, since, s)
        self.in_flight: list[str] = []  # ids of the batch being processed, not yet committed
        log.info("%s lane: %d job ids already have results", priority.value, len(self.known))
        consumer = make_consumer(
            settings=s,
            group_id=group,
            group_instance_id=member,  # static membership: a restart takes over at once
            session_timeout_ms=s.jobs_session_timeout_ms,
            fetch_max_wait_ms=50,
            max_poll_records=s.jobs_processor_max_batch,
        )
        self._result_partitions = len(
            self.transactor.ensure_producer().partitions_for(self.results_topic)
        )
        realtime = priority is Priority.REALTIME
        self.runtime = Runtime(
            self, consumer, [self.topic], max_records=s.jobs_processor_max_batch,
            poll_timeout_ms=100 if realtime else 50, closers=[self.transactor.close],
            instance=instance, status_dir=s.stream_status_dir, observers=observers,
            progress_interval_s=progress_interval(s),
        )  # fmt: skip
        self.stats = self.runtime.stats
        self.slice_s = s.jobs_normal_slice_ms / 1000
        self._per_job_s = 0.0005  # running estimate, sizes NORMAL polls to fit a slice

    def run(self, stop) -> None:
        """Polls and commits slices until `stop`; each finishes and commits its slice."""
        if self.priority is Priority.REALTIME:
            self.runtime.run(stop, after_poll=self._publish_realtime_idle)
        else:
            self.runtime.run(stop, before_poll=self._hold_while_realtime)

    def close(self) -> None:
        self.runtime.close()

    # --- priorities -----------------------------------------------------------------------

    def _publish_realtime_idle(self) -> None:
        if self.joined and not self._realtime_pending():
            self.realtime_idle.set()
        else:
            self.realtime_idle.clear()

    def _realtime_pending(self) -> bool:
        """End offsets of the REALTIME partitions against this lane's positions."""
        consumer = self.runtime.consumer
        partitions = list(consumer.assignment())
        if not partitions:
            return False
        try:
            ends = consumer.end_offsets(partitions)
        except KafkaError as error:  # e.g. a slow broker: err on the side of REALTIME
            log.warning("REALTIME lag check failed (%s); NORMAL waits", error)
            return True
        positions = [consumer.position(tp) for tp in partitions]
        # An unknown position (None: still being reset) counts as pending.
        return any(
            at is None or ends[tp] > at for tp, at in zip(partitions, positions, strict=True)
        )

    def _hold_while_realtime(self) -> None:
        """NORMAL: fetch nothing while a REALTIME job is pending; else a poll that fits a
        slice of about `jobs_normal_slice_ms`."""
        # Held or not, the poll waits up to 50 ms: a rebalance completes only in a poll that
        # waits for it (a zero timeout would drop each finished join and start another).
        if not self.realtime_idle.is_set():
            self.runtime.hold()
            return
        self.runtime.release()
        self.runtime.max_records = max(1, min(self.settings.jobs_processor_max_batch,
                                              int(self.slice_s / self._per_job_s)))  # fmt: skip

    def _yield_to_realtime(self) -> None:
        """Inside a NORMAL slice: while REALTIME jobs are in hand, step aside (a few ms at a
        time) so the REALTIME lane has the CPU."""
        if self.priority is Priority.NORMAL and not self.realtime_idle.is_set():
            self.realtime_idle.wait(0.005)

    def _partition(self, key: str) -> int:
        """REALTIME results go to partition 0 of the results topic, NORMAL ones to the others.

        A read_committed reader sees a partition only up to its oldest open transaction: on
        shared partitions a REALTIME result would wait for the NORMAL lane's (longer)
        transaction to commit. Keys stay job ids; with one partition, both share it.
        """
        if self.priority is Priority.REALTIME or self._result_partitions < 2:
            return 0
        return 1 + key_partition(key.encode(), self._result_partitions - 1)

    # --- the processor hooks --------------------------------------------------------------

    def scopes(self, polled: Records) -> list[tuple[Transactor, Records]]:
        return [(self.transactor, {tp: polled[tp] for tp in sorted(polled)})]  # one slice

    def process(self, records: Records) -> Batch:
        """The slice's jobs through the handlers; results, dead letters, duplicates skipped."""
        if self.priority is Priority.REALTIME:
            self.realtime_idle.clear()  # REALTIME jobs in hand: NORMAL steps aside
        started = time.monotonic()
        batch = Batch(records)
        jobs: list[Job] = []
        self.in_flight = []
        for i, record in enumerate(r for rs in records.values() for r in rs):
            if i % 64 == 63:
                self._yield_to_realtime()
            try:
                job = parse_job(record.value, self.processor, self.priority, record.key)
            except BadJobMessage as error:
                batch.dead_letter(record, str(error))
                continue
            job_id = str(job.id)
            if job_id in self.known:
                self.stats.counts["duplicate"] += 1
                log.info("job %s already has a result: skipped", job.id)
                continue
            self.known.add(job_id)
            self.in_flight.append(job_id)
            jobs.append(job)
        for result in process_jobs(jobs, self.registry):
            key = str(result.job_id)
            value = result.model_dump_json().encode()
            batch.emit(self.results_topic, key, value, self._partition(key))
            self.stats.counts["ok" if result.status is JobStatus.PROCESSED_OK else "error"] += 1
        if batch.size:  # commit time left out: it does not grow with jobs
            per_job = max((time.monotonic() - started) / batch.size, 1e-6)
            self._per_job_s = 0.5 * self._per_job_s + 0.5 * per_job
        return batch

    def on_committed(self, batch: Batch) -> None:
        self.in_flight = []

    def on_aborted(self, records: Records) -> None:
        # Nothing of the slice is visible: its ids get no result until it is read again.
        self.known.difference_update(self.in_flight)
        self.in_flight = []

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.joined = True

    def _crash_if_jobs(self, batch: Batch) -> None:
        """The fault hook: with results on the broker but not committed, the daemon dies."""
        if batch.outputs:
            self.transactor.ensure_producer().flush()
            _crash()

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        # Until the REALTIME lane has its new assignment and has checked it, NORMAL starts
        # no slice.
        self.joined = bool(self.runtime.assigned)
        if self.priority is Priority.REALTIME:
            self.realtime_idle.clear()


def _crash() -> None:
    """The fault hook: the whole daemon dies at once, as if its machine failed."""
    if multiprocessing.parent_process() is not None:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _realtime_process(
    processor: str, instance: str, fault, realtime_idle, stop_all, metrics_queue
) -> None:
    """The REALTIME lane, in a child process of the daemon; its metrics go to the daemon."""
    settings = get_settings()
    setup_logging(settings.log_format, process_name=True)
    # The daemon stops with this lane: exit without waiting for the queue to be read.
    metrics_queue.cancel_join_thread()
    stop = StopSignal().install()
    parent = os.getppid()
    telemetry = Telemetry(f"jobs-{processor}", instance, settings, forward=metrics_queue)
    observers = telemetry.observers(lane_group(settings, processor, Priority.REALTIME),
                                    lane="realtime")  # fmt: skip
    try:
        lane = Lane(processor, Priority.REALTIME, realtime_idle, settings, instance=instance,
                    fault=fault, observers=observers)  # fmt: skip
        try:
            # Stops with the daemon: its stop event, a signal of its own, or the parent gone.
            lane.run(stop.also(stop_all.is_set, lambda: os.getppid() != parent))
        finally:
            realtime_idle.clear()
            lane.close()
    finally:
        telemetry.close()


def main(argv: list[str]) -> int:
    settings = s = get_settings()
    prefix, results = s.jobs_topic_prefix, s.job_results_topic_prefix
    parser = worker_parser(
        "jobs",
        "Process REALTIME then NORMAL jobs of one processor (SLOW: the slow_job_batches flow).",
        settings,
        reads=[f"{prefix}.<processor>.realtime and {prefix}.<processor>.normal "
               f"({env_name('jobs_topic_prefix')})",
               f"{results}.<processor> ({env_name('job_results_topic_prefix')}): on start"],
        writes=[f"{results}.<processor> ({env_name('job_results_topic_prefix')})",
                f"{prefix}.<processor>.realtime.dlq and .normal.dlq (+ DLQ_SUFFIX)"],
        own_settings=["jobs_processor_max_batch", "jobs_normal_slice_ms",
                      "jobs_normal_niceness", "jobs_results_lookback_h",
                      "jobs_session_timeout_ms", "jobs_txn_timeout_ms",
                      "payments_upstream_rate_per_s", "payments_upstream_burst"],
        instance_help="this daemon's stable id among the processor's daemons; restarting "
        "with the same id takes over its transactions and partitions at once",
        instance_default="0",
    )  # fmt: skip
    parser.add_argument(
        "--processor", required=True, default=argparse.SUPPRESS,
        help=f"whose jobs to process (known: {', '.join(sorted(PROCESSORS))})",
    )  # fmt: skip
    parser.add_argument("--fault", choices=FAULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        check_processor(args.processor)
    except UnknownProcessorError as error:
        print(error, file=sys.stderr)
        return 2
    # One endpoint for both lanes, served here; the REALTIME lane forwards to it.
    with Telemetry(f"jobs-{args.processor}", args.instance, settings, port=args.metrics_port,
                   host=args.metrics_host, lanes=LANES) as telemetry:  # fmt: skip
        return _run_daemon(args, settings, telemetry)


def _run_daemon(args: argparse.Namespace, settings: Settings, telemetry: Telemetry) -> int:
    ensure_topics(job_topics(args.processor, settings), settings)
    stop = StopSignal().install()
    # spawn: a clean interpreter for the child (no forked Kafka threads or sockets).
    context = multiprocessing.get_context("spawn")
    realtime_idle, stop_all = context.Event(), context.Event()
    metrics_queue = context.Queue(METRICS_QUEUE_SIZE)
    telemetry.receive(metrics_queue)
    child = context.Process(
        target=_realtime_process,
        args=(args.processor, args.instance, args.fault, realtime_idle, stop_all, metrics_queue),
        name="realtime-lane",
    )
    child.start()
    # The NORMAL lane yields the CPU to the REALTIME lane (and the broker) when they need it.
    os.nice(settings.jobs_normal_niceness)
    try:
        normal = Lane(args.processor, Priority.NORMAL, realtime_idle, settings,
                      instance=args.instance, fault=args.fault,
                      observers=telemetry.observers(
                          lane_group(settings, args.processor, Priority.NORMAL), lane="normal"),
                      )  # fmt: skip
    except BaseException:
        stop_all.set()  # the REALTIME lane must not outlive a daemon that failed to start
        child.join(60)
        raise
    log.info("processing %s jobs: REALTIME (pid %s) first, then NORMAL", args.processor, child.pid)
    try:
        normal.run(stop.also(lambda: not child.is_alive()))
    finally:
        stop_all.set()
        normal.close()
        child.join(60)
        if child.is_alive():  # it did not stop in time: it must not outlive the daemon
            child.kill()
            child.join(10)
    if child.exitcode != 0:
        log.error("the REALTIME lane exited with %s", child.exitcode)
        return 1
    return 0
