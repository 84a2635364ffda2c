"""The Submitter: the library services import to send jobs and wait for their results.

    with Submitter("payments") as submitter:
        result = submitter.submit(Job(processor="payments", group="payment-submit",
                                      data={"amount": "12.50"}), Priority.REALTIME)

NORMAL and SLOW jobs collect per priority until `JOBS_BATCH_SIZE` jobs or until the first
has waited `JOBS_BATCH_LATENCY_MS`; the batch then goes to `jobs.<processor>.<priority>` in
one produce request (one message per job, key job id). REALTIME jobs go at once, alone.
A batch whose results are not back within its priority's timeout (counted from the send)
ends as TIMED_OUT for every job of it still waiting: the caller resubmits, with the same
job id (the processor's handlers are idempotent by job id). Thread-safe: one Submitter per
process, shared by every request thread. Results are matched by job id from
`job-results.<processor>`, read by a background thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from uuid import UUID

from kafka import TopicPartition

from tasks.jobs import (
    Job,
    JobResult,
    JobStatus,
    Priority,
    check_processor,
    parse_result,
    timed_out,
    utcnow,
)
from tasks.kafka import ensure_topics, job_topics, make_consumer, make_producer
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

LATE_RESULTS_KEPT = 10_000  # results that came after their job timed out, for a resubmit


@dataclass
class _Batch:
    priority: Priority
    deadline: float | None = None  # monotonic; set when the batch has been sent
    waiting: set[UUID] = field(default_factory=set)


@dataclass
class _Pending:
    job: Job
    future: Future
    batch: _Batch
    status: JobStatus = JobStatus.QUEUED


class SubmitterClosed(RuntimeError):
    pass


def wait_for_partitions(consumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """The topic's partitions. Right after the topic is created the metadata may not list
    them yet: assigning none would time every job out silently, so retry, then fail clearly."""
    deadline = time.monotonic() + timeout_s
    while not (partitions := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no partitions for topic {topic!r} after {timeout_s:g}s")
        time.sleep(0.1)  # a metadata retry back-off, not a stand-in for synchronisation
    return [TopicPartition(topic, p) for p in sorted(partitions)]


class Submitter:
    def __init__(
        self,
        processor: str,
        settings: Settings | None = None,
        *,
        batch_size: int | None = None,
        batch_latency_ms: float | None = None,
        timeouts_s: dict[Priority, float] | None = None,
    ) -> None:
        s = self.settings = settings or get_settings()
        self.processor = check_processor(processor)
        self.batch_size = batch_size or s.jobs_batch_size
        self.batch_latency_s = (
            s.jobs_batch_latency_ms if batch_latency_ms is None else batch_latency_ms
        ) / 1000
        self.timeouts_s = {
            Priority.REALTIME: s.jobs_timeout_realtime_s,
            Priority.NORMAL: s.jobs_timeout_normal_s,
            Priority.SLOW: s.jobs_timeout_slow_s,
        } | (timeouts_s or {})
        if self.batch_size < 1 or min(self.timeouts_s.values()) <= 0:
            raise ValueError("batch_size must be >= 1 and timeouts > 0")
        self.topics = {p: s.jobs_topic(processor, p.value) for p in Priority}
        self._lock = threading.Condition()
        self._pending: dict[UUID, _Pending] = {}
        self._queues: dict[Priority, list[_Pending]] = {Priority.NORMAL: [], Priority.SLOW: []}
        self._queued_since: dict[Priority, float] = {}
        self._sent: list[_Batch] = []
        self._late: OrderedDict[UUID, JobResult] = OrderedDict()
        self._timed_out: OrderedDict[UUID, None] = OrderedDict()
        self._closed = False
        ensure_topics(job_topics(processor, s), s)
        # linger 0: a batch is sent as soon as it is complete; size bounds are ours.
        self._producer = make_producer(s, linger_ms=0)
        self._results = make_consumer(settings=s, group_id=None, fetch_max_wait_ms=50)
        results_topic = s.job_results_topic(processor)
        try:
            tps = wait_for_partitions(self._results, results_topic, s.kafka_timeout_s)
        except RuntimeError:
            self._producer.close(timeout=0)
            self._results.close()
            raise
        self._results.assign(tps)
        self._results.seek_to_end(*tps)
        for tp in tps:  # resolve the end now: no result of a job sent from here is missed
            self._results.position(tp)
        self._threads = [
            threading.Thread(target=self._send_loop, name="submitter-send", daemon=True),
            threading.Thread(target=self._result_loop, name="submitter-results", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # --- the API --------------------------------------------------------------------------

    def submit(self, job: Job, priority: Priority | str | None = None) -> JobResult:
        """Send `job` and wait for its result (TIMED_OUT at worst, never a hang)."""
        future = self.submit_async(job, priority)
        priority = Priority(priority or job.priority)
        # The future always completes by the batch deadline; the margin covers batching.
        return future.result(timeout=self.timeouts_s[priority] + self.batch_latency_s + 30)

    def submit_async(self, job: Job, priority: Priority | str | None = None) -> Future:
        """Queue `job`; the returned Future resolves to its JobResult."""
        priority = Priority(priority or job.priority)
        if job.processor != self.processor:
            raise ValueError(f"job for processor {job.processor!r} given to a {self.processor!r} submitter")  # fmt: skip
        job = job.model_copy(update={"priority": priority, "submitted_at": utcnow()})
        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise SubmitterClosed("the submitter is closed")
            if (late := self._late.pop(job.id, None)) is not None:
                future.set_result(late)  # a resubmit of a job whose result came late
                return future
            if job.id in self._pending:
                raise ValueError(f"job {job.id} is already waiting for its result")
            batch = _Batch(priority) if priority is Priority.REALTIME else None
            entry = _Pending(job, future, batch or _Batch(priority))
            self._pending[job.id] = entry
            if priority is Priority.REALTIME:
                batch.waiting.add(job.id)
            else:
                queue = self._queues[priority]
                if not queue:  # the sender now has a latency bound to wait for
                    self._queued_since[priority] = time.monotonic()
                    self._lock.notify_all()
                queue.append(entry)
                if len(queue) >= self.batch_size:
                    self._lock.notify_all()
        if priority is Priority.REALTIME:
            self._send([entry], batch, wait=False)  # at once, alone, from the caller's thread
        return future

    def status(self, job_id: UUID) -> JobStatus | None:
        """QUEUED (in a batch here) or SUBMITTED (on Kafka) while waiting; None otherwise."""
        with self._lock:
            entry = self._pending.get(job_id)
            if entry is not None:
                return entry.status
        return None

    def close(self, timeout_s: float = 10) -> None:
        """Send what is queued, stop; jobs still waiting end TIMED_OUT."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        with self._lock:
            waiting = list(self._pending.values())
            self._pending.clear()
        for entry in waiting:
            self._resolve(entry, timed_out(entry.job.id, "the submitter closed before the result"))
        self._producer.close(timeout=timeout_s)
        self._results.close()

    def __enter__(self) -> Submitter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sending --------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                ready = self._take_ready_batch()
                while ready is None and not self._closed:
                    self._lock.wait(self._time_to_next_batch())
                    ready = self._take_ready_batch()
                if ready is None:  # closed and nothing queued
                    return
            self._send(ready, ready[0].batch, wait=True)

    def _take_ready_batch(self) -> list[_Pending] | None:
        """A full batch, one whose first job waited long enough, or anything when closing."""
        now = time.monotonic()
        for priority, queue in self._queues.items():
            if not queue:
                continue
            full = len(queue) >= self.batch_size
            due = now - self._queued_since[priority] >= self.batch_latency_s
            if full or due or self._closed:
                entries = queue[: self.batch_size]
                del queue[: self.batch_size]
                self._queued_since[priority] = now
                batch = _Batch(priority, waiting={e.job.id for e in entries})
                for entry in entries:
                    entry.batch = batch
                return entries
        return None

    def _time_to_next_batch(self) -> float:
        now = time.monotonic()
        waits = [
            self._queued_since[p] + self.batch_latency_s - now for p, q in self._queues.items() if q
        ]
        return max(0.0005, min(waits)) if waits else 1.0

    def _send(self, entries: list[_Pending], batch: _Batch, wait: bool) -> None:
        """Send a batch; its timeout starts now. With `wait`, block until the broker acked."""
        topic = self.topics[batch.priority]
        try:
            futures = [self._producer.send(topic, key=str(e.job.id), value=e.job) for e in entries]
        except Exception as error:  # e.g. the broker is unreachable: the caller resubmits
            self._fail(entries, f"not sent: {type(error).__name__}: {error}")
            return
        with self._lock:
            batch.deadline = time.monotonic() + self.timeouts_s[batch.priority]
            self._sent.append(batch)
            for entry in entries:
                if entry.status is JobStatus.QUEUED:
                    entry.status = JobStatus.SUBMITTED
        if wait:
            # One batch in flight per submitter: the batch is one produce request.
            try:
                for future in futures:
                    future.get(timeout=self.settings.kafka_timeout_s)
            except Exception as error:
                self._fail(entries, f"not sent: {type(error).__name__}: {error}")
        else:
            for future in futures:
                future.add_errback(lambda error, es=entries: self._fail(es, f"not sent: {error!r}"))

    def _fail(self, entries: list[_Pending], reason: str) -> None:
        log.warning("%d jobs %s", len(entries), reason)
        for entry in entries:
            self._resolve(entry, timed_out(entry.job.id, reason))

    # --- results --------------------------------------------------------------------------

    def _result_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed and not self._pending_after_close():
                    return
            self._expire()
            try:
                polled = self._results.poll(timeout_ms=20)
            except Exception:
                log.exception("reading results failed; retrying")
                time.sleep(0.5)
                continue
            for records in polled.values():
                for record in records:
                    self._on_result(record)

    def _pending_after_close(self) -> bool:
        # On close, the sender drains the queues; results are not awaited past that.
        return any(self._queues.values())

    def _on_result(self, record) -> None:
        try:
            job_id = UUID(record.key.decode())
        except (AttributeError, ValueError):
            return
        with self._lock:
            entry = self._pending.get(job_id)
            late = entry is None and job_id in self._timed_out
        if entry is None:
            if late:
                try:
                    self._remember_late(parse_result(record.value))
                except ValueError:
                    pass
            return
        try:
            result = parse_result(record.value)
        except ValueError as error:
            log.warning("unreadable result for job %s: %s", job_id, error)
            return
        self._resolve(entry, result)

    def _expire(self) -> None:
        now = time.monotonic()
        expired: list[_Pending] = []
        with self._lock:
            still: list[_Batch] = []
            for batch in self._sent:
                if not batch.waiting:
                    continue
                if batch.deadline is not None and batch.deadline <= now:
                    expired.extend(self._pending[i] for i in batch.waiting if i in self._pending)
                else:
                    still.append(batch)
            self._sent = still
        for entry in expired:
            reason = (
                f"no result within {self.timeouts_s[entry.batch.priority]:g}s of sending its "
                f"{entry.batch.priority.value} batch; resubmit (same job id)"
            )
            self._resolve(entry, timed_out(entry.job.id, reason))
            with self._lock:
                self._timed_out[entry.job.id] = None
                while len(self._timed_out) > LATE_RESULTS_KEPT:
                    self._timed_out.popitem(last=False)

    def _remember_late(self, result: JobResult) -> None:
        with self._lock:
            self._late[result.job_id] = result
            while len(self._late) > LATE_RESULTS_KEPT:
                self._late.popitem(last=False)

    def _resolve(self, entry: _Pending, result: JobResult) -> None:
        with self._lock:
            if self._pending.get(entry.job.id) is entry:
                del self._pending[entry.job.id]
            entry.batch.waiting.discard(entry.job.id)
            entry.status = result.status
        try:
            entry.future.set_result(result)
        except InvalidStateError:  # a result and an expiry raced: the first one stands
            pass
