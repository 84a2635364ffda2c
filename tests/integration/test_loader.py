"""The exactly-once Kafka -> DuckDB loader: crashes anywhere neither skip nor duplicate."""

import random
import signal
import subprocess
import sys

import polars as pl
import pytest

from tasks.kafka import TopicSpec, ensure_topics, make_producer
from tasks.warehouse import connect, load_topic, raw_events_frame, run_sql, stored_offsets

pytestmark = pytest.mark.integration

N_EVENTS = 3000

# Loads `topic` in batches of 100; with a kill point it SIGKILLs itself right after the
# commit of that batch ("after") or inside the transaction of that batch ("during").
LOADER = """
import os, signal, sys
from tasks.warehouse import connect, load_topic, run_sql
import tasks.warehouse as w

topic, kill_at, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
con = connect()
run_sql(con, "warehouse/create_raw_events")
if where == "during":
    original = w.run_sql
    calls = {"n": 0}
    def run_sql_then_die(c, name, params=None):
        result = original(c, name, params)
        if name == "warehouse/insert_raw_events":
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    w.run_sql = run_sql_then_die

def after(result):
    if where == "after" and result.batches == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

result = load_topic(con, topic, insert_sql="warehouse/insert_raw_events", batch_size=100, after_batch=after)
print(result.rows)
"""


def _produce(settings, topic: str, count: int) -> None:
    ensure_topics([TopicSpec(topic, 3)], settings)
    producer = make_producer(settings)
    for i in range(count):
        producer.send(topic, key=f"k{i % 17}", value={"i": i})
    producer.flush()
    producer.close()


def _run_loader(topic: str, kill_at: int = 0, where: str = "none") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOADER, topic, str(kill_at), where],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _loaded(settings, topic: str) -> list[int]:
    con = connect(settings, read_only=True)
    try:
        rows = con.execute(
            "SELECT CAST(json_extract(value, '$.i') AS INTEGER) FROM raw_events WHERE topic = ?",
            [topic],
        ).fetchall()
        return sorted(i for (i,) in rows)
    finally:
        con.close()


@pytest.mark.parametrize("where", ["after", "during"])
def test_a_killed_load_resumes_without_duplicates_or_gaps(settings, unique, where):
    topic = f"load-{where}-{unique}"
    _produce(settings, topic, N_EVENTS)
    crashed = _run_loader(topic, kill_at=4, where=where)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    partial = _loaded(settings, topic)
    assert len(partial) == (400 if where == "after" else 300)
    assert len(set(partial)) == len(partial)

    finished = _run_loader(topic)
    assert finished.returncode == 0, finished.stderr
    assert _loaded(settings, topic) == list(range(N_EVENTS))

    again = _run_loader(topic)
    assert again.stdout.strip() == "0", "a rerun loads nothing new"
    assert _loaded(settings, topic) == list(range(N_EVENTS))


def test_repeated_kills_at_random_moments_still_load_each_event_once(settings, unique, seed):
    topic = f"load-random-{unique}"
    _produce(settings, topic, N_EVENTS)
    rng = random.Random(seed)
    for _ in range(4):
        _run_loader(topic, kill_at=rng.randint(1, 8), where=rng.choice(["after", "during"]))
        loaded = _loaded(settings, topic)
        assert len(set(loaded)) == len(loaded)
    assert _run_loader(topic).returncode == 0
    assert _loaded(settings, topic) == list(range(N_EVENTS))


def test_new_events_after_a_load_are_picked_up_next_time(settings, unique):
    topic = f"load-incremental-{unique}"
    _produce(settings, topic, 50)
    con = connect(settings)
    run_sql(con, "warehouse/create_raw_events")
    first = load_topic(con, topic, insert_sql="warehouse/insert_raw_events")
    producer = make_producer(settings)
    for i in range(50, 80):
        producer.send(topic, key="late", value={"i": i})
    producer.close()  # flushes; no client left running after the test
    second = load_topic(con, topic, insert_sql="warehouse/insert_raw_events")
    assert (first.rows, second.rows) == (50, 30)
    assert sum(stored_offsets(con, topic, "warehouse/insert_raw_events").values()) == 80
    con.close()
    assert _loaded(settings, topic) == list(range(80))


def test_two_sinks_of_one_topic_keep_their_own_offsets(settings, unique):
    topic = f"load-two-sinks-{unique}"
    _produce(settings, topic, 40)
    con = connect(settings)
    run_sql(con, "warehouse/create_raw_events")
    first = load_topic(con, topic, insert_sql="warehouse/insert_raw_events")

    def relabelled(records):
        frame, rejects = raw_events_frame(records)
        return frame.with_columns(pl.lit(f"copy-{topic}").alias("topic")), rejects

    # A second flow loading the same topic into other rows starts from its own position.
    other = load_topic(
        con, topic, insert_sql="warehouse/insert_raw_events", to_frame=relabelled, sink="copy"
    )
    assert (first.rows, other.rows) == (40, 40)
    assert stored_offsets(con, topic, "copy") == stored_offsets(
        con, topic, "warehouse/insert_raw_events"
    )
    con.close()
    assert _loaded(settings, f"copy-{topic}") == list(range(40))
