"""Job models, parsing, handlers and the payments example, without services."""

import json
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from uuid import uuid4

import pytest

from flows.slow_jobs import validate_parameters
from tasks.job_submitter import Submitter, _Batch, _Pending
from tasks.jobs import (
    Job,
    JobResult,
    JobStatus,
    Priority,
    UnknownProcessorError,
    job_from_ledger,
    ledger_frame,
    parse_job,
    process_jobs,
    processor_registry,
    results_frame,
)
from tasks.kafka import decode_json, encode_json
from tasks.payments import (
    PaymentsUpstream,
    TokenBucket,
    UpstreamError,
    format_minor,
    parse_amount,
    payment_submit,
)
from tasks.settings import Settings
from tasks.wire import InvalidRecord

ID = str(uuid4()).encode()


def _job(**fields) -> Job:
    return Job(**({"processor": "payments", "group": "payment-submit"} | fields))


def test_enums_travel_as_their_upper_case_names():
    job = _job(priority=Priority.SLOW, data={"amount": "1.00"})
    wire = decode_json(encode_json(job))
    assert wire["priority"] == "SLOW"
    assert set(wire) == {"id", "processor", "group", "priority", "data", "submitted_at"}
    result = JobResult(job_id=job.id, status=JobStatus.PROCESSED_OK, processed_at=datetime.now(UTC))
    assert decode_json(encode_json(result))["status"] == "PROCESSED_OK"
    assert Job.model_validate(wire) == job


def test_topic_names_use_the_lower_case_priority():
    s = Settings(_env_file=None)
    assert [s.jobs_topic("payments", p.value) for p in Priority] == [
        "jobs.payments.realtime",
        "jobs.payments.normal",
        "jobs.payments.slow",
    ]
    assert s.job_results_topic("payments") == "job-results.payments"


def test_parse_job_takes_processor_and_priority_from_the_topic():
    job_id = uuid4()
    raw = json.dumps({"id": str(job_id), "group": "payment-submit", "data": {"a": 1}}).encode()
    job = parse_job(raw, "payments", Priority.REALTIME)
    assert (job.id, job.processor, job.priority, job.data) == (
        job_id, "payments", Priority.REALTIME, {"a": 1},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": "nope", "group": "g"}', "id"),
        (b'{"group": "g"}', "missing id"),
        (b'{"id": null, "group": "g"}', "missing id"),
        (b'{"id": "%s", "processor": "payments"}' % ID, "group"),
        (b'{"id": "%s", "group": "g", "priority": "URGENT"}' % ID, "priority"),
        (b'{"id": "%s", "group": "g", "priority": "NORMAL"}' % ID, "NORMAL job on the REALTIME"),
        (b'{"id": "%s", "group": "g", "processor": "billing"}' % ID, "processor 'billing'"),
        (b'{"id": "%s", "group": "g", "data": [1]}' % ID, "data"),
    ],
)
def test_malformed_job_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidRecord, match=reason):
        parse_job(raw, "payments", Priority.REALTIME)


def test_a_job_keeps_its_id_on_redelivery_and_its_key_must_be_that_id():
    raw = b'{"id": "%s", "group": "g"}' % ID
    # The same message read twice is the same job (the idempotency key).
    assert (
        parse_job(raw, "payments", Priority.REALTIME, ID).id
        == parse_job(raw, "payments", Priority.REALTIME, ID).id
    )
    with pytest.raises(InvalidRecord, match="not the job id"):
        parse_job(raw, "payments", Priority.REALTIME, str(uuid4()).encode())


def test_process_jobs_turns_unknown_groups_and_exceptions_into_errors():
    def ok(job):
        return {"echo": job.data["x"]}

    def boom(job):
        raise RuntimeError(f"upstream unavailable for {job.data['x']}")

    jobs = [
        _job(group="ok", data={"x": 1}),
        _job(group="boom", data={"x": 2}),
        _job(group="missing", data={"x": 3}),
        _job(group="ok", data={}),  # the handler's KeyError is the job's error too
    ]
    results = process_jobs(jobs, {"ok": ok, "boom": boom})
    assert [r.job_id for r in results] == [j.id for j in jobs]
    assert [r.status for r in results] == [
        JobStatus.PROCESSED_OK,
        JobStatus.PROCESSED_ERROR,
        JobStatus.PROCESSED_ERROR,
        JobStatus.PROCESSED_ERROR,
    ]
    assert results[0].data == {"echo": 1}
    assert results[1].error == "RuntimeError: upstream unavailable for 2"
    assert "unknown group 'missing'" in results[2].error
    assert "known: boom, ok" in results[2].error
    assert results[3].error.startswith("KeyError")


def test_handlers_returning_bad_data_give_errors_not_crashes():
    class Opaque:
        pass

    outcomes = {
        "text": lambda job: "not a mapping",
        "pairs": lambda job: [1, 2],
        "opaque": lambda job: {"x": Opaque()},
        "decimal": lambda job: {"amount": Decimal("1.10")},
        "int-keys": lambda job: {1: 2},
    }
    jobs = [_job(group=group) for group in outcomes]
    results = process_jobs(jobs, outcomes)
    for result in results[:3]:
        assert result.status is JobStatus.PROCESSED_ERROR
        assert result.error.startswith("handler returned bad data: ")
        result.model_dump_json()  # what the daemon publishes
    # Otherwise the data is kept as its JSON carries it, and the SLOW flow's frame works.
    assert [r.data for r in results[3:]] == [{"amount": "1.10"}, {"1": 2}]
    assert results_frame(results)["status"].to_list()[3:] == ["PROCESSED_OK"] * 2


def test_unknown_processor_is_refused_naming_it():
    with pytest.raises(UnknownProcessorError, match="'billing'"):
        processor_registry("billing")


@pytest.mark.parametrize(
    ("processor", "max_jobs", "bad"),
    [("billing", 10, "'billing'"), ("payments", 0, "max_jobs: 0"), ("payments", -3, "-3")],
)
def test_flow_parameters_are_validated(processor, max_jobs, bad):
    with pytest.raises(ValueError, match=bad):
        validate_parameters(processor, max_jobs)


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=100, burst=5, clock=lambda: now[0], sleep=sleep)
    waits = [bucket.acquire() for _ in range(15)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert all(w == pytest.approx(0.01) for w in waits[5:])
    assert now[0] == pytest.approx(0.10)  # 10 tokens beyond the burst at 100/s
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


@pytest.mark.parametrize(
    ("text", "minor"),
    [("12.34", 1234), ("0.01", 1), ("5", 500), (7, 700), ("1e2", 10000), ("6500.10", 650010)],
)
def test_amounts_are_exact_minor_units(text, minor):
    assert parse_amount(text) == minor
    assert Decimal(format_minor(minor)) == Decimal(str(text))


@pytest.mark.parametrize("bad", ["0", "-1", "0.001", "abc", "NaN", "Infinity", 1.5, None, True])
def test_bad_amounts_are_refused(bad):
    with pytest.raises(ValueError):
        parse_amount(bad)


def test_payment_handler_charges_once_per_job_id(tmp_path):
    upstream = PaymentsUpstream(tmp_path / "upstream.sqlite", rate_per_s=1000, burst=10)
    handle = payment_submit(upstream)
    job = _job(data={"amount": "19.99", "currency": "eur", "reference": "order-7"})
    first = handle(job)
    again = handle(job)  # a redelivery: looked up, not charged again
    assert first == again
    assert first["amount"] == "19.99" and first["currency"] == "EUR"
    assert upstream.calls(str(job.id)) == 1
    # Another process sees the same ledger.
    other = PaymentsUpstream(tmp_path / "upstream.sqlite", rate_per_s=1000, burst=10)
    assert other.lookup(str(job.id))["amount_minor"] == 1999
    # The same id for a different payment is an upstream error, not a second charge.
    with pytest.raises(UpstreamError):
        handle(job.model_copy(update={"data": {"amount": "20.00", "currency": "EUR"}}))
    with pytest.raises(UpstreamError):
        upstream.charge(str(job.id), 2000, "EUR", None)
    assert upstream.calls(str(job.id)) == 2  # that direct call reached the upstream...
    assert other.lookup(str(job.id))["amount_minor"] == 1999  # ...and charged nothing
    with pytest.raises(ValueError, match="currency"):
        handle(_job(data={"amount": "1.00", "currency": "EURO"}))


def test_ledger_frames_keep_valid_jobs_and_reject_the_rest():
    good = _job(priority=Priority.SLOW, data={"amount": "1.50"}, submitted_at=datetime.now(UTC))
    records = [
        SimpleNamespace(topic="jobs.payments.slow", partition=0, offset=0,
                        value=encode_json(good), key=None),
        SimpleNamespace(topic="jobs.payments.slow", partition=0, offset=1,
                        value=b"garbage", key=None),
    ]  # fmt: skip
    frame, rejects = ledger_frame(records, "payments")
    assert frame.height == 1 and frame["job_id"][0] == str(good.id)
    assert [(r.offset, reason.split(":")[0]) for r, reason in rejects] == [(1, "not JSON")]
    row = frame.select("job_id", "processor", "job_group", "priority", "data", "submitted_at").row(
        0
    )
    assert job_from_ledger(row) == good
    results = process_jobs([good], {"payment-submit": lambda job: {"ok": True}})
    assert results_frame(results)["status"].to_list() == ["PROCESSED_OK"]


def test_batch_handlers_get_their_groups_jobs_at_once():
    calls: list[list[int]] = []

    class Doubler:
        def __call__(self, job):
            raise AssertionError("the batch path is used")

        def batch(self, jobs):
            calls.append([job.data["n"] for job in jobs])
            return [ValueError("odd") if job.data["n"] % 2 else {"n2": job.data["n"] * 2}
                    for job in jobs]  # fmt: skip

    class Broken:
        def batch(self, jobs):
            return []  # wrong length: every job of the group is an error

        def __call__(self, job):
            raise AssertionError

    jobs = [_job(group="d", data={"n": n}) for n in (1, 2)] + [_job(group="b")]
    jobs.insert(1, _job(group="d", data={"n": 4}))
    results = process_jobs(jobs, {"d": Doubler(), "b": Broken()})
    assert calls == [[1, 4, 2]]
    assert [r.job_id for r in results] == [j.id for j in jobs]
    assert [r.status for r in results] == [
        JobStatus.PROCESSED_ERROR,
        JobStatus.PROCESSED_OK,
        JobStatus.PROCESSED_OK,
        JobStatus.PROCESSED_ERROR,
    ]
    assert results[0].error == "ValueError: odd"
    assert [results[1].data, results[2].data] == [{"n2": 8}, {"n2": 4}]
    assert "returned 0 outcomes for 1 jobs" in results[3].error


def test_payment_batches_charge_each_new_job_once_and_report_bad_ones(tmp_path):
    upstream = PaymentsUpstream(tmp_path / "upstream.sqlite", rate_per_s=1000, burst=10)
    handle = payment_submit(upstream)
    done = _job(data={"amount": "1.00"})
    handle(done)
    jobs = [done, _job(data={"amount": "2.50"}), _job(data={"amount": "x"}), _job(data={})]
    outcomes = handle.batch(jobs)
    assert outcomes[0] == handle(done)
    assert outcomes[1]["amount"] == "2.50"
    assert isinstance(outcomes[2], ValueError) and isinstance(outcomes[3], ValueError)
    assert [upstream.calls(str(j.id)) for j in jobs] == [1, 1, 0, 0]


def test_a_result_racing_an_expiry_does_not_kill_the_results_thread():
    class RacingFuture(Future):
        def set_result(self, result):  # another thread's expiry lands just before
            if not self.done():
                super().set_result("expired first")
            super().set_result(result)

    submitter = Submitter.__new__(Submitter)  # only the bookkeeping `_resolve` uses
    submitter._lock, submitter._pending = threading.Condition(), {}
    job = _job()
    entry = _Pending(job, RacingFuture(), _Batch(Priority.NORMAL, waiting={job.id}))
    submitter._pending[job.id] = entry
    ok = JobResult(job_id=job.id, status=JobStatus.PROCESSED_OK, processed_at=datetime.now(UTC))
    submitter._resolve(entry, ok)
    assert entry.future.result() == "expired first" and not submitter._pending
