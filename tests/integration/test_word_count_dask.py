"""Scale-out: the word_count shard tasks on a local two-worker Dask cluster (prefect-dask)."""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import pytest

from flows.word_count import word_count
from tasks.settings import get_settings
from tasks.warehouse import connect
from tasks.words import decode, reference_counts

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "words"


def test_shards_on_a_two_worker_dask_cluster_give_the_same_counts(
    prefect_api, settings, monkeypatch
):
    monkeypatch.setenv("WORD_COUNT_TASK_RUNNER", "dask")
    monkeypatch.setenv("WORD_COUNT_DASK_WORKERS", "2")
    monkeypatch.setenv("WORD_COUNT_DASK_PROCESSES", "true")  # real worker processes
    get_settings.cache_clear()

    summary = word_count(str(SAMPLE), shards=4, words=["more"])

    reference = reference_counts(decode(f.read_bytes()) for f in sorted(SAMPLE.glob("*.txt")))
    con = connect(settings, read_only=True)
    try:
        rows = con.execute(
            "SELECT word, count FROM word_counts WHERE run_id = ?", [summary["run_id"]]
        ).fetchall()
        runner, shard_tokens = con.execute(
            "SELECT task_runner, shard_tokens FROM word_count_runs WHERE run_id = ?",
            [summary["run_id"]],
        ).fetchone()
    finally:
        con.close()
    assert Counter(dict(rows)) == reference
    assert runner == "dask" and summary["task_runner"] == "dask"
    assert len(shard_tokens) == 4 and sum(shard_tokens) == sum(reference.values())
    assert summary["words"] == {"more": reference["more"]}
    # The shards really ran in the cluster's worker processes, not in this one.
    workers = set(summary["shard_workers"])
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers
    assert 1 <= len(workers) <= 2
