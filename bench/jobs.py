"""Benchmark of the priority job queues (`.venv/bin/python bench/jobs.py [--help]`).

Against the real broker, with the processor daemon as a subprocess (its own topics, a temp
upstream ledger), it measures:
  1. the REALTIME round trip (submit -> result) p50 / p99 with the processor idle
     (the baseline), then with a backlog of NORMAL jobs waiting (default 100,000);
  2. NORMAL throughput (submit -> every result) with the submitter batching, against
     batch size 1 (the baseline).
The upstream's token bucket is set high (--upstream-rate) so the figures show the queues,
not the simulated provider's rate limit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="REALTIME round trips per case")
    parser.add_argument("--backlog", type=int, default=100_000, help="NORMAL jobs waiting")
    parser.add_argument("--normal-jobs", type=int, default=20_000, help="jobs, batching on")
    parser.add_argument("--single-jobs", type=int, default=1_000, help="jobs, batch size 1")
    parser.add_argument(
        "--realtime-gap-ms", type=float, default=20, help="mean pause between REALTIME jobs"
    )
    parser.add_argument("--upstream-rate", type=float, default=1e6, help="upstream calls/s")
    args = parser.parse_args(argv)

    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    os.environ.update(
        JOBS_TOPIC_PREFIX=f"bench-jobs-{run}",
        JOB_RESULTS_TOPIC_PREFIX=f"bench-job-results-{run}",
        WAREHOUSE_PATH=str(workdir / "warehouse.duckdb"),
        PAYMENTS_UPSTREAM_RATE_PER_S=str(args.upstream_rate),
        PAYMENTS_UPSTREAM_BURST="1000",
    )
    from tasks.job_queues import PendingWork
    from tasks.job_submitter import Submitter
    from tasks.jobs import Job, JobStatus, Priority
    from tasks.kafka import ensure_topics, job_topics, make_admin, make_producer
    from tasks.settings import get_settings

    settings = get_settings()
    processor = "payments"
    topics = job_topics(processor, settings)
    ensure_topics(topics, settings)
    log = (workdir / "daemon.log").open("w")

    def start_daemon() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_workers", "jobs", "--processor", processor],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop_daemon(daemon: subprocess.Popen) -> int:
        daemon.send_signal(signal.SIGTERM)
        return daemon.wait(60)

    daemon = start_daemon()
    probe = PendingWork(processor, settings)

    def job(amount: str = "1.00") -> Job:
        return Job(processor=processor, group="payment-submit", data={"amount": amount})

    rng = random.Random(6)

    def realtime_round_trips(submitter: Submitter, n: int) -> list[float]:
        took = []
        for _ in range(n):
            started = time.perf_counter()
            result = submitter.submit(job(), Priority.REALTIME)
            took.append((time.perf_counter() - started) * 1000)
            assert result.status is JobStatus.PROCESSED_OK, result
            # A random gap: REALTIME jobs land at any moment of a NORMAL slice, and the
            # daemon gets room for NORMAL work in between (back to back, NORMAL starves).
            time.sleep(rng.uniform(0, 2 * args.realtime_gap_ms / 1000))
        return took

    def normal_throughput(submitter: Submitter, n: int) -> float:
        started = time.perf_counter()
        futures = [submitter.submit_async(job("2.00"), Priority.NORMAL) for _ in range(n)]
        done, not_done = wait(futures, timeout=600)
        elapsed = time.perf_counter() - started
        statuses = {f.result().status for f in done}
        assert not not_done and statuses == {JobStatus.PROCESSED_OK}, statuses
        return n / elapsed

    rows: list[tuple[str, str, str]] = []
    try:
        with Submitter(processor, settings) as submitter:
            realtime_round_trips(submitter, 20)  # warm-up: the daemon joins its group
            idle = realtime_round_trips(submitter, args.samples)
            idle_p50, idle_p99 = percentile(idle, 50), percentile(idle, 99)
            rows += [("REALTIME round trip, idle p50", f"{idle_p50:.1f} ms", "baseline"),
                     ("REALTIME round trip, idle p99", f"{idle_p99:.1f} ms", "baseline")]  # fmt: skip

            batched = normal_throughput(submitter, args.normal_jobs)
        with Submitter(processor, settings, batch_size=1) as single_submitter:
            single = normal_throughput(single_submitter, args.single_jobs)
        rows += [
            ("NORMAL throughput, batch size 1", f"{single:,.0f} jobs/s", "baseline"),
            (f"NORMAL throughput, batches of {settings.jobs_batch_size}",
             f"{batched:,.0f} jobs/s", f"{batched / single:.1f}x"),
        ]  # fmt: skip

        # A NORMAL backlog, produced straight to the topic while the daemon is stopped.
        stop_daemon(daemon)
        producer = make_producer(
            settings, value_serializer=None, linger_ms=20, batch_size=512 * 1024
        )
        normal_topic = settings.jobs_topic(processor, "normal")
        started = time.perf_counter()
        for i in range(args.backlog):
            job_id = str(uuid.uuid4())
            value = json.dumps({"id": job_id, "processor": processor, "group": "payment-submit",
                                "priority": "NORMAL", "data": {"amount": f"{i % 900 + 1}.00"}})  # fmt: skip
            producer.send(normal_topic, key=job_id, value=value.encode())
        producer.flush()
        producer.close()
        produce_s = time.perf_counter() - started
        daemon = start_daemon()
        with Submitter(processor, settings) as submitter:
            realtime_round_trips(submitter, 5)  # the daemon is back in its group
            before = probe.pending()[Priority.NORMAL]
            started = time.perf_counter()
            loaded = realtime_round_trips(submitter, args.samples)
            measured_s = time.perf_counter() - started
        after = probe.pending()[Priority.NORMAL]
        loaded_p50, loaded_p99 = percentile(loaded, 50), percentile(loaded, 99)
        rows += [
            (f"REALTIME round trip, {before:,} NORMAL waiting, p50", f"{loaded_p50:.1f} ms",
             f"{loaded_p50 / idle_p50:.2f}x idle"),
            (f"REALTIME round trip, {before:,} NORMAL waiting, p99", f"{loaded_p99:.1f} ms",
             f"{loaded_p99 / idle_p99:.2f}x idle"),
            ("NORMAL drained meanwhile", f"{(before - after) / measured_s:,.0f} jobs/s",
             f"{after:,} still waiting after"),
        ]  # fmt: skip
        print(f"(backlog of {args.backlog:,} produced in {produce_s:.1f}s; "
              f"REALTIME mean {statistics.mean(loaded):.1f} ms, max {max(loaded):.1f} ms)")  # fmt: skip
    finally:
        probe.close()
        code = stop_daemon(daemon)
        admin = make_admin(settings)
        try:
            admin.delete_topics([t.name for t in topics])
        finally:
            admin.close()
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  {'value':>16}  ratio")
    for what, value, ratio in rows:
        print(f"{what.ljust(width)}  {value:>16}  {ratio}")
    print(f"\naims: REALTIME p99 < 50 ms with the backlog; batching >= 5x batch size 1. "
          f"(daemon exit {code}; log {workdir / 'daemon.log'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
