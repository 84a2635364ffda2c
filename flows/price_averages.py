"""The batch side of price alerts: the ten-minute average at `as_of`, and the alerts it fires.

1. load new `trades`, `price-alerts` and `notifications` into DuckDB (exactly-once loader;
   bad trades land in `load_rejects`);
2. the window average with `sql/prices/window_average.sql` (the rule of tasks/prices.py);
3. fire every live alert not yet notified whose threshold the average reached: a
   notification (source "batch") and a tombstone in one Kafka transaction, under the
   transactional id the stream worker uses for that product's partition (see `fire_alerts`);
4. record the average in `price_average_history` and publish a table artifact.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import duckdb
import polars as pl
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.kafka import decode_json, ensure_topics, make_consumer, make_producer, project_topics
from tasks.prices import (
    AlertRow,
    check_product_id,
    decimal_units,
    fire_transactional_id,
    format_units,
    notification,
    parse_alert,
    parse_time_us,
    parse_trade,
    product_partition,
    time_from_us,
    to_us,
    window_bounds_us,
)
from tasks.settings import Settings, get_settings
from tasks.warehouse import LoadResult, Rejects, load_topic, run_sql, writing
from tasks.wire import InvalidRecord

ARTIFACT_KEY = "price-ten-minute-average"

# --- parameters ---------------------------------------------------------------------------


def validate_as_of(as_of: Any) -> datetime:
    """An aware datetime (or ISO-8601 text with a timezone); anything else names the bad value."""
    if isinstance(as_of, str):
        try:
            return time_from_us(parse_time_us(as_of, "as_of"))
        except InvalidRecord as error:
            raise ValueError(str(error)) from None
    if not isinstance(as_of, datetime):
        raise ValueError(f"as_of: {as_of!r} is not a datetime")
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError(
            f"as_of: {as_of.isoformat()!r} has no timezone; give an aware time such as "
            "2024-01-01T12:00:00+00:00"
        )
    return time_from_us(to_us(as_of))


def validate_product(product_id: Any) -> str:
    try:
        return check_product_id(product_id)
    except InvalidRecord as error:
        raise ValueError(str(error)) from None


def scheduled_time() -> datetime:
    """The flow run's scheduled start time (what a cron or UI run without as_of uses)."""
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    return time_from_us(to_us(scheduled))


# --- Kafka records -> frames for the loader ------------------------------------------------


def trades_frame(records: list[ConsumerRecord]) -> tuple[pl.DataFrame, Rejects]:
    """Trades through the same parser as the stream worker; bad ones are rejected with a reason."""
    rows: dict[str, list] = {
        k: [] for k in ("topic", "partition", "offset", "trade_id", "product_id", "price", "size",
                        "side", "time_us")
    }  # fmt: skip
    rejects: Rejects = []
    for record in records:
        try:
            trade = parse_trade(record.value)
        except InvalidRecord as error:
            rejects.append((record, str(error)))
            continue
        rows["topic"].append(record.topic)
        rows["partition"].append(record.partition)
        rows["offset"].append(record.offset)
        rows["trade_id"].append(trade.trade_id)
        rows["product_id"].append(trade.product_id)
        rows["price"].append(format_units(trade.price_units))
        rows["size"].append(format_units(trade.size_units))
        rows["side"].append(trade.side)
        rows["time_us"].append(trade.time_us)
    frame = pl.DataFrame(
        rows,
        schema={"topic": pl.String, "partition": pl.Int32, "offset": pl.Int64,
                "trade_id": pl.Int64, "product_id": pl.String, "price": pl.String,
                "size": pl.String, "side": pl.String, "time_us": pl.Int64},
    )  # fmt: skip
    frame = frame.with_columns(
        time=pl.from_epoch(pl.col("time_us"), time_unit="us").dt.replace_time_zone("UTC")
    )
    return frame, rejects


def alert_events_frame(records: list[ConsumerRecord]) -> tuple[pl.DataFrame, Rejects]:
    rows: list[dict[str, Any]] = []
    rejects: Rejects = []
    for record in records:
        try:
            alert = parse_alert(record.key, record.value)
        except InvalidRecord as error:
            rejects.append((record, str(error)))
            continue
        row: dict[str, Any] = {
            "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "alert_id": record.key.decode(), "deleted": alert is None,
        }  # fmt: skip
        if alert is not None:
            row |= {
                "user_id": alert.user_id, "product_id": alert.product_id,
                "threshold_units": alert.threshold_units, "threshold_text": alert.threshold,
                "created_at": alert.created_at,
            }  # fmt: skip
        rows.append(row)
    schema = {
        "topic": pl.String, "partition": pl.Int32, "offset": pl.Int64, "alert_id": pl.String,
        "deleted": pl.Boolean, "user_id": pl.String, "product_id": pl.String,
        "threshold_units": pl.Int64, "threshold_text": pl.String, "created_at": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema), rejects


def notifications_frame(records: list[ConsumerRecord]) -> tuple[pl.DataFrame, Rejects]:
    rows: list[dict[str, Any]] = []
    rejects: Rejects = []
    for record in records:
        try:
            value = decode_json(record.value)
            if not isinstance(value, dict) or not isinstance(value.get("alert_id"), str):
                raise InvalidRecord("a notification needs an alert_id")
            average = value.get("average_price")
            if average is not None:
                decimal_units(average, "average_price")
        except (ValueError, UnicodeError, RecursionError) as error:
            rejects.append((record, str(error)))
            continue
        rows.append(
            {"topic": record.topic, "partition": record.partition, "offset": record.offset}
            | {k: value.get(k) for k in ("alert_id", "user_id", "product_id", "window_end",
                                        "fired_at", "source")}
            | {"threshold": _text(value.get("threshold")), "average_price": _text(average)}
        )  # fmt: skip
    schema = {
        "topic": pl.String, "partition": pl.Int32, "offset": pl.Int64, "alert_id": pl.String,
        "user_id": pl.String, "product_id": pl.String, "window_end": pl.String,
        "fired_at": pl.String, "source": pl.String, "threshold": pl.String,
        "average_price": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema), rejects


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# --- steps --------------------------------------------------------------------------------


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    for name in ("create_trades", "create_alert_events", "create_notifications",
                 "create_average_history"):  # fmt: skip
        run_sql(con, f"prices/{name}")


def load_alert_state(con: duckdb.DuckDBPyConnection, s: Settings) -> list[LoadResult]:
    """Load new alert records and notifications: what is live and what has fired."""
    return [
        load_topic(con, s.price_alerts_topic, insert_sql="prices/insert_alert_events",
                   to_frame=alert_events_frame, settings=s),
        load_topic(con, s.notifications_topic, insert_sql="prices/insert_notifications",
                   to_frame=notifications_frame, settings=s),
    ]  # fmt: skip


@task(cache_policy=NO_CACHE)
def load_price_topics(con: duckdb.DuckDBPyConnection, s: Settings) -> dict[str, LoadResult]:
    trades = load_topic(con, s.trades_topic, insert_sql="prices/insert_trades",
                        to_frame=trades_frame, settings=s)  # fmt: skip
    return {r.topic: r for r in [trades, *load_alert_state(con, s)]}


def window_average(
    con: duckdb.DuckDBPyConnection, product_id: str, start_us: int, end_us: int
) -> tuple[int, int | None]:
    """(trade count, rounded average in 10^-8 units or None) over [start_us, end_us]."""
    count, average_units, _reached = window_figures(con, product_id, start_us, end_us)
    return count, average_units


def window_figures(
    con: duckdb.DuckDBPyConnection, product_id: str, start_us: int, end_us: int
) -> tuple[int, int | None, int | None]:
    """(count, rounded average units, floor(sum / count) units: what thresholds compare to)."""
    count, _sum, average_units, _price, reached = run_sql(
        con, "prices/window_average",
        {"product_id": product_id, "start_us": start_us, "end_us": end_us},
    ).fetchone()  # fmt: skip
    if average_units is None:
        return count, None, None
    return count, int(average_units), int(reached)


def alerts_to_fire(con: duckdb.DuckDBPyConnection, product_id: str, reached: int) -> list[AlertRow]:
    """Unfired live alerts with threshold <= `reached` = floor(sum / count) (exact rule)."""
    rows = run_sql(
        con, "prices/alerts_to_fire", {"product_id": product_id, "reached_units": reached}
    ).fetchall()
    return [AlertRow(a, u, p, int(t), text, c or "") for a, u, p, t, text, c in rows]


def trades_partition(s: Settings, product_id: str) -> int | None:
    consumer = make_consumer(settings=s)
    try:
        partitions = consumer.partitions_for_topic(s.trades_topic)
    finally:
        consumer.close()
    return product_partition(product_id, len(partitions)) if partitions else None


def fire_alerts(
    con: duckdb.DuckDBPyConnection,
    s: Settings,
    product_id: str,
    average_units: int,
    window_end_us: int,
    logger: logging.Logger | logging.LoggerAdapter,
    reached: int,
) -> list[dict[str, Any]]:
    """Fire the due alerts once, even while a stream worker fires the same product's alerts.

    The serialisation point is the transactional id of the product's `trades` partition,
    shared with the worker: `init_transactions` fences the worker's producer (aborting its
    open transaction) and waits until every earlier transaction under that id is complete.
    Only then do we re-read alerts and notifications (read_committed) and decide. A worker
    that fired first is visible in that re-read; a worker that tries after us is fenced
    until our transaction is over, and re-reads before deciding again.
    """
    # `reached` = floor(sum / count) decides; `average_units` (rounded) is only reported.
    if not alerts_to_fire(con, product_id, reached):
        return []
    partition = trades_partition(s, product_id)
    if partition is None:
        return []
    txn_id = fire_transactional_id(s.price_fire_transactional_prefix, s.trades_topic, partition)
    outputs = {s.notifications_topic, s.price_alerts_topic}
    ensure_topics([t for t in project_topics(s) if t.name in outputs], s)
    for attempt in range(1, s.price_fire_attempts + 1):
        producer = make_producer(
            s, transactional_id=txn_id, transaction_timeout_ms=s.price_alerts_txn_timeout_ms
        )
        try:
            producer.init_transactions()
            load_alert_state(con, s)  # the re-check, after the fence
            due = alerts_to_fire(con, product_id, reached)
            if not due:
                logger.info("every due alert was fired by the stream side meanwhile")
                return []
            producer.begin_transaction()
            sent = []
            for alert in due:
                message = notification(alert, average_units, window_end_us, "batch")
                producer.send(s.notifications_topic, key=alert.user_id, value=message)
                producer.send(s.price_alerts_topic, key=alert.alert_id, value=None)
                sent.append(message)
            producer.commit_transaction()
            return sent
        except KafkaError as error:
            # Fenced by the worker (it re-initialised after we fenced it): nothing of ours
            # was committed; back off and decide again.
            logger.warning("firing attempt %d/%d failed (%s); retrying",
                           attempt, s.price_fire_attempts, type(error).__name__)  # fmt: skip
            time.sleep(min(0.2 * 2**attempt, 3.0))
        finally:
            producer.close(timeout=5)
    raise RuntimeError(
        f"could not fire alerts of {product_id} after {s.price_fire_attempts} attempts "
        f"(transactional id {txn_id} kept being fenced)"
    )


@task(cache_policy=NO_CACHE)
def fire_due_alerts(
    con, s: Settings, product_id: str, average_units: int, window_end_us: int, reached: int
):
    return fire_alerts(con, s, product_id, average_units, window_end_us, get_run_logger(), reached)


# --- the flow -----------------------------------------------------------------------------


@flow(name="ten_minute_average", validate_parameters=False)
def ten_minute_average(as_of: datetime | None = None, product_id: str = "BTC-USD") -> dict:
    """Average a product's trades over [as_of - 10 min, as_of]; fire the alerts it reaches."""
    # Parameters first: nothing is written before they are known to be good.
    product_id = validate_product(product_id)
    end = validate_as_of(as_of) if as_of is not None else scheduled_time()
    settings = get_settings()
    logger = get_run_logger()
    start_us, end_us = window_bounds_us(to_us(end), settings.price_window_minutes)
    from prefect.runtime import flow_run

    with writing(settings) as con:
        ensure_tables(con)
        loaded = load_price_topics(con, settings)
        count, average_units, reached = window_figures(con, product_id, start_us, end_us)
        if average_units is None:
            logger.info("%s: no trades in [%s, %s]: empty window, nothing fires",
                        product_id, time_from_us(start_us), end)  # fmt: skip
            fired: list[dict[str, Any]] = []
        else:
            fired = fire_due_alerts(con, settings, product_id, average_units, end_us, reached)
        average = None if average_units is None else format_units(average_units)
        run_sql(con, "prices/insert_average_history", {
            "product_id": product_id, "as_of": end, "window_start": time_from_us(start_us),
            "trade_count": count, "average_price": average, "fired": len(fired),
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
        })  # fmt: skip
    logger.info("%s at %s: %d trades, average %s, %d alert(s) fired",
                product_id, end.isoformat(), count, average, len(fired))  # fmt: skip
    summary = {
        "product_id": product_id,
        "as_of": end.isoformat(),
        "window_start": time_from_us(start_us).isoformat(),
        "trades": count,
        "average_price": average,
        "fired": [n["alert_id"] for n in fired],
        "loaded": {topic: r.rows for topic, r in loaded.items()},
        "rejected": {topic: r.rejected for topic, r in loaded.items()},
    }
    _publish(summary, fired)
    return summary


def _publish(summary: dict[str, Any], fired: list[dict[str, Any]]) -> None:
    base = {k: summary[k] for k in ("product_id", "window_start", "as_of", "trades")}
    base["average_price"] = summary["average_price"] or "empty window: nothing fires"
    rows = [
        base | {"fired alert": n["alert_id"], "user": n["user_id"], "threshold": n["threshold"]}
        for n in fired
    ] or [base | {"fired alert": "none", "user": "", "threshold": ""}]
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=rows,
        description="The ten-minute average at as_of and the alerts this run fired (source batch).",
    )
