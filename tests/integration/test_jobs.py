"""Priority job queues end to end: the Submitter, the processor daemon (a real subprocess)
and the SLOW flow, against the real broker, a Prefect test harness and real files."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import orjson
import pytest
from kafka import TopicPartition

import flows.slow_jobs as slow_jobs_module
from flows.slow_jobs import slow_job_batches
from tasks.job_queues import PendingWork
from tasks.job_submitter import Submitter, wait_for_partitions
from tasks.jobs import Job, JobResult, JobStatus, Priority, parse_result
from tasks.kafka import (
    decode_json,
    ensure_topics,
    job_topics,
    make_consumer,
    make_producer,
)
from tasks.payments import open_upstream
from tasks.warehouse import connect
from tests.conftest import subprocess_env
from tests.helpers import artifacts, eventually, group_report, read_topic, settled

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

    def tails(self) -> str:
        """The last lines of every run's log (what a failed wait needs besides the groups)."""
        logs = sorted(self.log_dir.glob("daemon-*.log"))
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


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


def one_ok_result_each(settings, ids: set[str], daemon: Daemon) -> list[tuple[str, JobResult]]:
    """The committed results, asserted to be exactly one PROCESSED_OK per id in `ids`."""
    on_topic = committed_results(settings)
    assert Counter(key for key, _ in on_topic) == Counter(ids), "one result per job"
    assert {r.status for _, r in on_topic} == {JobStatus.PROCESSED_OK}, daemon.tails()
    return on_topic


def send_jobs(settings, priority: Priority, jobs: list[Job]) -> datetime:
    """Produce `jobs` to `jobs.payments.<priority>` as one burst (no submitter batching);
    returns when the broker had acknowledged all of them."""
    producer = make_producer(settings)
    topic = settings.jobs_topic(PROCESSOR, priority.value)
    try:
        for job in jobs:
            job = job.model_copy(update={"priority": priority, "submitted_at": datetime.now(UTC)})
            producer.send(topic, key=str(job.id), value=job)
        producer.flush()
        return datetime.now(UTC)
    finally:
        producer.close()  # no client left running after the test


class ResultsReader:
    """Reads job-results.payments (read_committed) from the beginning, keeping every record:
    (partition, offset, key, result). Partition 0 holds REALTIME results, the others NORMAL."""

    def __init__(self, settings) -> None:
        self.consumer = make_consumer(settings=settings, group_id=None)
        topic = settings.job_results_topic(PROCESSOR)
        partitions = wait_for_partitions(self.consumer, topic, 30)
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.records: list[tuple[int, int, str, JobResult]] = []

    def read(self) -> list[tuple[int, int, str, JobResult]]:
        for batch in self.consumer.poll(timeout_ms=100, max_records=10_000).values():
            self.records += [(r.partition, r.offset, r.key.decode(), parse_result(r.value))
                             for r in batch]  # fmt: skip
        return self.records

    def keys(self) -> set[str]:
        return {key for _, _, key, _ in self.read()}

    def normal_count(self) -> int:
        return sum(1 for partition, *_ in self.read() if partition != 0)

    def close(self) -> None:
        self.consumer.close()


def diagnosis(settings, daemon: Daemon) -> Callable[[], str]:
    """For a failed wait: both lanes' groups (state, members, end offsets, lag), the pending
    work per lane and every daemon log's tail."""

    def report() -> str:
        base = settings.jobs_processor_group(PROCESSOR)
        groups = [
            group_report(settings, f"{base}.{lane}", [settings.jobs_topic(PROCESSOR, lane)])
            for lane in ("realtime", "normal")
        ]
        alive = "running" if daemon.proc and daemon.proc.poll() is None else "not running"
        return "\n".join([*groups, f"pending {pending(settings)}; daemon {alive}",
                          daemon.tails()])  # fmt: skip

    return report


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
        jobs = [payment() for _ in range(5)]
        started = time.monotonic()
        futures = [submitter.submit_async(job, Priority.NORMAL) for job in jobs[:4]]
        # The 5th fills the batch; `submit` itself gives up (TimeoutError) long after the
        # batch's deadline, so a hang fails here rather than passing slowly.
        last = submitter.submit(jobs[4], Priority.NORMAL)
        waited = time.monotonic() - started
        results = [f.result(timeout=60) for f in futures] + [last]
        assert [r.job_id for r in results] == [job.id for job in jobs]
        assert {r.status for r in results} == {JobStatus.TIMED_OUT}
        assert [r.error for r in results] == [
            "no result within 2s of sending its NORMAL batch; resubmit (same job id)"
        ] * 5, "every job of the batch, each naming its batch's priority and timeout"
        assert waited >= 2.0, "the timeout must not fire before it has run out"
        assert [submitter.status(job.id) for job in jobs] == [None] * 5, "nothing left waiting"

        job = payment()
        started = time.monotonic()
        result = submitter.submit(job, "REALTIME")
        waited = time.monotonic() - started
        assert (result.job_id, result.status) == (job.id, JobStatus.TIMED_OUT)
        assert result.error == (
            "no result within 1s of sending its REALTIME batch; resubmit (same job id)"
        )
        assert waited >= 1.0, "the timeout must not fire before it has run out"
    assert committed_results(jobs_settings) == [], "no processor ran: no result was made up"


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


def test_a_normal_backlog_keeps_draining_between_realtime_jobs(jobs_settings, daemon, monkeypatch):
    """NORMAL pauses for each REALTIME job and resumes after it, however often that is."""
    # A backlog of seconds however fast the machine: REALTIME jobs then arrive while it drains.
    slow_upstream(monkeypatch)
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


def slow_upstream(monkeypatch) -> None:
    """The daemon's simulated upstream at 200 calls/s per lane (bursts of 10): a NORMAL slice
    is then about 10 jobs and a backlog takes seconds, so there is time to arrive mid-slice."""
    monkeypatch.setenv("PAYMENTS_UPSTREAM_RATE_PER_S", "200")
    monkeypatch.setenv("PAYMENTS_UPSTREAM_BURST", "10")


def test_realtime_jobs_arriving_mid_slice_go_before_the_rest_of_the_normal_backlog(
    jobs_settings, daemon, monkeypatch, seed
):
    """REALTIME bursts land while the NORMAL lane works through its backlog, slice after
    slice. Each NORMAL slice is one handler call, so its jobs share one `processed_at`:
    the distinct NORMAL `processed_at` values inside a burst's window count the slices that
    NORMAL finished while REALTIME work was waiting."""
    rng = random.Random(seed)
    slow_upstream(monkeypatch)
    backlog = [payment(f"{rng.randint(1, 900)}.{rng.randint(0, 99):02d}") for _ in range(900)]
    send_jobs(jobs_settings, Priority.NORMAL, backlog)
    bursts = [[payment(f"{rng.randint(1, 900)}.00") for _ in range(rng.randint(80, 120))]
              for _ in range(3)]  # fmt: skip
    # How many NORMAL results exist when each burst is sent: all well inside the backlog.
    triggers = sorted(rng.sample(range(30, 500), len(bursts)))
    print(f"bursts of {[len(b) for b in bursts]} REALTIME jobs after {triggers} NORMAL results")
    daemon.start()
    diagnose = diagnosis(jobs_settings, daemon)
    results = ResultsReader(jobs_settings)
    sent_at = []
    try:
        for trigger, burst in zip(triggers, bursts, strict=True):
            eventually(lambda t=trigger: results.normal_count() >= t, 90, 0.02, diagnose)
            sent_at.append(send_jobs(jobs_settings, Priority.REALTIME, burst))
            ids = {str(job.id) for job in burst}
            eventually(lambda ids=ids: ids <= results.keys(), 90, 0.05, diagnose)
        every = {str(job.id) for job in backlog + [j for b in bursts for j in b]}
        eventually(lambda: every <= results.keys(), 120, 0.1, diagnose)
    finally:
        results.close()
    assert daemon.stop() == 0, daemon.tails()

    on_topic = one_ok_result_each(jobs_settings, every, daemon)
    at = {key: r.processed_at for key, r in on_topic}
    normal_at = sorted({at[str(job.id)] for job in backlog})  # one per slice
    for n, (burst, sent) in enumerate(zip(bursts, sent_at, strict=True)):
        answered = max(at[str(job.id)] for job in burst)
        before = [t for t in normal_at if t < sent]
        during = [t for t in normal_at if sent <= t <= answered]
        after = [t for t in normal_at if t > answered]
        print(f"burst {n}: NORMAL slices before {len(before)}, while it waited {len(during)}, "
              f"after {len(after)}")  # fmt: skip
        assert before and after, (f"burst {n} did not arrive amid the NORMAL backlog",
                                  len(before), len(after))  # fmt: skip
        # Strict priority: the slice in hand, and at most one started before the REALTIME
        # lane had seen the burst; with NORMAL not yielding it would be about one slice per
        # 10 REALTIME jobs.
        assert len(during) <= 2, (f"NORMAL went on while burst {n} waited", during, sent,
                                  answered)  # fmt: skip


def malformed_jobs() -> list[tuple[str, object, str]]:
    """(key, value, the exact DLQ reason) for each way a NORMAL job message can be refused;
    a dict value goes out as JSON, bytes as they are."""
    ids = [str(uuid4()) for _ in range(9)]
    ok = {"group": "payment-submit", "data": {"amount": "1.00", "currency": "EUR"}}
    not_json = b'{"id": "%s", group: 1}' % ids[0].encode()
    not_utf8 = b"\xff\xfe"
    return [
        ("null-value", None, "empty message (null value)"),
        (ids[0], not_json, f"not JSON: {orjson_error(not_json)}"),
        ("not-utf8", not_utf8, f"not JSON: {orjson_error(not_utf8)}"),
        ("a-list", b'["payment-submit"]', "not a JSON object: list"),
        ("no-id", ok, "missing id"),
        ("null-id", ok | {"id": None}, "missing id"),
        ("not-a-uuid", ok | {"id": "not-a-uuid"},
         "invalid job: id: Input should be a valid UUID, invalid character: found `n` at 0"),
        (ids[1], {"id": ids[1], "data": ok["data"]}, "invalid job: group: Field required"),
        (ids[2], ok | {"id": ids[2], "group": 7}, "invalid job: group: Input should be a valid string"),
        (ids[3], ok | {"id": ids[3], "data": "1.00 EUR"},
         "invalid job: data: Input should be a valid dictionary"),
        (ids[4], ok | {"id": ids[4], "priority": "URGENT"},
         "invalid job: priority: Input should be 'REALTIME', 'NORMAL' or 'SLOW'"),
        (ids[5], ok | {"id": ids[5], "submitted_at": "noon"},
         "invalid job: submitted_at: Input should be a valid datetime or date, input is too short"),
        (ids[6], ok | {"id": ids[6], "priority": "REALTIME"}, "REALTIME job on the NORMAL topic"),
        (ids[7], ok | {"id": ids[7], "processor": "billing"},
         "job for processor 'billing' on a 'payments' topic"),
        ("another-key", ok | {"id": ids[8]},
         f"message key b'another-key' is not the job id {ids[8]}"),
    ]  # fmt: skip


def dead_letters(settings, topic: str) -> list[dict]:
    """Every committed dead letter of `topic` (on `<topic>.dlq`)."""
    return [decode_json(r.value) for r in read_topic(settings, settings.dlq_topic(topic))]


def orjson_error(raw: bytes) -> str:
    """What the JSON parser says about `raw` (the reason quotes it after "not JSON: ")."""
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        return str(error)
    raise AssertionError(f"{raw!r} is JSON")


def test_malformed_normal_jobs_go_to_the_dlq_with_their_reason_and_the_rest_is_served(
    jobs_settings, daemon, seed
):
    rng = random.Random(seed)
    normal = jobs_settings.jobs_topic(PROCESSOR, "normal")
    valid = [payment(f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}") for _ in range(30)]
    unknown_kind = payment(group="refund")  # a valid message: an error result, not a letter
    bad = malformed_jobs()
    messages = [("valid", str(j.id), j) for j in [*valid, unknown_kind]]
    messages += [("bad", key, value) for key, value, _ in bad]
    rng.shuffle(messages)  # malformed messages between valid jobs, on every partition
    producer = make_producer(jobs_settings, value_serializer=None)
    sent = {}  # key -> (partition, offset) of each malformed message
    try:
        for kind, key, value in messages:
            raw = value if value is None or isinstance(value, bytes) else (
                value.model_dump_json().encode() if isinstance(value, Job) else orjson.dumps(value)
            )  # fmt: skip
            meta = producer.send(normal, key=key, value=raw).get(timeout=30)
            if kind == "bad":
                sent[key] = (meta.partition, meta.offset)
    finally:
        producer.close()
    daemon.start()
    diagnose = diagnosis(jobs_settings, daemon)

    # Every message committed by the NORMAL lane: its results and its dead letters are on
    # the topics (one transaction per slice).
    eventually(lambda: pending(jobs_settings)[Priority.NORMAL] == 0, 60, 0.1, diagnose)
    results_topic = jobs_settings.job_results_topic(PROCESSOR)
    outputs = [results_topic, jobs_settings.dlq_topic(normal)]
    eventually(lambda: settled(jobs_settings, outputs), 60, 0.1, diagnose)
    expected = {key: reason for key, _, reason in bad}
    letters = dead_letters(jobs_settings, normal)
    assert Counter(letter["key"] for letter in letters) == Counter(list(expected)), (
        "one letter each"
    )
    for letter in letters:
        assert letter["reason"] == expected[letter["key"]], letter
        assert letter["topic"] == normal
        assert (letter["partition"], letter["offset"]) == sent[letter["key"]], letter

    # The daemon keeps serving after them: new jobs on both lanes get their results.
    with Submitter(PROCESSOR, jobs_settings, timeouts_s=dict.fromkeys(Priority, 60)) as sub:
        after = [sub.submit_async(payment("7.00"), p) for p in (Priority.NORMAL, Priority.REALTIME)]  # fmt: skip
        served = [f.result(timeout=90) for f in after]
    assert [r.status for r in served] == [JobStatus.PROCESSED_OK] * 2, (served, daemon.tails())
    assert daemon.proc.poll() is None, daemon.tails()
    assert daemon.stop() == 0, daemon.tails()
    assert dead_letters(jobs_settings, normal) == letters, "no letter repeated or added"

    on_topic = committed_results(jobs_settings)
    everyone = [str(j.id) for j in [*valid, unknown_kind]] + [str(r.job_id) for r in served]
    assert Counter(key for key, _ in on_topic) == Counter(everyone), (
        "exactly one result per valid job, none for a malformed one"
    )
    results = dict(on_topic)
    assert {results[str(j.id)].status for j in valid} == {JobStatus.PROCESSED_OK}, daemon.tails()
    assert [results[str(j.id)].data["amount"] for j in valid] == [j.data["amount"] for j in valid]
    refused = results[str(unknown_kind.id)]
    assert refused.status is JobStatus.PROCESSED_ERROR
    assert (
        refused.error == "unknown group 'refund' for processor 'payments' (known: payment-submit)"
    )


def test_sigterm_mid_backlog_finishes_the_slice_and_a_restart_loses_and_repeats_nothing(
    jobs_settings, daemon, monkeypatch, seed
):
    rng = random.Random(seed)
    slow_upstream(monkeypatch)
    backlog = [payment(f"{rng.randint(1, 900)}.{rng.randint(0, 99):02d}") for _ in range(600)]
    send_jobs(jobs_settings, Priority.NORMAL, backlog)
    realtime = [payment(f"{rng.randint(1, 900)}.00") for _ in range(rng.randint(20, 40))]
    trigger = rng.randint(50, 300)  # NORMAL results when SIGTERM comes
    print(f"SIGTERM after {trigger} of {len(backlog)} NORMAL results, {len(realtime)} REALTIME")
    every = {str(job.id) for job in backlog + realtime}
    results_topic = jobs_settings.job_results_topic(PROCESSOR)
    upstream = open_upstream(jobs_settings)
    daemon.start()
    diagnose = diagnosis(jobs_settings, daemon)
    results = ResultsReader(jobs_settings)
    try:
        eventually(lambda: results.normal_count() >= trigger, 90, 0.02, diagnose)
        daemon.proc.send_signal(signal.SIGTERM)
        # REALTIME jobs arrive while the daemon stops: it may take them or leave them.
        send_jobs(jobs_settings, Priority.REALTIME, realtime)
        assert daemon.wait(60) == 0, daemon.tails()
        log = daemon.log.read_text()
        lane = re.search(r"REALTIME \(pid (\d+)\)", log)
        assert lane and not running(int(lane[1])), ("the REALTIME lane outlived the daemon",
                                                    daemon.tails())  # fmt: skip
        eventually(lambda: settled(jobs_settings, [results_topic]), 60, 0.1, diagnose)
        stopped_with = committed_results(jobs_settings)
        normal_done = {key for key, _ in stopped_with} & {str(job.id) for job in backlog}
        print(f"stopped with {len(stopped_with)} results, {len(normal_done)} of them NORMAL")
        assert trigger <= len(normal_done) < len(backlog), "the signal came mid-backlog"
        # Each lane finished the slice in hand and committed it: every job the upstream was
        # called for has its result, none is left charged without one.
        charged = set(upstream.lookup_many(sorted(every)))
        unanswered = charged - {key for key, _ in stopped_with}
        assert not unanswered, (f"{len(unanswered)} jobs charged without a result",
                                daemon.tails())  # fmt: skip
        for name in ("normal", "realtime"):  # each lane's last words: it stopped, not died
            assert f"jobs-{PROCESSOR}-{name} stopped:" in log, daemon.tails()

        daemon.start()
        eventually(lambda: every <= results.keys(), 120, 0.1, diagnose)
    finally:
        results.close()
    assert daemon.stop() == 0, daemon.tails()
    one_ok_result_each(jobs_settings, every, daemon)
    calls = Counter(charge["calls"] for charge in upstream.lookup_many(sorted(every)).values())
    assert calls == {1: len(every)}, "one upstream call per job"
    upstream.close()


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
