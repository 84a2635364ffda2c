"""Load new events from Kafka into the warehouse's `raw_events` table, exactly once."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.kafka import project_topics
from tasks.settings import get_settings
from tasks.warehouse import LoadResult, load_topic, run_sql, writing

# Kafka's own rule for topic names; checked before anything is written.
_LEGAL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def validate_topics(topics: list[str]) -> list[str]:
    """Refuse names Kafka could never hold, naming the bad value."""
    if not topics:
        raise ValueError("topics: give at least one topic name")
    for topic in topics:
        if not topic or len(topic) > 249 or not set(topic) <= _LEGAL or topic in {".", ".."}:
            raise ValueError(f"topics: {topic!r} is not a valid Kafka topic name")
    return topics


@task(cache_policy=NO_CACHE)
def load_raw_topic(con, topic: str) -> LoadResult:
    return load_topic(con, topic, insert_sql="warehouse/insert_raw_events")


@flow(name="load_events")
def load_events(topics: list[str] | None = None) -> dict[str, int]:
    """Load every new event of `topics` (default: the project's source topics)."""
    settings = get_settings()
    topics = validate_topics(
        topics or [t.name for t in project_topics(settings) if not t.name.endswith(".dlq")]
    )
    logger = get_run_logger()
    loaded: dict[str, int] = {}
    with writing(settings) as con:
        run_sql(con, "warehouse/create_raw_events")
        for topic in topics:
            result = load_raw_topic(con, topic)
            loaded[topic] = result.rows
            logger.info("%s: %d rows in %d batches", topic, result.rows, result.batches)
        totals = run_sql(con, "warehouse/count_raw_events").fetchall()
    create_table_artifact(
        key="raw-events",
        table=[
            {"topic": t, "loaded now": loaded.get(t, 0), "in warehouse": n} for t, n, *_ in totals
        ],
        description="Events loaded into `raw_events` by this run, and the warehouse totals.",
    )
    return loaded
