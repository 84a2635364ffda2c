"""The warehouse helper against real DuckDB files (no other services)."""

import subprocess
import sys
import time

import pytest

from tasks.settings import Settings
from tasks.warehouse import WarehouseLockedError, connect, load_sql, run_sql


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


HOLD = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(path, seconds):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_held_by_another_process_gives_the_documented_error(tmp_path):
    path = tmp_path / "locked.duckdb"
    holder = _hold_lock(path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(WarehouseLockedError, match=rf"{holder.pid}.*one writer per file"):
            connect(Settings(_env_file=None), path=path, lock_timeout_s=1.0)
        assert time.monotonic() - started < 10  # the error, not a hang
    finally:
        holder.kill()
        holder.wait()


def test_connect_retries_until_the_lock_is_released(tmp_path):
    path = tmp_path / "busy.duckdb"
    holder = _hold_lock(path, 1.5)
    try:
        con = connect(Settings(_env_file=None), path=path, lock_timeout_s=30)
        assert con.execute("SELECT 42").fetchone() == (42,)
        con.close()
    finally:
        holder.wait()
