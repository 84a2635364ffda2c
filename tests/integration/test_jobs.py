"""Priority job queues end to end: the Submitter, the processor daemon (a real subprocess)
and the SLOW flow, against the real broker, a Prefect test harness and real files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import wait
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import TopicPartition

import flows.slow_jobs as slow_jobs_module
from flows.slow_jobs import slow_job_batches
from tasks.job_queues import PendingWork
from tasks.job_submitter import Submitter, wait_for_partitions
from tasks.jobs import Job, JobResult, JobStatus, Priority, parse_result
from tasks.kafka import decode_json, ensure_topics, job_topics, make_consumer, make_producer
from tasks.payments import open_upstream
from tasks.warehouse import connect
from tests.conftest import subprocess_env
from tests.helpers import artifacts, eventually, read_topic

pytestmark = pytest.mark.integration

PROCESSOR = "payments"


class Daemon:
    """`python -m stream_workers jobs --processor payments` as a child process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self, *extra: str) -> Daemon:
        self.runs += 1
        self.log = self.log_dir / f"daemon-{self.runs}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_workers", "jobs", "--processor", PROCESSOR, *extra],
            env=subprocess_env(),
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        return self

    def wait(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> int:
        """SIGTERM; the daemon finishes its slice, commits and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
def jobs_settings(settings):
    ensure_topics(job_topics(PROCESSOR, settings), settings)
    return settings


@pytest.fixture
def daemon(jobs_settings, tmp_path):
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(30)


def payment(amount: str = "10.00", group: str = "payment-submit") -> Job:
    return Job(processor=PROCESSOR, group=group, data={"amount": amount, "currency": "EUR"})


def committed_results(settings) -> list[tuple[str, JobResult]]:
    """Every committed (read_committed) record on job-results.payments: (key, result)."""
    records = read_topic(settings, settings.job_results_topic(PROCESSOR))
    return [(r.key.decode(), parse_result(r.value)) for r in records]


def pending(settings) -> dict[Priority, int]:
    probe = PendingWork(PROCESSOR, settings)
    try:
        return probe.pending()
    finally:
        probe.close()


def test_realtime_first_then_normal_then_slow_by_the_flow(prefect_api, jobs_settings, daemon):
    timeouts = {Priority.REALTIME: 120, Priority.NORMAL: 120, Priority.SLOW: 120}
    with Submitter(PROCESSOR, jobs_settings, batch_size=50, timeouts_s=timeouts) as submitter:
        # The processor is stopped: a NORMAL backlog and SLOW jobs queue up before REALTIME.
        slow = [submitter.submit_async(payment("3.00"), Priority.SLOW) for _ in range(6)]
        normal = [submitter.submit_async(payment("2.00"), Priority.NORMAL) for _ in range(150)]
        realtime = [submitter.submit_async(payment("1.00"), Priority.REALTIME) for _ in range(5)]
        eventually(lambda: pending(jobs_settings)[Priority.NORMAL] == 150)
        assert pending(jobs_settings)[Priority.REALTIME] == 5

        daemon.start()
        done, _ = wait(realtime + normal, timeout=90)
        assert len(done) == len(realtime + normal), daemon.tail()
        rt = [f.result() for f in realtime]
        nm = [f.result() for f in normal]
        assert {r.status for r in rt + nm} == {JobStatus.PROCESSED_OK}, daemon.tail()
        assert max(r.processed_at for r in rt) < min(r.processed_at for r in nm)
        assert not any(f.done() for f in slow), "SLOW jobs wait for the flow"

        # The flow runs SLOW jobs only once the processor has committed everything.
        eventually(lambda: not any(pending(jobs_settings).values()))
        summary = slow_job_batches(processor=PROCESSOR, max_jobs=100)
        assert (summary["loaded"], summary["processed"]) == (6, 6)
        sl = [f.result(timeout=60) for f in slow]
        assert {r.status for r in sl} == {JobStatus.PROCESSED_OK}
        assert max(r.processed_at for r in nm) < min(r.processed_at for r in sl)
        assert {r.data["amount"] for r in sl} == {"3.00"}

    assert daemon.stop() == 0, daemon.tail()
    on_topic = committed_results(jobs_settings)
    assert Counter(key for key, _ in on_topic) == Counter(str(r.job_id) for r in rt + nm + sl), (
        "one result per job on job-results"
    )
    upstream = open_upstream(jobs_settings)
    assert all(upstream.calls(str(r.job_id)) == 1 for r in rt + nm + sl)

    # A rerun finds nothing new: no job runs twice, no second result.
    again = slow_job_batches(processor=PROCESSOR, max_jobs=100)
    assert (again["loaded"], again["processed"]) == (0, 0)
    assert again["by_status"] == {"QUEUED": 0, "PROCESSED_OK": 6}
    assert len(committed_results(jobs_settings)) == len(on_topic)


def test_slow_batches_wait_while_normal_jobs_are_pending(prefect_api, jobs_settings):
    producer = make_producer(jobs_settings)
    now = datetime.now(UTC)
    slow = [
        payment("4.00").model_copy(
            update={"priority": Priority.SLOW, "submitted_at": now - timedelta(minutes=i)}
        )
        for i in (1, 3, 2)
    ]
    for job in slow:
        producer.send(jobs_settings.jobs_topic(PROCESSOR, "slow"), key=str(job.id), value=job)
    bad_id = str(payment().id)
    producer.send(jobs_settings.jobs_topic(PROCESSOR, "slow"), key=bad_id,
                  value={"id": bad_id, "group": 7})  # fmt: skip
    waiting = payment()  # no daemon runs: this NORMAL job stays pending
    producer.send(jobs_settings.jobs_topic(PROCESSOR, "normal"), key=str(waiting.id), value=waiting)
    producer.close()  # flushes; no client left running after the test

    summary = slow_job_batches(processor=PROCESSOR, max_jobs=10)
    assert summary["yielded_to"] == {"NORMAL": 1}
    assert (summary["loaded"], summary["rejected"], summary["processed"]) == (3, 1, 0)
    assert summary["by_status"] == {"QUEUED": 3}
    assert summary["oldest_waiting"] == str(slow[1].id)
    table = json.loads(artifacts(f"slow-jobs-{PROCESSOR}")[0]["data"])
    queued = next(row for row in table if row["status"] == "QUEUED")
    assert queued["jobs"] == 3 and queued["oldest job"] == summary["oldest_waiting"]
    assert committed_results(jobs_settings) == []

    dlq = make_consumer(jobs_settings.dlq_topic(jobs_settings.jobs_topic(PROCESSOR, "slow")),
                        settings=jobs_settings, group_id=None)  # fmt: skip
    try:
        letters = eventually(
            lambda: [decode_json(r.value) for rs in dlq.poll(500).values() for r in rs]
        )
    finally:
        dlq.close()
    assert "group" in letters[0]["reason"]


def test_bad_flow_parameters_are_refused_before_any_write(prefect_api, jobs_settings):
    with pytest.raises(ValueError, match="'billing'"):
        slow_job_batches(processor="billing")
    with pytest.raises(ValueError, match="max_jobs: 0"):
        slow_job_batches(processor=PROCESSOR, max_jobs=0)
    assert not jobs_settings.warehouse_path.exists()


def test_a_result_recorded_but_not_published_is_published_once_on_rerun(
    prefect_api, jobs_settings, monkeypatch
):
    producer = make_producer(jobs_settings)
    jobs = [payment("5.00").model_copy(update={"priority": Priority.SLOW}) for _ in range(4)]
    for job in jobs:
        producer.send(jobs_settings.jobs_topic(PROCESSOR, "slow"), key=str(job.id), value=job)
    producer.close()  # flushes; no client left running after the test

    def crash(*_args):
        raise RuntimeError("killed between recording and publishing")

    with monkeypatch.context() as patch:
        patch.setattr(slow_jobs_module, "_publish", crash)
        with pytest.raises(RuntimeError, match="killed"):
            slow_job_batches(processor=PROCESSOR)
    assert committed_results(jobs_settings) == []
    con = connect(jobs_settings, read_only=True)
    recorded = con.execute(
        "SELECT count(*) FROM job_ledger WHERE processed_at IS NOT NULL"
    ).fetchone()
    con.close()
    assert recorded == (4,)

    rerun = slow_job_batches(processor=PROCESSOR)
    assert (rerun["republished"], rerun["processed"]) == (4, 0)
    # Even if the ledger forgot that they were published, they are not published twice.
    con = connect(jobs_settings)
    con.execute("UPDATE job_ledger SET published = false")
    con.close()
    assert slow_job_batches(processor=PROCESSOR)["republished"] == 0
    keys = Counter(key for key, _ in committed_results(jobs_settings))
    assert keys == Counter(str(j.id) for j in jobs)
    upstream = open_upstream(jobs_settings)
    assert [upstream.calls(str(j.id)) for j in jobs] == [1, 1, 1, 1]


def test_the_whole_batch_times_out_when_the_processor_is_down(jobs_settings):
    timeouts = {Priority.NORMAL: 2.0, Priority.REALTIME: 1.0}
    with Submitter(PROCESSOR, jobs_settings, batch_size=5, batch_latency_ms=5000,
                   timeouts_s=timeouts) as submitter:  # fmt: skip
        started = time.monotonic()
        futures = [submitter.submit_async(payment(), Priority.NORMAL) for _ in range(4)]
        last = submitter.submit(payment(), Priority.NORMAL)  # the 5th fills the batch
        elapsed = time.monotonic() - started
        results = [f.result(timeout=5) for f in futures] + [last]
        assert {r.status for r in results} == {JobStatus.TIMED_OUT}
        assert all("resubmit" in r.error for r in results)
        assert 2.0 <= elapsed < 5.0, "timed out after the timeout, without a hang"

        started = time.monotonic()
        assert submitter.submit(payment(), "REALTIME").status is JobStatus.TIMED_OUT
        assert 1.0 <= time.monotonic() - started < 4.0


def test_the_submitter_waits_for_result_partitions_and_fails_clearly(jobs_settings):
    consumer = make_consumer(settings=jobs_settings, group_id=None)
    try:
        results_topic = jobs_settings.job_results_topic(PROCESSOR)
        assert wait_for_partitions(consumer, results_topic, 5) == [
            TopicPartition(results_topic, p) for p in sorted(consumer.partitions_for_topic(results_topic))
        ]  # fmt: skip
        missing = f"{results_topic}.never-created"  # the broker does not auto-create topics
        with pytest.raises(RuntimeError, match=r"no partitions for topic .*never-created"):
            wait_for_partitions(consumer, missing, 0.3)
    finally:
        consumer.close()


def test_a_kill_between_handler_and_commit_gives_one_result_and_one_call(jobs_settings, daemon):
    timeouts = {Priority.REALTIME: 120}
    with Submitter(PROCESSOR, jobs_settings, timeouts_s=timeouts) as submitter:
        job = payment("42.42")
        future = submitter.submit_async(job, Priority.REALTIME)
        daemon.start("--fault", "kill-before-commit")
        assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
        upstream = open_upstream(jobs_settings)
        assert upstream.calls(str(job.id)) == 1, "the handler ran before the kill"
        assert committed_results(jobs_settings) == [], "its result was never committed"

        daemon.start()
        result = future.result(timeout=90)
        assert result.status is JobStatus.PROCESSED_OK, (result, daemon.tail())
        assert result.data["amount"] == "42.42"
        assert upstream.calls(str(job.id)) == 1, "the redelivered job did not call again"

        # The same job id again (a resubmission) gives no second result nor call.
        producer = make_producer(jobs_settings)
        realtime = jobs_settings.jobs_topic(PROCESSOR, "realtime")
        producer.send(
            realtime, key=str(job.id), value=job.model_copy(update={"priority": Priority.REALTIME})
        )
        producer.close()  # flushes; no client left running after the test
        marker = submitter.submit(payment("1.00"), Priority.REALTIME)
        assert marker.status is JobStatus.PROCESSED_OK
    assert daemon.stop() == 0, daemon.tail()
    keys = Counter(key for key, _ in committed_results(jobs_settings))
    assert keys == Counter([str(job.id), str(marker.job_id)])
    assert upstream.calls(str(job.id)) == 1
    assert "already has a result" in daemon.log.read_text()


def test_errors_and_malformed_jobs_do_not_stop_the_daemon(jobs_settings, daemon):
    daemon.start()
    realtime = jobs_settings.jobs_topic(PROCESSOR, "realtime")
    producer = make_producer(jobs_settings)
    producer.send(realtime, key="x", value={"id": "not-a-uuid", "group": "payment-submit"})
    producer.send(realtime, key="y", value=None)
    producer.close()  # flushes; no client left running after the test
    with Submitter(PROCESSOR, jobs_settings, timeouts_s={Priority.NORMAL: 60}) as submitter:
        unknown, failing, fine = (
            submitter.submit_async(payment(group="refund"), Priority.NORMAL),
            submitter.submit_async(payment("-5.00"), Priority.NORMAL),
            submitter.submit_async(payment("5.00"), Priority.NORMAL),
        )
        unknown, failing, fine = (f.result(timeout=90) for f in (unknown, failing, fine))
    assert unknown.status is JobStatus.PROCESSED_ERROR, (unknown, daemon.tail())
    assert "unknown group 'refund'" in unknown.error
    assert failing.status is JobStatus.PROCESSED_ERROR
    assert failing.error == "ValueError: amount must be positive, got '-5.00'"
    assert fine.status is JobStatus.PROCESSED_OK

    dlq = make_consumer(jobs_settings.dlq_topic(realtime), settings=jobs_settings, group_id=None)
    letters: list[dict] = []
    try:
        eventually(lambda: letters.extend(decode_json(r.value) for rs in dlq.poll(500).values()
                                          for r in rs) or len(letters) >= 2)  # fmt: skip
    finally:
        dlq.close()
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons[0].startswith("empty message") and "id" in reasons[1]
    assert {letter["key"] for letter in letters} == {"x", "y"}
    assert daemon.stop() == 0, daemon.tail()


def test_a_normal_backlog_keeps_draining_between_realtime_jobs(jobs_settings, daemon):
    """NORMAL pauses for each REALTIME job and resumes after it, however often that is."""
    backlog = 1500
    producer = make_producer(jobs_settings)
    normal = jobs_settings.jobs_topic(PROCESSOR, "normal")
    for i in range(backlog):
        job = payment(f"{i % 50 + 1}.00")
        producer.send(normal, key=str(job.id), value=job)
    producer.close()  # flushes; no client left running after the test
    daemon.start()
    realtime_done = 0
    deadline = time.monotonic() + 90
    with Submitter(PROCESSOR, jobs_settings, timeouts_s={Priority.REALTIME: 60}) as submitter:
        while pending(jobs_settings)[Priority.NORMAL] and time.monotonic() < deadline:
            result = submitter.submit(payment("9.99"), Priority.REALTIME)
            assert result.status is JobStatus.PROCESSED_OK, (result, daemon.tail())
            realtime_done += 1
    assert pending(jobs_settings)[Priority.NORMAL] == 0, daemon.tail()
    assert realtime_done >= 5, "REALTIME jobs ran while the backlog drained"
    assert daemon.stop() == 0, daemon.tail()
    assert len(committed_results(jobs_settings)) == backlog + realtime_done
