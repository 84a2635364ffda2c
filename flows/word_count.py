"""The sharded word count: one Prefect task per shard, then a join task that writes DuckDB.

Shards are byte ranges of the corpus cut at line boundaries (`tasks.words.plan_shards`). Each
shard task reads and counts its range on its own (polars, no shared connection) and returns
its table as a polars frame, which pickles, so the same tasks run on threads or on Dask
workers (`WORD_COUNT_TASK_RUNNER`). Only the join task, in the flow's process, writes the
warehouse: it takes the global writer slot (`tasks.warehouse.writing`) and inserts the sum of
the shard tables and the run's row in one transaction.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.settings import Settings, get_settings
from tasks.warehouse import run_sql, writing
from tasks.words import (
    Shard,
    ShardCount,
    WordCountRequest,
    count_shard,
    empty_counts,
    plan_shards,
    validate_request,
)

TOP_WORDS = 20
DASK_MISSING = (
    "WORD_COUNT_TASK_RUNNER=dask needs the optional `dask` extra (prefect-dask), which is not "
    "installed ({error}): pip install -e '.[dask]' (`make install` includes it), or "
    "WORD_COUNT_TASK_RUNNER=threads"
)


@dataclass(frozen=True)
class RunInfo:
    """What the join needs to know about the run besides the shard tables."""

    run_id: str
    request: WordCountRequest
    task_runner: str
    started: float  # time.perf_counter() at the flow's start (same process as the join)
    count_started: float


def shard_task_runner(settings: Settings, shards: int) -> TaskRunner:
    """The task runner the settings choose for the shard tasks."""
    if settings.word_count_task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=shards)
    # Imported here: dask is only loaded by runs that use it, and only installed with the
    # `dask` extra.
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise ImportError(DASK_MISSING.format(error=error)) from error

    if settings.word_count_dask_address:
        return DaskTaskRunner(address=settings.word_count_dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.word_count_dask_workers,
            "processes": settings.word_count_dask_processes,
            "threads_per_worker": 1,
            "dashboard_address": None,  # no fixed port to collide with
        }
    )


@task(name="count-shard", task_run_name="count-shard-{index}", cache_policy=NO_CACHE)
def count_shard_task(shard: Shard, index: int) -> ShardCount:
    """Count one shard (plain function underneath: `tasks.words.count_shard`)."""
    return count_shard(shard, index)


@task(name="join-shards", cache_policy=NO_CACHE)
def join_shards(run: RunInfo, counted: list[ShardCount]) -> dict[str, Any]:
    """Write the sum of the shard tables and the run's row in one transaction; summarize."""
    count_seconds = time.perf_counter() - run.count_started
    counted = sorted(counted, key=lambda s: s.shard)
    frames = [s.counts for s in counted if s.counts.height]
    shard_counts = pl.concat(frames) if frames else empty_counts()
    request = run.request
    shard_tokens = [s.tokens for s in counted]
    with writing() as con:
        run_sql(con, "words/create_word_counts")
        run_sql(con, "words/create_word_count_runs")
        con.begin()
        try:
            # A retry of a run that failed after this commit (same run_id) replaces its rows.
            run_sql(con, "words/delete_run_counts", {"run_id": run.run_id})
            run_sql(con, "words/delete_run", {"run_id": run.run_id})
            con.register("shard_counts", shard_counts)
            run_sql(con, "words/insert_word_counts", {"run_id": run.run_id})
            con.unregister("shard_counts")
            tokens, distinct = run_sql(con, "words/run_totals", {"run_id": run.run_id}).fetchone()
            if tokens != sum(shard_tokens):  # the join must be exactly the sum of the shards
                raise RuntimeError(
                    f"join wrote {tokens} tokens but the shards counted {sum(shard_tokens)}"
                )
            total_seconds = time.perf_counter() - run.started
            run_sql(
                con,
                "words/insert_word_count_run",
                {
                    "run_id": run.run_id,
                    "corpus": request.corpus,
                    "files": list(request.files),
                    "corpus_bytes": sum(s.bytes for s in counted),
                    "shards": request.shards,
                    "task_runner": run.task_runner,
                    "tokens": tokens,
                    "distinct_words": distinct,
                    "shard_bytes": [s.bytes for s in counted],
                    "shard_tokens": shard_tokens,
                    "shard_seconds": [s.seconds for s in counted],
                    "count_seconds": count_seconds,
                    "total_seconds": total_seconds,
                },
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        top = run_sql(con, "words/top_words", {"run_id": run.run_id, "limit": TOP_WORDS})
        top_rows = top.fetchall()
        requested = run_sql(
            con, "words/requested_words", {"run_id": run.run_id, "words": list(request.words)}
        ).fetchall()
    return {
        "run_id": run.run_id,
        "corpus": request.corpus,
        "files": len(request.files),
        "bytes": sum(s.bytes for s in counted),
        "shards": request.shards,
        "task_runner": run.task_runner,
        "tokens": tokens,
        "total_tokens": tokens,  # the documented name; "tokens" kept for existing readers
        "distinct_words": distinct,
        "words": {word: count for word, count, _ in requested},
        "ranks": {word: rank for word, _, rank in requested},
        "top": [[word, count] for word, count, _ in top_rows],
        "shard_tokens": shard_tokens,
        "shard_seconds": [round(s.seconds, 6) for s in counted],
        "shard_workers": [s.worker for s in counted],
        "count_seconds": round(count_seconds, 6),
        "total_seconds": round(total_seconds, 6),
    }


def publish_artifacts(summary: dict[str, Any], counted: list[ShardCount]) -> None:
    """The top words and requested words, and the shard timings, in the Prefect UI."""
    rows = [
        {"list": "top", "rank": rank, "word": word, "count": count}
        for rank, (word, count) in enumerate(summary["top"], start=1)
    ]
    rows += [
        {"list": "requested", "rank": summary["ranks"][word], "word": word, "count": count}
        for word, count in summary["words"].items()
    ]
    create_table_artifact(
        key="word-count",
        table=rows,
        description=(
            f"Run {summary['run_id']}: {summary['tokens']} tokens, "
            f"{summary['distinct_words']} distinct words in {summary['corpus']!r} "
            f"({summary['shards']} shards). Top {TOP_WORDS} words, then the requested ones "
            "(rank empty: not in the corpus)."
        ),
    )
    create_table_artifact(
        key="word-count-shards",
        table=[
            {
                "shard": s.shard,
                "bytes": s.bytes,
                "tokens": s.tokens,
                "distinct words": s.distinct_words,
                "seconds": round(s.seconds, 4),
                "worker": s.worker,
            }
            for s in sorted(counted, key=lambda s: s.shard)
        ],
        description=(
            f"Run {summary['run_id']} on {summary['task_runner']}: shard phase "
            f"{summary['count_seconds']:.3f}s wall, whole run {summary['total_seconds']:.3f}s."
        ),
    )


@flow(name="word_count")
def word_count(corpus: str, shards: int = 3, words: list[str] | None = None) -> dict[str, Any]:
    """Count every word of `corpus` (a file, a folder of *.txt or a glob) in `shards` parallel
    tasks, join into DuckDB `word_counts`/`word_count_runs`; return the run's summary."""
    started = time.perf_counter()
    settings = get_settings()
    logger = get_run_logger()
    # Every parameter is checked before anything is written.
    request = validate_request(corpus, shards, words, settings.word_count_max_shards)
    plan = plan_shards(request.files, request.shards)
    run = RunInfo(
        run_id=str(flow_run.id or uuid.uuid4()),
        request=request,
        task_runner=settings.word_count_task_runner,
        started=started,
        count_started=time.perf_counter(),
    )
    logger.info(
        "%d file(s), %d shards of %s bytes, on %s",
        len(request.files), len(plan), [sum(p.size for p in s) for s in plan], run.task_runner,
    )  # fmt: skip
    with shard_task_runner(settings, request.shards) as runner:
        futures = [
            runner.submit(count_shard_task, {"shard": shard, "index": i})
            for i, shard in enumerate(plan)
        ]
        counted = [future.result() for future in futures]
    summary = join_shards(run, counted)
    publish_artifacts(summary, counted)
    logger.info(
        "run %s: %d tokens, %d distinct words, shards %s s, total %.3f s",
        summary["run_id"], summary["tokens"], summary["distinct_words"],
        summary["shard_seconds"], summary["total_seconds"],
    )  # fmt: skip
    return summary
