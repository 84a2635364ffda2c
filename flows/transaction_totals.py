"""The batch check of the transaction stream: load `transactions` into DuckDB exactly once,
compute per-user totals in SQL (DECIMAL), and compare them with the stream's totals on the
changelog topic. Mismatches (there should be none) become a Prefect table artifact."""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.kafka import make_consumer, partitions_of, read_records
from tasks.settings import Settings, get_settings
from tasks.transactions import Rules, fold_changelog, format_minor, parse_records
from tasks.warehouse import LoadResult, load_topic, run_sql, writing

ARTIFACT_KEY = "transaction-totals-check"
MAX_SHOWN = 10_000


def validate_show(show: Any) -> int:
    """Refuse a bad `show` parameter, naming the bad value."""
    if isinstance(show, bool) or not isinstance(show, int) or not 1 <= show <= MAX_SHOWN:
        raise ValueError(f"show: {show!r} is not a whole number from 1 to {MAX_SHOWN}")
    return show


def _partition_count(settings: Settings) -> int | None:
    consumer = make_consumer(settings=settings, group_id=None)
    try:
        return len(consumer.partitions_for_topic(settings.transactions_topic) or ()) or None
    finally:
        consumer.close()


def transactions_frame(rules: Rules, partitions: int | None):
    """The loader's `to_frame`: the stream's own validation, so both sides accept the same."""

    def to_frame(records):
        frame, rejects = parse_records(records, rules, partitions)
        amounts = [format_minor(m, rules.scale) for m in frame["amount"].to_list()]
        frame = frame.with_columns(
            topic=pl.lit(records[0].topic if records else None, dtype=pl.String),
            amount=pl.Series(amounts, dtype=pl.String),  # exact: DuckDB casts to DECIMAL
        )
        return frame, rejects

    return to_frame


# The loader's sink name: the warehouse keeps this flow's Kafka offsets under it.
INSERT_TRANSACTIONS = "transactions/insert_transactions"


@task(cache_policy=NO_CACHE)
def load_transactions(con, settings: Settings) -> LoadResult:
    to_frame = transactions_frame(Rules.from_settings(settings), _partition_count(settings))
    return load_topic(con, settings.transactions_topic,
                      insert_sql=INSERT_TRANSACTIONS, to_frame=to_frame,
                      settings=settings)  # fmt: skip


@task(cache_policy=NO_CACHE)
def changelog_frame(settings: Settings) -> pl.DataFrame:
    """The stream's latest total per user, read from the changelog to its end."""
    scale = settings.transaction_amount_scale
    consumer = make_consumer(settings=settings, group_id=None, max_poll_records=10_000)
    try:
        tps = partitions_of(consumer, settings.transaction_totals_changelog_topic)
        records = read_records(consumer, tps, max(30.0, settings.kafka_timeout_s))
    finally:
        consumer.close()
    totals_of, bad = fold_changelog(records, {tp.partition for tp in tps}, scale)
    if bad:
        get_run_logger().warning("%d malformed changelog record(s) skipped: %s",
                                 len(bad), [reason for _, reason in bad[:5]])  # fmt: skip
    rows = [
        (user, p, t.offset, format_minor(t.minor, scale), t.transactions)
        for p, totals in totals_of.items()
        for user, t in totals.items()
    ]
    return pl.DataFrame(
        rows,
        schema={"user": pl.String, "partition": pl.Int32, "offset": pl.Int64,
                "total": pl.String, "transactions": pl.Int64},
        orient="row",
    )  # fmt: skip


@task(cache_policy=NO_CACHE)
def compare(con, changelog: pl.DataFrame, topic: str) -> tuple[list[dict[str, Any]], int]:
    """Mismatching users (as rows) and how many users could be compared."""
    run_sql(con, "transactions/create_transaction_totals", {"topic": topic})
    con.register("changelog", changelog)
    try:
        result = run_sql(
            con,
            "transactions/compare_with_changelog",
            {"topic": topic, "sink": INSERT_TRANSACTIONS},
        )
        columns = [d[0] for d in result.description]
        mismatches = [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
        [(compared,)] = run_sql(
            con, "transactions/count_checkable", {"topic": topic, "sink": INSERT_TRANSACTIONS}
        ).fetchall()
    finally:
        con.unregister("changelog")
    return mismatches, compared


class TotalsMismatchError(RuntimeError):
    """The stream's and the batch's per-user totals differ (the run ends Failed)."""


@flow(name="transaction_totals")
def transaction_totals(show: int = 100) -> dict[str, int]:
    """Check the stream's per-user totals against the warehouse; `show` caps the rows listed."""
    show = validate_show(show)
    settings = get_settings()
    topic = settings.transactions_topic
    logger = get_run_logger()
    with writing(settings) as con:
        run_sql(con, "transactions/create_transactions")
        run_sql(con, "transactions/create_transaction_checks")
        loaded = load_transactions(con, settings)
        mismatches, compared = compare(con, changelog_frame(settings), topic)
        [(users,)] = run_sql(con, "transactions/insert_transaction_check", {
            "topic": topic, "loaded": loaded.rows, "rejected": loaded.rejected,
            "compared": compared, "mismatches": len(mismatches),
        }).fetchall()  # fmt: skip
    summary = {
        "loaded": loaded.rows,
        "rejected": loaded.rejected,
        "users": users,
        "compared": compared,
        "mismatches": len(mismatches),
    }
    logger.info("transaction totals: %s", summary)
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=[
            {k: None if v is None else str(v) for k, v in row.items()} for row in mismatches[:show]
        ],
        description=(
            f"Stream (changelog) vs batch (DuckDB) per-user totals of `{topic}`: "
            f"{compared} users compared, **{len(mismatches)} mismatches**"
            + (f" (first {show} shown)" if len(mismatches) > show else "")
            + f"; {loaded.rows} transactions loaded now, {loaded.rejected} rejected."
        ),
    )
    if mismatches:
        # A failed run, not a completed one: the UI and automations see it.
        raise TotalsMismatchError(
            f"{len(mismatches)} of {compared} users' totals differ between the stream "
            f"(changelog) and the batch (DuckDB); see the artifact {ARTIFACT_KEY!r}"
        )
    return summary
