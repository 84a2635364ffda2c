"""SLOW job batches: load `jobs.<processor>.slow` into the DuckDB job ledger exactly once,
then, while the processor daemon has no REALTIME or NORMAL job pending, run waiting jobs
in batches through the same handlers, recording results in the ledger and publishing them
to `job-results.<processor>`.

Idempotent by job id: a job with a result in the ledger is never run again. Results are
recorded in the ledger before they are published (an outbox): a run that stopped in
between publishes, on the next run, exactly the results not yet on the topic.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import duckdb
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.job_queues import PendingWork, result_ids_since
from tasks.jobs import (
    Handler,
    JobResult,
    JobStatus,
    Priority,
    check_processor,
    job_from_ledger,
    ledger_frame,
    process_jobs,
    processor_registry,
    results_frame,
)
from tasks.kafka import decode_json, ensure_topics, job_topics, make_producer, send_to_dlq
from tasks.settings import Settings, get_settings
from tasks.warehouse import LoadResult, load_topic, run_sql, writing

DEFAULT_MAX_JOBS = 1000  # at the default upstream rate (1000/s) a run takes seconds


def validate_parameters(processor: str, max_jobs: int) -> None:
    """Refuse bad parameters before anything is written, naming the bad value."""
    check_processor(processor)
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
        raise ValueError(f"max_jobs: {max_jobs!r} is not an integer >= 1")


@task(cache_policy=NO_CACHE)
def load_slow_jobs(
    con: duckdb.DuckDBPyConnection, processor: str, settings: Settings
) -> LoadResult:
    """New SLOW jobs into the ledger; malformed ones to `load_rejects` and the topic's DLQ."""
    producer = make_producer(settings)

    def to_frame(records):
        frame, rejects = ledger_frame(records, processor)
        for record, reason in rejects:
            send_to_dlq(producer, record, reason, settings)
        producer.flush()  # before the loader commits the offsets: never lost, maybe twice
        return frame, rejects

    try:
        return load_topic(
            con,
            settings.jobs_topic(processor, Priority.SLOW.value),
            insert_sql="jobs/insert_job_ledger",
            to_frame=to_frame,
            settings=settings,
        )
    finally:
        producer.close()


def _publish(producer, topic: str, results: list[JobResult]) -> None:
    for result in results:
        producer.send(topic, key=str(result.job_id), value=result)
    producer.flush()


@task(cache_policy=NO_CACHE)
def publish_unpublished(con, processor: str, producer, settings: Settings) -> int:
    """Publish results a stopped run recorded but may not have published (none normally)."""
    rows = run_sql(con, "jobs/unpublished_job_results", {"processor": processor}).fetchall()
    if not rows:
        return 0
    results = [
        JobResult(job_id=job_id, status=status, data=decode_json(data), processed_at=at)
        for job_id, status, data, at in rows
    ]
    # Some may be on the topic already: publish only the others.
    since = min(r.processed_at for r in results) - timedelta(minutes=5)
    on_topic = result_ids_since(processor, since, settings)
    missing = [r for r in results if str(r.job_id) not in on_topic]
    _publish(producer, settings.job_results_topic(processor), missing)
    run_sql(con, "jobs/mark_job_results_published", {"processor": processor})
    return len(missing)


@task(cache_policy=NO_CACHE)
def run_slow_batch(
    con, processor: str, registry: dict[str, Handler], limit: int, producer, settings: Settings
) -> list[JobResult]:
    """Run up to `limit` waiting jobs; record the results, then publish them."""
    rows = run_sql(con, "jobs/next_waiting_jobs", {"processor": processor, "limit": limit})
    jobs = [job_from_ledger(row) for row in rows.fetchall()]
    if not jobs:
        return []
    results = process_jobs(jobs, registry)
    con.begin()
    try:
        con.register("results", results_frame(results))
        run_sql(con, "jobs/record_job_results")
        con.unregister("results")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    _publish(producer, settings.job_results_topic(processor), results)
    run_sql(con, "jobs/mark_job_results_published", {"processor": processor})
    return results


def status_table(con, processor: str) -> list[dict[str, Any]]:
    rows = run_sql(con, "jobs/job_status_summary", {"processor": processor}).fetchall()
    table = [
        {
            "status": status,
            "jobs": jobs,
            "oldest job": oldest_id,
            "oldest submitted_at": oldest_at.isoformat() if oldest_at else None,
        }
        for status, jobs, oldest_id, oldest_at in rows
    ]
    if not any(row["status"] == JobStatus.QUEUED for row in table):
        table.insert(0, {"status": "QUEUED", "jobs": 0, "oldest job": None,
                         "oldest submitted_at": None})  # fmt: skip
    return table


@flow(name="slow_job_batches")
def slow_job_batches(processor: str = "payments", max_jobs: int = DEFAULT_MAX_JOBS) -> dict:
    """Load SLOW jobs and run up to `max_jobs` of them while REALTIME/NORMAL are idle."""
    validate_parameters(processor, max_jobs)
    settings = get_settings()
    logger = get_run_logger()
    ensure_topics(job_topics(processor, settings), settings)
    registry = processor_registry(processor, settings)
    producer = make_producer(settings)
    pending_work = PendingWork(processor, settings)
    summary: dict[str, Any] = {"processor": processor, "loaded": 0, "rejected": 0,
                               "processed": 0, "republished": 0, "yielded_to": {}}  # fmt: skip
    try:
        with writing(settings) as con:
            run_sql(con, "jobs/create_job_ledger")
            summary["republished"] = publish_unpublished(con, processor, producer, settings)
            loaded = load_slow_jobs(con, processor, settings)
            summary["loaded"], summary["rejected"] = loaded.rows, loaded.rejected
            while summary["processed"] < max_jobs:
                pending = {p.value: n for p, n in pending_work.pending().items() if n}
                if pending:
                    summary["yielded_to"] = pending
                    logger.info("REALTIME/NORMAL jobs pending %s: SLOW batches wait", pending)
                    break
                limit = min(settings.jobs_slow_batch_size, max_jobs - summary["processed"])
                results = run_slow_batch(con, processor, registry, limit, producer, settings)
                if not results:
                    break
                summary["processed"] += len(results)
            table = status_table(con, processor)
    finally:
        pending_work.close()
        producer.close()
    summary["by_status"] = {row["status"]: row["jobs"] for row in table}
    waiting = next(row for row in table if row["status"] == JobStatus.QUEUED)
    summary["oldest_waiting"] = waiting["oldest job"]
    create_table_artifact(
        key=f"slow-jobs-{processor}",
        table=table,
        description=(
            f"SLOW job ledger of `{processor}`: jobs per status and the oldest of each "
            f"(QUEUED: the oldest waiting job). This run loaded {summary['loaded']} and "
            f"processed {summary['processed']}."
        ),
    )
    logger.info("slow jobs: %s", summary)
    return summary
