"""Priority job queues: the models, the handler registry and `process_jobs`.

The processor daemon (stream_workers/jobs.py) and the SLOW batches flow (flows/slow_jobs.py)
both turn jobs into results with `process_jobs`, through the same handlers. Pure logic only:
the Kafka side lives in tasks/job_queues.py, the submitter in tasks/job_submitter.py.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import to_jsonable_python

from tasks.kafka import decode_json
from tasks.settings import Settings
from tasks.wire import InvalidRecord, RecordT


class Priority(StrEnum):
    """In JSON a priority is its upper-case name; in topic names it is lower case."""

    REALTIME = "REALTIME"
    NORMAL = "NORMAL"
    SLOW = "SLOW"


class JobStatus(StrEnum):
    NEW = "NEW"  # created, not yet given to a submitter
    QUEUED = "QUEUED"  # waiting in a submitter batch, or in the SLOW job ledger
    SUBMITTED = "SUBMITTED"  # on Kafka, awaiting its result
    PROCESSED_OK = "PROCESSED_OK"
    PROCESSED_ERROR = "PROCESSED_ERROR"
    TIMED_OUT = "TIMED_OUT"  # no result in time: resubmit (same id: handlers are idempotent)


FINAL_STATUSES = frozenset({JobStatus.PROCESSED_OK, JobStatus.PROCESSED_ERROR, JobStatus.TIMED_OUT})


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime | None) -> datetime | None:
    # Times are UTC on the wire; a naive time is taken to be UTC rather than local.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: UUID = Field(default_factory=uuid4)
    processor: str = Field(min_length=1)
    group: str = Field(min_length=1)
    priority: Priority = Priority.NORMAL
    data: dict[str, Any] = Field(default_factory=dict)
    submitted_at: datetime | None = None

    _utc = field_validator("submitted_at")(_as_utc)


class JobResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: UUID
    status: JobStatus
    data: dict[str, Any] = Field(default_factory=dict)
    processed_at: datetime

    _utc = field_validator("processed_at")(_as_utc)

    @property
    def error(self) -> str | None:
        """The reason of a PROCESSED_ERROR / TIMED_OUT result."""
        return self.data.get("error")


# --- handlers -----------------------------------------------------------------------------

# A handler gets the job and returns the result data (a JSON object), or raises.
Handler = Callable[[Job], Mapping[str, Any] | None]
Registry = Mapping[str, Handler]

# Processor name -> "module:factory"; factory(settings) returns that processor's registry.
# Imported lazily so a processor's upstream client is only built where it runs.
PROCESSORS: dict[str, str] = {"payments": "tasks.payments:registry"}


class UnknownProcessorError(ValueError):
    pass


def check_processor(processor: str) -> str:
    """Refuse a processor name nobody handles, naming the bad value."""
    if processor not in PROCESSORS:
        raise UnknownProcessorError(
            f"processor: {processor!r} is not a known processor (known: {', '.join(sorted(PROCESSORS))})"
        )
    return processor


def processor_registry(processor: str, settings: Settings | None = None) -> dict[str, Handler]:
    """The handlers (by job group) of a known processor."""
    module_name, _, factory = PROCESSORS[check_processor(processor)].partition(":")
    return dict(getattr(importlib.import_module(module_name), factory)(settings))


def _error(job: Job, reason: str, at: datetime) -> JobResult:
    return JobResult(
        job_id=job.id, status=JobStatus.PROCESSED_ERROR, data={"error": reason}, processed_at=at
    )


def _outcome(job: Job, outcome: Mapping[str, Any] | Exception | None, at: datetime) -> JobResult:
    if isinstance(outcome, Exception):
        return _error(job, f"{type(outcome).__name__}: {outcome}", at)
    try:
        # The data as its JSON will carry it: a handler returning a non-mapping, non-string
        # keys or an unserialisable value fails its job here, not the daemon or the flow
        # (which would crash again on the redelivery).
        data = to_jsonable_python(dict(outcome or {}))
        return JobResult(job_id=job.id, status=JobStatus.PROCESSED_OK, data=data, processed_at=at)
    except Exception as error:
        return _error(job, f"handler returned bad data: {type(error).__name__}: {error}", at)


def _run_one(handler: Handler, job: Job) -> Mapping[str, Any] | Exception | None:
    try:
        return handler(job)
    except Exception as error:  # a handler's failure is the job's result, never the daemon's
        return error


def process_jobs(
    jobs: Sequence[Job], registry: Registry, clock: Callable[[], datetime] = utcnow
) -> list[JobResult]:
    """One result per job, in order; used by the processor daemon and the SLOW flow.

    An unknown group or a handler exception gives PROCESSED_ERROR with the reason. A
    handler with a `batch(jobs) -> [data | Exception]` method gets all the jobs of its
    group at once (one upstream request for many jobs: the point of micro-batching).
    """
    results: list[JobResult | None] = [None] * len(jobs)
    by_group: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_group.setdefault(job.group, []).append(i)
    for group, indexes in by_group.items():
        handler = registry.get(group)
        if handler is None:
            known = ", ".join(sorted(registry)) or "none"
            at = clock()
            for i in indexes:
                reason = (
                    f"unknown group {group!r} for processor {jobs[i].processor!r} (known: {known})"
                )
                results[i] = _error(jobs[i], reason, at)
            continue
        batch = getattr(handler, "batch", None)
        if batch is not None:
            try:
                outcomes = list(batch([jobs[i] for i in indexes]))
                if len(outcomes) != len(indexes):
                    raise RuntimeError(f"batch handler of {group!r} returned {len(outcomes)} "
                                       f"outcomes for {len(indexes)} jobs")  # fmt: skip
            except Exception as error:
                outcomes = [error] * len(indexes)
            at = clock()
            for i, outcome in zip(indexes, outcomes, strict=True):
                results[i] = _outcome(jobs[i], outcome, at)
        else:
            for i in indexes:
                outcome = _run_one(handler, jobs[i])
                results[i] = _outcome(jobs[i], outcome, clock())
    return results  # type: ignore[return-value]


def process_job(job: Job, registry: Registry, clock: Callable[[], datetime] = utcnow) -> JobResult:
    return process_jobs([job], registry, clock)[0]


def timed_out(job_id: UUID, reason: str, clock: Callable[[], datetime] = utcnow) -> JobResult:
    return JobResult(
        job_id=job_id, status=JobStatus.TIMED_OUT, data={"error": reason}, processed_at=clock()
    )


# --- parsing job messages -----------------------------------------------------------------


# The old name, still caught by stream_workers/jobs.py.
BadJobMessage = InvalidRecord


def parse_job(
    raw: bytes | None, processor: str, priority: Priority, key: bytes | None = None
) -> Job:
    """A job read from `jobs.<processor>.<priority>` (`key`: the message key, if any).

    The topic names the processor and the priority: a message may leave them out, but a
    message that contradicts its topic is refused (it would be processed at the wrong rank).
    The id is required (a default one would differ on each redelivery, defeating the
    idempotency by job id), and a message key, when present, must be that id.
    """
    if raw is None:
        raise InvalidRecord("empty message (null value)")
    try:
        payload = decode_json(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidRecord(f"not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise InvalidRecord(f"not a JSON object: {type(payload).__name__}")
    if payload.get("id") is None:
        raise InvalidRecord("missing id")
    payload.setdefault("processor", processor)
    payload.setdefault("priority", priority.value)
    try:
        job = Job.model_validate(payload)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidRecord(f"invalid job: {problems}") from error
    if job.processor != processor:
        raise InvalidRecord(f"job for processor {job.processor!r} on a {processor!r} topic")
    if job.priority != priority:
        raise InvalidRecord(f"{job.priority.value} job on the {priority.value} topic")
    if key is not None and key.decode("utf-8", "replace").strip().lower() != str(job.id):
        raise InvalidRecord(f"message key {key!r} is not the job id {job.id}")
    return job


def parse_result(raw: bytes | None) -> JobResult:
    return JobResult.model_validate_json(raw or b"null")


# --- frames for the SLOW job ledger (DuckDB) ----------------------------------------------

LEDGER_SCHEMA = {
    "job_id": pl.String,
    "processor": pl.String,
    "job_group": pl.String,
    "priority": pl.String,
    "data": pl.String,
    "submitted_at": pl.Datetime("us", "UTC"),
    "topic": pl.String,
    "kafka_partition": pl.Int32,
    "kafka_offset": pl.Int64,
}
RESULTS_SCHEMA = {
    "job_id": pl.String,
    "status": pl.String,
    "result_data": pl.String,
    "processed_at": pl.Datetime("us", "UTC"),
}


def ledger_frame(
    records: Sequence[RecordT], processor: str, priority: Priority = Priority.SLOW
) -> tuple[pl.DataFrame, list[tuple[RecordT, str]]]:
    """Job ledger rows for the records that are valid jobs, and (record, reason) for the rest."""
    rows: list[dict[str, Any]] = []
    rejects: list[tuple[RecordT, str]] = []
    for record in records:
        try:
            job = parse_job(record.value, processor, priority, record.key)
        except InvalidRecord as error:
            rejects.append((record, str(error)))
            continue
        rows.append(
            {
                "job_id": str(job.id),
                "processor": job.processor,
                "job_group": job.group,
                "priority": job.priority.value,
                "data": json.dumps(job.data, separators=(",", ":")),
                "submitted_at": job.submitted_at,
                "topic": record.topic,
                "kafka_partition": record.partition,
                "kafka_offset": record.offset,
            }
        )
    return pl.DataFrame(rows, schema=LEDGER_SCHEMA), rejects


def results_frame(results: Sequence[JobResult]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "job_id": [str(r.job_id) for r in results],
            "status": [r.status.value for r in results],
            "result_data": [json.dumps(r.data, separators=(",", ":")) for r in results],
            "processed_at": [r.processed_at for r in results],
        },
        schema=RESULTS_SCHEMA,
    )


def job_from_ledger(row: Sequence[Any]) -> Job:
    """A Job from a `next_waiting_jobs` row."""
    job_id, processor, group, priority, data, submitted_at = row
    return Job(
        id=job_id,
        processor=processor,
        group=group,
        priority=priority,
        data=decode_json(data),
        submitted_at=submitted_at,
    )
