"""The one warehouse helper: DuckDB connections, the SQL loader, and the exactly-once
Kafka-to-DuckDB loader every batch flow uses.

DuckDB allows one read-write process per file. Writers (flows) take a Prefect global
concurrency slot (`writer_slot`) and `connect` retries with backoff while another process
still holds the file lock, then fails with `WarehouseLockedError` naming the holder.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from tasks.kafka import make_consumer, read_to_end
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<holder>.+?)(?:\. See also|$)")


class WarehouseLockedError(RuntimeError):
    """Another process holds the DuckDB file lock and did not let go in time."""


# --- SQL files ----------------------------------------------------------------------------


@cache
def load_sql(name: str) -> str:
    """The statement in `sql/<name>.sql`, e.g. `load_sql("prices/window_average")`."""
    path = (SQL_DIR / f"{name}.sql").resolve()
    if SQL_DIR not in path.parents or not path.is_file():
        known = sorted(str(p.relative_to(SQL_DIR).with_suffix("")) for p in SQL_DIR.rglob("*.sql"))
        raise KeyError(f"no SQL file named {name!r}; known: {', '.join(known)}")
    return path.read_text()


def run_sql(
    con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any] | list[Any] | None = None
) -> duckdb.DuckDBPyConnection:
    """Execute the named SQL file with bound parameters (never formatted into the text)."""
    return con.execute(load_sql(name), params)


# --- connections --------------------------------------------------------------------------


def connect(
    settings: Settings | None = None,
    *,
    read_only: bool = False,
    lock_timeout_s: float | None = None,
    path: Path | str | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse file, retrying with backoff while another process holds its lock."""
    s = settings or get_settings()
    target = Path(path or s.warehouse_path)
    if not read_only:
        target.parent.mkdir(parents=True, exist_ok=True)
    timeout = s.warehouse_lock_timeout_s if lock_timeout_s is None else lock_timeout_s
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(target), read_only=read_only)
        except duckdb.IOException as error:
            match = _LOCK_HOLDER.search(str(error))
            if match is None:
                raise
            if time.monotonic() + delay > deadline:
                raise WarehouseLockedError(
                    f"warehouse {target} is locked by another process ({match['holder']}); "
                    f"gave up after {timeout:g}s. DuckDB allows one writer per file: wait for "
                    "that flow to finish, or raise WAREHOUSE_LOCK_TIMEOUT_S."
                ) from error
            log.info(
                "warehouse %s is locked by %s; retrying in %.2fs", target, match["holder"], delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


@contextmanager
def writer_slot(settings: Settings | None = None, timeout_s: float | None = 600) -> Iterator[None]:
    """Hold the Prefect global concurrency slot that serialises warehouse writers."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    s = settings or get_settings()
    with get_client(sync_client=True) as client:
        # Idempotent: creates the limit with one slot, or leaves the existing one.
        client.upsert_global_concurrency_limit_by_name(s.warehouse_concurrency_limit, limit=1)
    with concurrency(
        s.warehouse_concurrency_limit, occupy=1, timeout_seconds=timeout_s, strict=True
    ):
        yield


@contextmanager
def writing(settings: Settings | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The writer's way in: take the concurrency slot, then open the file read-write."""
    with writer_slot(settings):
        con = connect(settings)
        try:
            yield con
        finally:
            con.close()


# --- the exactly-once Kafka -> DuckDB loader ----------------------------------------------

Rejects = list[tuple[ConsumerRecord, str]]
ToFrame = Callable[[list[ConsumerRecord]], tuple[pl.DataFrame, Rejects]]


def raw_events_frame(records: list[ConsumerRecord]) -> tuple[pl.DataFrame, Rejects]:
    """Records as they are (value kept as UTF-8 text): the generic `raw_events` rows."""
    frame = pl.DataFrame(
        {
            "topic": [r.topic for r in records],
            "partition": [r.partition for r in records],
            "offset": [r.offset for r in records],
            "key": [r.key.decode("utf-8", "replace") if r.key else None for r in records],
            "value": [r.value.decode("utf-8", "replace") if r.value else None for r in records],
            "timestamp_ms": [r.timestamp for r in records],
        },
        schema={
            "topic": pl.String,
            "partition": pl.Int32,
            "offset": pl.Int64,
            "key": pl.String,
            "value": pl.String,
            "timestamp_ms": pl.Int64,
        },
    )
    return frame, []


@dataclass
class LoadResult:
    topic: str
    rows: int = 0
    rejected: int = 0
    batches: int = 0
    next_offsets: dict[int, int] = field(default_factory=dict)


def ensure_loader_tables(con: duckdb.DuckDBPyConnection) -> None:
    run_sql(con, "warehouse/create_kafka_offsets")
    run_sql(con, "warehouse/create_load_rejects")


def stored_offsets(con: duckdb.DuckDBPyConnection, topic: str, sink: str) -> dict[int, int]:
    """Next offset of `topic` to load into `sink`, per partition, as committed in the warehouse."""
    ensure_loader_tables(con)
    rows = run_sql(con, "warehouse/read_kafka_offsets", {"sink": sink, "topic": topic}).fetchall()
    return {partition: next_offset for partition, next_offset in rows}


def load_topic(
    con: duckdb.DuckDBPyConnection,
    topic: str,
    *,
    insert_sql: str,
    to_frame: ToFrame = raw_events_frame,
    settings: Settings | None = None,
    batch_size: int | None = None,
    after_batch: Callable[[LoadResult], None] | None = None,
    sink: str | None = None,
) -> LoadResult:
    """Load `topic` from the offsets stored in the warehouse up to its current end.

    Each batch's rows (inserted by the SQL file `insert_sql`, which selects from the
    registered relation `batch`), its rejected records and the new offsets are written in
    one DuckDB transaction: after a crash anywhere, a rerun neither skips nor duplicates.
    Offsets are kept per `sink` (default: `insert_sql`), so loading one topic into two
    tables keeps two independent positions.
    """
    s = settings or get_settings()
    size = batch_size or s.loader_batch_size
    result = LoadResult(topic)
    sink = sink or insert_sql
    ensure_loader_tables(con)
    consumer = make_consumer(settings=s, group_id=None, max_poll_records=min(size, 10_000))
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            log.warning("topic %s does not exist (yet): nothing to load", topic)
            return result
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        stored = stored_offsets(con, topic, sink)
        earliest = consumer.beginning_offsets(tps)
        start = {}
        for tp in tps:
            start[tp] = stored.get(tp.partition, 0)
            if start[tp] < earliest[tp]:
                log.warning(
                    "%s[%d]: offsets %d..%d were deleted by retention before loading",
                    topic, tp.partition, start[tp], earliest[tp] - 1,
                )  # fmt: skip
                start[tp] = earliest[tp]
        result.next_offsets = {tp.partition: start[tp] for tp in tps}
        # Up to a snapshot of the end (read_to_end's), so a flow over a busy topic finishes.
        for records in read_to_end(consumer, tps, s.kafka_timeout_s, start=start,
                                   batch_records=size):  # fmt: skip
            positions = {tp.partition: consumer.position(tp) for tp in tps}
            _write_batch(con, sink, topic, records, to_frame, insert_sql, positions, result)
            if after_batch is not None:
                after_batch(result)
    finally:
        consumer.close()
    return result


def _write_batch(con, sink, topic, records, to_frame, insert_sql, positions, result) -> None:
    frame, rejects = to_frame(records) if records else (None, [])
    con.begin()
    try:
        if frame is not None and frame.height:
            con.register("batch", frame)
            run_sql(con, insert_sql)
            con.unregister("batch")
        if rejects:
            con.executemany(
                load_sql("warehouse/insert_load_reject"),
                [
                    [r.topic, r.partition, r.offset, r.value.decode("utf-8", "replace") if r.value else None, reason]
                    for r, reason in rejects
                ],
            )  # fmt: skip
        con.executemany(
            load_sql("warehouse/upsert_kafka_offset"),
            [[sink, topic, partition, offset] for partition, offset in positions.items()],
        )
        con.commit()
    except BaseException:
        con.rollback()
        raise
    result.rows += frame.height if frame is not None else 0
    result.rejected += len(rejects)
    result.batches += 1
    result.next_offsets = positions
