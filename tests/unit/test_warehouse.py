"""The warehouse helper against real DuckDB files (no other services)."""

import logging
import subprocess
import sys
import threading

import pytest

from tasks.settings import Settings
from tasks.warehouse import WarehouseLockedError, connect, load_sql, run_sql
from tests.helpers import eventually


def test_load_sql_by_name():
    assert "kafka_offsets" in load_sql("warehouse/create_kafka_offsets")


def test_unknown_sql_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="warehouse/create_kafka_offsets"):
        load_sql("warehouse/nope")


def test_sql_names_cannot_escape_the_sql_folder():
    with pytest.raises(KeyError):
        load_sql("../pyproject")


def test_values_are_bound_not_formatted(tmp_path):
    con = connect(Settings(_env_file=None), path=tmp_path / "w.duckdb")
    run_sql(con, "warehouse/create_kafka_offsets")
    run_sql(con, "warehouse/upsert_kafka_offset", ["s", "x'; DROP TABLE kafka_offsets; --", 0, 5])
    rows = run_sql(
        con,
        "warehouse/read_kafka_offsets",
        {"sink": "s", "topic": "x'; DROP TABLE kafka_offsets; --"},
    )
    assert rows.fetchall() == [(0, 5)]


# Holds the file's write lock (after committing one row) until told to release it on stdin.
HOLD = """
import duckdb, sys
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS writes (n INTEGER, who VARCHAR)")
con.execute("INSERT INTO writes VALUES (1, 'holder')")
print("held", flush=True)
sys.stdin.readline()
con.close()
print("released", flush=True)
"""


def _hold_lock(path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release(holder) -> None:
    holder.stdin.write("release\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    assert holder.wait(timeout=30) == 0


def _retries(caplog, holder) -> list[logging.LogRecord]:
    """The connect attempts that met the holder's lock and were retried."""
    return [r for r in caplog.records
            if r.name == "tasks.warehouse" and "retrying" in r.getMessage()
            and str(holder.pid) in r.getMessage()]  # fmt: skip


def test_lock_held_by_another_process_gives_the_documented_error(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tasks.warehouse")
    path = tmp_path / "locked.duckdb"
    holder = _hold_lock(path)
    try:
        with pytest.raises(WarehouseLockedError, match=rf"{holder.pid}.*one writer per file"):
            connect(Settings(_env_file=None), path=path, lock_timeout_s=3.0)
        # It waited for the lock (with backoff) before giving up, rather than failing at once.
        assert _retries(caplog, holder), caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_connect_retries_until_the_lock_is_released(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tasks.warehouse")
    path = tmp_path / "busy.duckdb"
    holder = _hold_lock(path)
    outcome: list = []

    def write() -> None:
        try:
            con = connect(Settings(_env_file=None), path=path, lock_timeout_s=120)
            try:
                con.execute("INSERT INTO writes VALUES (2, 'writer')")
            finally:
                con.close()
            outcome.append("written")
        except BaseException as error:  # surfaced below
            outcome.append(error)

    writer = threading.Thread(target=write, daemon=True)
    try:
        writer.start()
        # The lock is held: the writer's attempts meet it and are retried (not an error).
        eventually(lambda: len(_retries(caplog, holder)) >= 1 or outcome, 60, 0.05,
                   lambda: f"writer outcome {outcome}; log:\n{caplog.text}")  # fmt: skip
        assert writer.is_alive() and not outcome, outcome
        assert _retries(caplog, holder), outcome
        _release(holder)
        writer.join(60)
        assert not writer.is_alive(), f"still waiting after the release; log:\n{caplog.text}"
        assert outcome == ["written"], outcome
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    con = connect(Settings(_env_file=None), path=path, read_only=True)
    try:
        # The holder's row and the writer's, written once the lock was free (the writer was
        # still waiting, its attempts refused, when the holder let go).
        assert con.execute("SELECT n, who FROM writes ORDER BY n").fetchall() == [
            (1, "holder"),
            (2, "writer"),
        ]
    finally:
        con.close()
