"""Small helpers the tests share (polling with a deadline, reading Prefect artifacts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    timeout_s: float = 60,
    interval_s: float = 0.2,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value (and what
    `diagnose` says about the system) at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            details = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(
                f"condition not met within {timeout_s}s; last value: {value!r}{details}"
            )
        time.sleep(interval_s)


def group_report(settings: Any, group: str, topics: list[str]) -> str:
    """A consumer group's state and members, and per partition its committed and end
    offsets: what a failed wait on lag needs to be diagnosed."""
    from tasks.kafka import committed_lag, make_admin, make_consumer, partitions_of

    admin = make_admin(settings)
    consumer = make_consumer(settings=settings, group_id=None)
    try:
        lines = []
        try:
            for description in admin.describe_consumer_groups([group]):
                members = [getattr(m, "member_id", m) for m in description.members]
                lines.append(f"group {group}: state {description.state}, members {members}")
        except Exception as error:  # the report must not hide the failure it explains
            lines.append(f"group {group}: not described ({error!r})")
        tps = [tp for topic in topics for tp in partitions_of(consumer, topic)]
        ends = consumer.end_offsets(tps)
        lag = committed_lag(admin, consumer, {group: tps})
        lines += [f"  {tp.topic}[{tp.partition}]: end {ends[tp]}, lag {lag[tp]}" for tp in tps]
        return "\n".join(lines)
    finally:
        consumer.close()
        admin.close()


def artifacts(key: str) -> list[dict[str, Any]]:
    """Every artifact stored under `key` in the current Prefect API, newest first (as JSON)."""
    from prefect.client.orchestration import get_client

    query = {
        "artifacts": {"key": {"any_": [key]}},
        "sort": "CREATED_DESC",
        "limit": 200,
        "offset": 0,
    }
    with get_client(sync_client=True) as client:
        return client.request("POST", "/artifacts/filter", json=query).json()


def read_topic(settings: Any, topic: str, timeout_s: float = 30) -> list:
    """Every committed record (read_committed) of `topic` up to its end now, per partition
    in offset order."""
    from tasks.kafka import make_consumer, partitions_of, read_records

    consumer = make_consumer(settings=settings, group_id=None)
    try:
        return read_records(consumer, partitions_of(consumer, topic), timeout_s)
    finally:
        consumer.close()
