"""Words: the sharded word count deployment over the Shakespeare corpus (or the test sample)."""

from __future__ import annotations

from pathlib import Path

from tasks.warehouse import connect, run_sql

ORDER = 50
ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "corpus" / "shakespeare.txt"  # `python -m sources shakespeare`
SAMPLE = ROOT / "tests" / "data" / "words"  # committed excerpts: no download needed


def batch(ctx) -> None:
    # The full corpus when it was built, else the committed sample: the demo stays offline.
    corpus = CORPUS if CORPUS.is_file() else SAMPLE
    ctx.run_deployment(
        "word_count/word-count",
        {"corpus": str(corpus), "shards": 3, "words": ["more", "love", "death"]},
    )


def summarize(ctx) -> None:
    con = connect(ctx.settings, read_only=True)
    try:
        latest = run_sql(con, "words/latest_run").fetchone()
        if latest is None:
            return
        run_id, corpus, shards, tokens, distinct, shard_seconds, total = latest
        ctx.add("words", "corpus", Path(corpus).name)
        ctx.add("words", "tokens / distinct words", f"{tokens:,} / {distinct:,}")
        seconds = ", ".join(f"{s:.2f}" for s in shard_seconds)
        ctx.add("words", f"{shards} shard timings (s) / whole run (s)", f"{seconds} / {total:.2f}")
        top = run_sql(con, "words/top_words", {"run_id": run_id, "limit": 5}).fetchall()
        ctx.add("words", "top 5 words", ", ".join(f"{w} {c:,}" for w, c, _ in top))
    finally:
        con.close()
