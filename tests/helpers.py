"""Small helpers the tests share (polling with a deadline, reading Kafka groups, stream
worker status files and Prefect artifacts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from pathlib import Path
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
    from infra.status import format_group, group_lags

    return format_group(group_lags(settings, {group: topics})[0])


def settled(settings: Any, topics: list[str]) -> bool:
    """No transaction is open on `topics`: on every partition the last stable offset (where
    read_committed readers stop) is the end. Commit markers land just after a commit
    returns, so a read_committed read is complete only once this holds."""
    from tasks.kafka import make_consumer, partitions_of

    stable = make_consumer(settings=settings, group_id=None)
    written = make_consumer(settings=settings, group_id=None, isolation_level="read_uncommitted")
    try:
        tps = [tp for topic in topics for tp in partitions_of(stable, topic)]
        return stable.end_offsets(tps) == written.end_offsets(tps)
    finally:
        stable.close()
        written.close()


def worker_statuses(status_dir: Path) -> list[dict[str, Any]]:
    """Every stream worker's own status file in `status_dir` (see STREAM_STATUS_DIR)."""
    statuses = []
    for path in sorted(status_dir.glob("*.json")):
        try:
            statuses.append(json.loads(path.read_text()))
        except FileNotFoundError:  # replaced between glob and read
            continue
    return statuses


def group_ready(
    settings: Any, group: str, topics: list[str], status_dir: Path, pids: Collection[int]
) -> bool:
    """True when the worker processes `pids` all say they are running (their assignment
    applied and restored), they hold every partition of `topics` exactly once between them,
    and the broker sees the group Stable with exactly that many members."""
    from tasks.kafka import make_admin

    mine = [s for s in worker_statuses(status_dir) if s["pid"] in pids]
    if len(mine) != len(pids) or any(s["state"] != "running" for s in mine):
        return False
    admin = make_admin(settings)
    try:
        described = admin.describe_topics(topics)
        want = sorted(f"{t['name']}[{p['partition_index']}]" for t in described
                      for p in t["partitions"])  # fmt: skip
        if sorted(p for s in mine for p in s["assigned"]) != want:
            return False
        description = admin.describe_groups([group])[group]
        return description["group_state"] == "Stable" and len(description["members"]) == len(pids)
    finally:
        admin.close()


def status_report(status_dir: Path) -> str:
    """One line per worker status file: what each worker says it is doing."""
    lines = [f"  {s['worker']}.{s['instance']} pid {s['pid']}: {s['state']}, assigned "
             f"{s['assigned']}, {s['records']} records, {s['commits']} commits, "
             f"{s['aborts']} aborts, lag {s['lag']}, at {s['updated_at']}"
             for s in worker_statuses(status_dir)]  # fmt: skip
    return "worker status files:\n" + ("\n".join(lines) or "  (none)")


def artifacts(key: str) -> list[dict[str, Any]]:
    """Every artifact stored under `key` in the current Prefect API, newest first (as JSON)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
        )
    return [artifact.model_dump(mode="json") for artifact in found]


def read_topic(settings: Any, topic: str, timeout_s: float = 30) -> list:
    """Every committed record (read_committed) of `topic` up to its end now, per partition
    in offset order."""
    from tasks.kafka import make_consumer, partitions_of, read_records

    consumer = make_consumer(settings=settings, group_id=None)
    try:
        return read_records(consumer, partitions_of(consumer, topic), timeout_s)
    finally:
        consumer.close()
