"""The word_count flow under the real Prefect API (the session harness) and a real DuckDB file."""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.word_count import RunInfo, join_shards, word_count
from tasks.warehouse import connect
from tasks.words import (
    WordCountRequest,
    as_counter,
    count_shard,
    decode,
    plan_shards,
    reference_counts,
    resolve_corpus,
)
from tests.helpers import artifacts

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "words"


def sample_reference() -> Counter[str]:
    return reference_counts(decode(f.read_bytes()) for f in sorted(SAMPLE.glob("*.txt")))


def warehouse_counts(settings, run_id: str) -> Counter[str]:
    con = connect(settings, read_only=True)
    try:
        rows = con.execute(
            "SELECT word, count FROM word_counts WHERE run_id = ?", [run_id]
        ).fetchall()
    finally:
        con.close()
    return Counter(dict(rows))


def run_row(settings, run_id: str) -> dict:
    con = connect(settings, read_only=True)
    try:
        cursor = con.execute("SELECT * FROM word_count_runs WHERE run_id = ?", [run_id])
        names = [d[0] for d in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))
    finally:
        con.close()


def test_flow_writes_tables_and_artifacts(prefect_api, settings):
    reference = sample_reference()
    summary = word_count(str(SAMPLE), shards=3, words=["More,", "Hamlet", "zounds-not-there"])

    assert summary["tokens"] == summary["total_tokens"] == sum(reference.values())
    assert summary["distinct_words"] == len(reference)
    assert summary["words"] == {
        "more": reference["more"], "hamlet": reference["hamlet"], "zounds-not-there": 0,
    }  # fmt: skip
    assert warehouse_counts(settings, summary["run_id"]) == reference

    row = run_row(settings, summary["run_id"])
    assert row["corpus"] == str(SAMPLE)
    assert row["files"] == [str(f) for f in sorted(SAMPLE.glob("*.txt"))]
    assert row["corpus_bytes"] == sum(f.stat().st_size for f in SAMPLE.glob("*.txt"))
    assert row["shards"] == 3 and row["task_runner"] == "threads"
    assert row["tokens"] == sum(reference.values()) == sum(row["shard_tokens"])
    assert row["distinct_words"] == len(reference)
    assert len(row["shard_seconds"]) == 3 and all(s > 0 for s in row["shard_seconds"])
    assert sum(row["shard_bytes"]) == row["corpus_bytes"]
    assert 0 < row["count_seconds"] <= row["total_seconds"]
    # On the default thread runner every shard is counted in this process.
    assert set(summary["shard_workers"]) == {f"{socket.gethostname()}:{os.getpid()}"}

    top = [a for a in artifacts("word-count") if summary["run_id"] in a["description"]]
    assert len(top) == 1
    table = json.loads(top[0]["data"])
    expected_top = sorted(reference.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert [(r["word"], r["count"]) for r in table if r["list"] == "top"] == expected_top
    assert [(r["word"], r["count"]) for r in table if r["list"] == "requested"] == [
        ("more", reference["more"]), ("hamlet", reference["hamlet"]), ("zounds-not-there", 0),
    ]  # fmt: skip
    assert table[0]["rank"] == 1 and table[-1]["rank"] is None
    shards = [a for a in artifacts("word-count-shards") if summary["run_id"] in a["description"]]
    assert [r["tokens"] for r in json.loads(shards[0]["data"])] == row["shard_tokens"]


def test_counts_are_the_same_for_any_shard_count(prefect_api, settings):
    # Every count 1..8 is covered without Prefect in tests/unit/test_words.py.
    reference = sample_reference()
    runs = {n: word_count(str(SAMPLE), shards=n)["run_id"] for n in (1, 2, 5, 8)}
    for n, run_id in runs.items():
        assert warehouse_counts(settings, run_id) == reference, f"shards={n}"
        assert len(run_row(settings, run_id)["shard_tokens"]) == n


def test_join_is_exactly_the_sum_of_the_shard_tables(prefect_api, settings):
    files = resolve_corpus(str(SAMPLE))
    counted = [count_shard(s, i) for i, s in enumerate(plan_shards(files, 4))]
    request = WordCountRequest(str(SAMPLE), tuple(map(str, files)), 4, ("the",))
    now = time.perf_counter()
    summary = join_shards.fn(RunInfo("join-test", request, "threads", now, now), counted)

    expected: Counter[str] = Counter()
    for shard in counted:
        expected.update(as_counter(shard.counts))
    assert warehouse_counts(settings, "join-test") == expected
    assert summary["tokens"] == summary["total_tokens"] == sum(c.tokens for c in counted)
    # A retry of the same flow run (same run_id) after its commit replaces its rows.
    again = join_shards.fn(RunInfo("join-test", request, "threads", now, now), counted)
    assert again["total_tokens"] == summary["total_tokens"]
    assert warehouse_counts(settings, "join-test") == expected
    # Every shard holds some of the most common words: the sum really adds across shards.
    assert all(as_counter(c.counts)["the"] > 0 for c in counted)
    assert summary["words"] == {"the": sum(as_counter(c.counts)["the"] for c in counted)}


def test_unicode_and_invalid_utf8_corpus(prefect_api, settings, tmp_path):
    text = (
        "«Bonjour» CAFÉ café\xa0naïve—Really\nİstanbul ΟΔΟΣ. don't 'Tis\n"
        "tab\there\u3000wide\x85nel\n"
    ) * 40
    data = text.encode() + b"bad \xff\xfe bytes \xe2\x82\nend"
    (tmp_path / "mixed.txt").write_bytes(data)
    summary = word_count(str(tmp_path / "*.txt"), shards=5, words=["café", "tis"])
    reference = reference_counts([decode(data)])
    assert warehouse_counts(settings, summary["run_id"]) == reference
    assert summary["words"] == {"café": 80, "tis": 40}
    assert reference["\ufffd\ufffd"] == 1


def test_empty_corpus_gives_an_empty_valid_result(prefect_api, settings, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    summary = word_count(str(tmp_path / "empty.txt"), shards=2, words=["more"])
    assert summary["tokens"] == 0 and summary["distinct_words"] == 0
    assert summary["words"] == {"more": 0} and summary["top"] == []
    row = run_row(settings, summary["run_id"])
    assert row["shard_tokens"] == [0, 0] and row["corpus_bytes"] == 0
    assert warehouse_counts(settings, summary["run_id"]) == Counter()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corpus": "no/such/dir/*.txt"}, "corpus: 'no/such/dir/\\*.txt' matches no file"),
        ({"corpus": "no-such-file.txt"}, "corpus: 'no-such-file.txt' matches no file"),
        ({"corpus": str(SAMPLE), "shards": 0}, "shards: 0 must be"),
        ({"corpus": str(SAMPLE), "words": ["two words"]}, "words: 'two words' is not one word"),
    ],
)
def test_bad_parameters_are_refused_before_any_write(prefect_api, settings, kwargs, message):
    with pytest.raises(ValueError, match=message):
        word_count(**kwargs)
    assert not settings.warehouse_path.exists()


def test_an_unreadable_file_is_refused_before_any_write(prefect_api, settings, tmp_path):
    (tmp_path / "ok.txt").write_text("fine words")
    (tmp_path / "broken.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"corpus: cannot read '.*broken\.txt'"):
        word_count(str(tmp_path))
    assert not settings.warehouse_path.exists()
