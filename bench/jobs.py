"""Benchmark of the priority job queues (`.venv/bin/python bench/jobs.py [--help]`).

Against the real broker, with the processor daemon as a subprocess (its own topics, a temp
upstream ledger), it measures:
  1. the REALTIME round trip p50 / p99 with the processor idle (the baseline), then with a
     backlog of NORMAL jobs waiting (default 100,000); clock: `Submitter.submit()` called ->
     its result returned, in this process. A round trip that does not end PROCESSED_OK
     (timed out, error) is counted as lost and reported with the percentiles; any loss exits 1;
  2. NORMAL throughput with the submitter batching, against batch size 1 (the baseline), the
     same number of jobs on both sides (--normal-jobs); clock: first `submit_async()` ->
     the last result resolved. Every job must end PROCESSED_OK (exit 1 otherwise).
The upstream's token bucket is set high (--upstream-rate) so the figures show the queues,
not the simulated provider's rate limit. The daemon must exit 0 on SIGTERM (exit 1 otherwise).
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
from collections import Counter
from concurrent.futures import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# The same count on both sides. Batch size 1 runs at ~400-900 jobs/s on the 2-core dev box,
# so 10,000 keeps the baseline at 11-25 s (20,000 would double it).
NORMAL_JOBS = 10_000

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAILED: {message}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="REALTIME round trips per case")
    parser.add_argument("--backlog", type=int, default=100_000, help="NORMAL jobs waiting")
    parser.add_argument("--normal-jobs", type=int, default=NORMAL_JOBS,
                        help=f"NORMAL jobs of each throughput case ({NORMAL_JOBS:,})")  # fmt: skip
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

    def realtime_round_trips(submitter: Submitter, n: int, case: str) -> list[float]:
        """Round trips in ms of the jobs that ended PROCESSED_OK; the others are lost."""
        took, lost = [], Counter()
        for _ in range(n):
            started = time.perf_counter()
            result = submitter.submit(job(), Priority.REALTIME)
            if result.status is JobStatus.PROCESSED_OK:
                took.append((time.perf_counter() - started) * 1000)
            else:
                lost[result.status.name] += 1
            # A random gap: REALTIME jobs land at any moment of a NORMAL slice, and the
            # daemon gets room for NORMAL work in between (back to back, NORMAL starves).
            time.sleep(rng.uniform(0, 2 * args.realtime_gap_ms / 1000))
        if lost:
            fail(f"{case}: {sum(lost.values())} of {n} REALTIME round trips lost ({dict(lost)})")
        if not took:
            raise SystemExit(f"{case}: no REALTIME round trip ended PROCESSED_OK")
        return took

    def warm_up(submitter: Submitter, n: int) -> None:
        """REALTIME jobs until `n` in a row end PROCESSED_OK: the daemon is in its groups."""
        in_a_row, deadline = 0, time.monotonic() + 120
        while in_a_row < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not answer within 120 s (log {workdir})")
            ok = submitter.submit(job(), Priority.REALTIME).status is JobStatus.PROCESSED_OK
            in_a_row = in_a_row + 1 if ok else 0

    def normal_throughput(submitter: Submitter, n: int, case: str) -> float:
        started = time.perf_counter()
        futures = [submitter.submit_async(job("2.00"), Priority.NORMAL) for _ in range(n)]
        done, not_done = wait(futures, timeout=600)
        elapsed = time.perf_counter() - started
        statuses = Counter(f.result().status.name for f in done)
        if not_done or set(statuses) != {"PROCESSED_OK"}:
            fail(f"{case}: of {n} NORMAL jobs {len(not_done)} unresolved after 600 s, "
                 f"statuses {dict(statuses)}")  # fmt: skip
        return n / elapsed

    rows: list[tuple[str, str, str]] = []
    try:
        with Submitter(processor, settings) as submitter:
            warm_up(submitter, 20)
            idle = realtime_round_trips(submitter, args.samples, "idle")
            idle_p50, idle_p99 = percentile(idle, 50), percentile(idle, 99)
            over = f"over {len(idle)} of {args.samples}, {args.samples - len(idle)} lost"
            rows += [(f"REALTIME round trip, idle p50 ({over})", f"{idle_p50:.1f} ms", "baseline"),
                     (f"REALTIME round trip, idle p99 ({over})", f"{idle_p99:.1f} ms", "baseline")]  # fmt: skip

            batched = normal_throughput(submitter, args.normal_jobs, "batched")
        with Submitter(processor, settings, batch_size=1) as single_submitter:
            single = normal_throughput(single_submitter, args.normal_jobs, "batch size 1")
        rows += [
            (f"NORMAL throughput, {args.normal_jobs:,} jobs, batch size 1",
             f"{single:,.0f} jobs/s", "baseline"),
            (f"NORMAL throughput, {args.normal_jobs:,} jobs, batches of {settings.jobs_batch_size}",
             f"{batched:,.0f} jobs/s", f"{batched / single:.1f}x batch size 1"),
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
            warm_up(submitter, 5)
            before = probe.pending()[Priority.NORMAL]
            started = time.perf_counter()
            loaded = realtime_round_trips(submitter, args.samples, "with the backlog")
            measured_s = time.perf_counter() - started
        after = probe.pending()[Priority.NORMAL]
        loaded_p50, loaded_p99 = percentile(loaded, 50), percentile(loaded, 99)
        over = f"over {len(loaded)} of {args.samples}, {args.samples - len(loaded)} lost"
        rows += [
            (f"REALTIME round trip, {before:,} NORMAL waiting, p50 ({over})",
             f"{loaded_p50:.1f} ms", f"{loaded_p50 / idle_p50:.2f}x idle p50"),
            (f"REALTIME round trip, {before:,} NORMAL waiting, p99 ({over})",
             f"{loaded_p99:.1f} ms", f"{loaded_p99 / idle_p99:.2f}x idle p99"),
            ("NORMAL drained meanwhile (pending before - after, over the REALTIME run)",
             f"{(before - after) / measured_s:,.0f} jobs/s",
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
    print("\nclocks: REALTIME = submit() called -> result returned; NORMAL throughput = first "
          "submit_async() -> last result resolved (same job count on both sides)")  # fmt: skip
    print(f"aims: REALTIME p99 < 50 ms with the backlog; batching >= 5x batch size 1. "
          f"(daemon exit {code}; log {workdir / 'daemon.log'})")  # fmt: skip
    if code != 0:
        fail(f"the daemon exited {code} on SIGTERM (expected 0; log {workdir / 'daemon.log'})")
    if failures:
        print(f"\nFAILED ({len(failures)}):", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
