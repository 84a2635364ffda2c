"""Jobs step: the payments processor daemon, jobs of each priority through the Submitter,
and the SLOW batches flow run through its deployment."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import wait

from tasks.job_submitter import Submitter
from tasks.jobs import Job, JobStatus, Priority
from tasks.kafka import ensure_topics, job_topics
from tasks.warehouse import connect, run_sql

PROCESSOR = "payments"
REALTIME_JOBS, NORMAL_JOBS, SLOW_JOBS = 20, 500, 100
_seen: dict[str, object] = {}


def _payment(i: int) -> Job:
    return Job(processor=PROCESSOR, group="payment-submit",
               data={"amount": f"{i % 90 + 10}.{i % 100:02d}", "currency": "EUR",
                     "reference": f"demo-{i}"})  # fmt: skip


def prepare(ctx) -> None:
    ensure_topics(job_topics(PROCESSOR, ctx.settings), ctx.settings)
    ctx.start_worker("jobs", "--processor", PROCESSOR)


def produce(ctx) -> None:
    with Submitter(PROCESSOR, ctx.settings) as submitter:
        # SLOW first: they wait for the flow; NORMAL in batches; REALTIME one by one.
        for i in range(SLOW_JOBS):
            submitter.submit_async(_payment(i), Priority.SLOW)
        normal = [submitter.submit_async(_payment(i), Priority.NORMAL) for i in range(NORMAL_JOBS)]
        took = []
        for i in range(REALTIME_JOBS):
            started = time.perf_counter()
            result = submitter.submit(_payment(i), Priority.REALTIME)
            took.append((time.perf_counter() - started) * 1000)
            _seen.setdefault("realtime", []).append(result.status)
        wait(normal, timeout=120)
        _seen["normal"] = [f.result().status for f in normal if f.done()]
        _seen["realtime_ms"] = statistics.median(took)
        # Closing here: the SLOW futures end TIMED_OUT for this submitter; their results
        # come from the flow, into the ledger and onto job-results.payments.


def batch(ctx) -> None:
    ctx.run_deployment(
        "slow_job_batches/slow-job-batches", {"processor": PROCESSOR, "max_jobs": 1000}
    )


def summarize(ctx) -> None:
    rt, normal = _seen.get("realtime", []), _seen.get("normal", [])
    ok = JobStatus.PROCESSED_OK
    ctx.add("jobs", "REALTIME jobs OK (daemon)", f"{rt.count(ok)}/{REALTIME_JOBS}")
    ctx.add("jobs", "REALTIME round trip p50", f"{_seen.get('realtime_ms', 0):.1f} ms")
    ctx.add("jobs", "NORMAL jobs OK (daemon)", f"{normal.count(ok)}/{NORMAL_JOBS}")
    con = connect(ctx.settings, read_only=True)
    try:
        rows = run_sql(con, "jobs/job_status_summary", {"processor": PROCESSOR}).fetchall()
    finally:
        con.close()
    for status, jobs, *_ in rows:
        ctx.add("jobs", f"SLOW job ledger: {status}", jobs)
