"""Benchmark of the sharded word count (`.venv/bin/python bench/word_count.py [--help]`).

On the ~45.5 MB Shakespeare corpus (built with `python -m sources shakespeare` if missing), in
one run, each case in its own fresh process (so its peak memory is its own):
  1. baseline, the plain method: read, split into a Python list, loop counting ONE word;
  2. `collections.Counter(text.lower().split())` (all words, but no punctuation stripping);
  3. the pure-Python reference tokenizer (`tasks.words.tokenize`) + Counter;
  4. our shard counting alone (`tasks.words.count_shard` on threads), shards 1 and 2;
  5. the whole `word_count` flow under an ephemeral Prefect API (prefect_test_harness, started
     before the clock), on two clocks: wall = the `word_count()` call until it returns
     (Prefect's run setup and teardown, the shard tasks, the DuckDB join); flow body = the
     flow function's first line until the join's commit (`total_seconds`: Prefect's run
     setup before the body and its teardown after it are NOT included).
Each case runs --repeat times; the best and the median are printed with the ratio
baseline best / case best ("x vs baseline") and peak RSS. The reference tokenizer, ours and
the flow must agree exactly on the count of the probe word and on the distinct words: if not,
the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE_WORD = "more"


def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the cases, each run in a child process ------------------------------------------------


def case_baseline(corpus: Path, _shards: int) -> dict:
    with open(corpus, encoding="utf-8", errors="replace") as handle:
        words = handle.read().split()
    count = 0
    for word in words:  # the plain way: one word, a Python loop
        if word == PROBE_WORD:
            count += 1
    return {PROBE_WORD: count}


def case_counter(corpus: Path, _shards: int) -> dict:
    from collections import Counter

    with open(corpus, encoding="utf-8", errors="replace") as handle:
        counts = Counter(handle.read().lower().split())
    return {PROBE_WORD: counts[PROBE_WORD], "distinct": len(counts)}


def case_reference(corpus: Path, _shards: int) -> dict:
    from tasks.words import decode, reference_counts

    counts = reference_counts([decode(corpus.read_bytes())])
    return {PROBE_WORD: counts[PROBE_WORD], "distinct": len(counts)}


def case_shards(corpus: Path, shards: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tasks.words import count_shard, merge_counts, plan_shards

    plan = plan_shards([corpus], shards)
    with ThreadPoolExecutor(max_workers=shards) as pool:
        counted = list(pool.map(count_shard, plan, range(shards)))
    merged = merge_counts(c.counts for c in counted)
    more = merged.filter(merged["word"] == PROBE_WORD)["count"].sum()
    return {PROBE_WORD: int(more), "distinct": merged.height}


CASES = {
    "baseline": case_baseline,
    "counter": case_counter,
    "reference": case_reference,
    "shards": case_shards,
}


def run_case(name: str, corpus: Path, shards: int, repeat: int) -> dict:
    """In the child: run the case `repeat` times; the timings, result and peak memory."""
    case = CASES[name]
    start_rss = rss_mb()
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = case(corpus, shards)
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "result": result, "peak_mb": peak_mb(), "start_mb": start_rss}


def run_flow(corpus: Path, shards: int, repeat: int) -> dict:
    """In the child: the whole flow, `repeat` runs under one ephemeral Prefect API."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-words-"))
    os.environ.update(
        WAREHOUSE_PATH=str(workdir / "warehouse.duckdb"),
        WAREHOUSE_CONCURRENCY_LIMIT=f"bench-words-{uuid.uuid4().hex[:8]}",
        WORD_COUNT_TASK_RUNNER="threads",
    )
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    from flows.word_count import word_count

    @task
    def nothing() -> None:
        """An empty task."""

    @flow
    def empty_flow() -> None:
        """Prefect's fixed cost of a flow run with one task, for comparison."""
        nothing()

    start_rss = rss_mb()
    seconds, inside, result = [], [], None
    with prefect_test_harness(server_startup_timeout=120):
        for _ in range(repeat):
            started = time.perf_counter()
            summary = word_count(str(corpus), shards=shards, words=[PROBE_WORD])
            seconds.append(time.perf_counter() - started)
            inside.append(summary["total_seconds"])
            result = {
                PROBE_WORD: summary["words"][PROBE_WORD],
                "distinct": summary["distinct_words"],
            }
        empty = []
        for _ in range(repeat):
            started = time.perf_counter()
            empty_flow()
            empty.append(time.perf_counter() - started)
    return {
        "seconds": seconds,
        "inside_seconds": inside,
        "empty_flow_seconds": empty,
        "result": result,
        "peak_mb": peak_mb(),
        "start_mb": start_rss,
    }


def child(args: argparse.Namespace) -> int:
    corpus = Path(args.corpus)
    if args.case == "flow":
        out = run_flow(corpus, args.shards, args.repeat)
    else:
        out = run_case(args.case, corpus, args.shards, args.repeat)
    print(json.dumps(out))
    return 0


# --- the parent: build the corpus, run the children, print ------------------------------------


def measure(case: str, corpus: Path, shards: int, repeat: int) -> dict:
    command = [sys.executable, __file__, "--child", case, "--corpus", str(corpus),
               "--shards", str(shards), "--repeat", str(repeat)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"case {case} (shards={shards}) failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus/shakespeare.txt"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--shards", default="1,2", help="shard counts for our counter (1,2)")
    parser.add_argument("--flow-shards", type=int, default=2, help="shards of the flow run")
    parser.add_argument("--skip-flow", action="store_true", help="no Prefect flow case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.case = args.child
        args.shards = int(args.shards)
        return child(args)

    corpus = Path(args.corpus)
    if not corpus.is_file():
        from sources.shakespeare import build

        print(f"building the corpus {corpus} (python -m sources shakespeare) ...")
        build(corpus, ROOT / ".cache/shakespeare", repeat=9)
    size_mb = corpus.stat().st_size / 1e6
    print(f"corpus {corpus}: {size_mb:.1f} MB; {os.cpu_count()} CPUs; best / median of "
          f"{args.repeat} runs per case, each case in a fresh process")  # fmt: skip

    rows: list[tuple[str, dict]] = [
        (f"baseline: split + loop counting {PROBE_WORD!r}", measure("baseline", corpus, 1, args.repeat)),
        ("Counter(text.lower().split())", measure("counter", corpus, 1, args.repeat)),
        ("reference tokenize() + Counter", measure("reference", corpus, 1, args.repeat)),
    ]  # fmt: skip
    shard_counts = [int(s) for s in args.shards.split(",")]
    for shards in shard_counts:
        rows.append((f"ours, all words, shards={shards}", measure("shards", corpus, shards, args.repeat)))  # fmt: skip
    if not args.skip_flow:
        flow = measure("flow", corpus, args.flow_shards, args.repeat)
        rows.append((f"flow shards={args.flow_shards}, wall incl. Prefect run setup", flow))
        rows.append((
            f"flow shards={args.flow_shards}, body only: no Prefect setup",
            {**flow, "seconds": flow["inside_seconds"]},
        ))  # fmt: skip

    base = min(rows[0][1]["seconds"])
    print(
        f"\n{'case':<52} {'best s':>8} {'median s':>9} {'x vs base':>9} {'peak MB':>8}  {PROBE_WORD!r}"
    )
    for label, row in rows:
        best, median = min(row["seconds"]), statistics.median(row["seconds"])
        print(f"{label:<52} {best:>8.3f} {median:>9.3f} {base / best:>8.1f}x "
              f"{row['peak_mb']:>8.0f}  {row['result'][PROBE_WORD]}")  # fmt: skip

    # The baseline and Counter(split()) count raw tokens ("More," is not "more"); the
    # reference, ours and the flow apply the documented tokenizer and must agree exactly.
    exact = {(row["result"][PROBE_WORD], row["result"]["distinct"]) for _, row in rows[2:]}
    agree = len(exact) == 1
    print("\nx vs base = baseline best / case best (the baseline counts one word, in-process, "
          "no Prefect)")  # fmt: skip
    print(f"the tokenizer's cases agree on {PROBE_WORD!r} and the distinct words: "
          f"{'yes' if agree else 'NO'}")  # fmt: skip
    if not agree:
        by_case = "; ".join(f"{label}: {row['result'][PROBE_WORD]} {PROBE_WORD!r}, "
                            f"{row['result']['distinct']} distinct" for label, row in rows[2:])  # fmt: skip
        print(f"FAILED: the tokenizer's cases disagree: {by_case}", file=sys.stderr)
    ours = {s: min(measure_row["seconds"]) for s, (_, measure_row) in
            zip(shard_counts, rows[3:3 + len(shard_counts)], strict=True)}  # fmt: skip
    print("\naims:")
    best_ours = min(ours.values())
    print(f"  ours (all words) >= 5x faster than the baseline (one word): "
          f"{base / ours[min(ours)]:.1f}x at shards={min(ours)}, {base / best_ours:.1f}x at best")  # fmt: skip
    if 1 in ours and 2 in ours:
        print(f"  shards=2 faster than shards=1: {ours[1]:.3f}s -> {ours[2]:.3f}s "
              f"({ours[1] / ours[2]:.2f}x)")  # fmt: skip
    if not args.skip_flow:
        setup = min(w - b for w, b in zip(flow["seconds"], flow["inside_seconds"], strict=True))
        print(f"  (an empty Prefect flow with one task takes {min(flow['empty_flow_seconds']):.3f}s "
              f"here, wall: Prefect's fixed cost per run; in the word_count runs, wall - body = "
              f"{setup:.3f}s at best: Prefect's run setup and teardown)")  # fmt: skip
    if not args.skip_flow and args.flow_shards in ours:
        alone = ours[args.flow_shards]
        print(f"  whole flow < 3x our counting alone (shards={args.flow_shards}): wall incl. "
              f"Prefect run setup {min(flow['seconds']) / alone:.1f}x; flow body only (no "
              f"Prefect setup/teardown) {min(flow['inside_seconds']) / alone:.1f}x")  # fmt: skip
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
