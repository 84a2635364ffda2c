"""What `make status` shows of the stream workers: each worker process (from the status files
the workers write into STREAM_STATUS_DIR) and each consumer group's lag per partition
(committed against end offsets, from the broker)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer

from infra import services
from tasks.jobs import PROCESSORS
from tasks.kafka import list_group_offsets, make_admin, make_consumer, partitions_of
from tasks.settings import Settings

DEFAULT_STATUS_DIR = services.VAR / "stream-status"  # what `make up WORKERS=1` passes


def status_dir(settings: Settings) -> Path:
    """STREAM_STATUS_DIR, or where `make up WORKERS=1` has the workers write."""
    return settings.stream_status_dir or DEFAULT_STATUS_DIR


# --- worker processes ----------------------------------------------------------------------


def read_statuses(directory: Path) -> list[dict[str, Any]]:
    """Every worker's status file in `directory`, sorted by worker and instance."""
    statuses = []
    for path in sorted(directory.glob("*.json")):
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced between glob and read, or not a status file
            continue
    return sorted(statuses, key=lambda s: (str(s.get("worker")), str(s.get("instance"))))


def parent_pid(pid: int) -> int | None:
    """The parent of a live process (None when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int, depth: int = 3) -> bool:
    """Whether `pid` is a live child (or grandchild ...) of `ancestor`."""
    for _ in range(depth):
        parent = parent_pid(pid)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def supervised(statuses: list[dict[str, Any]], supervisor_pid: int) -> list[dict[str, Any]]:
    """The status files of live processes under the supervisor `supervisor_pid` (the jobs
    daemon's REALTIME lane is a grandchild): older files of the same names are left out."""
    return [s for s in statuses if isinstance(s.get("pid"), int)
            and descends_from(s["pid"], supervisor_pid)]  # fmt: skip


@dataclass(frozen=True)
class WorkerRow:
    """One worker process as its status file tells it, and whether its pid is alive."""

    worker: str
    instance: str
    pid: int
    alive: bool
    state: str
    records: int
    dead_letters: int
    lag: int | None  # summed over its partitions; None: not measured yet
    updated_at: str


def worker_rows(statuses: list[dict[str, Any]]) -> list[WorkerRow]:
    """The rows of `read_statuses`, each with whether its pid is alive."""
    rows = []
    for s in statuses:
        lag = s.get("lag") or {}
        rows.append(WorkerRow(
            worker=str(s.get("worker")), instance=str(s.get("instance")),
            pid=int(s.get("pid") or 0), alive=bool(s.get("pid")) and services.alive(s["pid"]),
            state=str(s.get("state")), records=int(s.get("records") or 0),
            dead_letters=int(s.get("dead_letters") or 0),
            lag=sum(lag.values()) if lag else None, updated_at=str(s.get("updated_at")),
        ))  # fmt: skip
    return rows


def format_workers(rows: list[WorkerRow], now: datetime | None = None) -> str:
    header = ("worker", "instance", "pid", "alive", "state", "records", "dead letters", "lag",
              "updated")  # fmt: skip
    table = [header] + [
        (r.worker, r.instance, str(r.pid), "yes" if r.alive else "NO", r.state, str(r.records),
         str(r.dead_letters), "-" if r.lag is None else str(r.lag), _ago(r.updated_at, now))
        for r in rows
    ]  # fmt: skip
    return _columns(table)


def _ago(iso: str, now: datetime | None) -> str:
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return "?"
    seconds = ((now or datetime.now(then.tzinfo)) - then).total_seconds()
    return f"{seconds:.0f}s ago"


# --- consumer groups -----------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed on it
    end: int
    lag: int  # from the beginning where never committed


@dataclass
class GroupLag:
    group: str
    state: str
    members: list[str] = field(default_factory=list)
    partitions: list[PartitionLag] = field(default_factory=list)
    error: str | None = None  # the broker could not describe it

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def worker_groups(settings: Settings) -> dict[str, list[str]]:
    """The stream workers' consumer groups (as now configured) and the topics each reads."""
    s = settings
    groups = {s.price_alerts_group: [s.trades_topic],
              s.transaction_alerts_group: [s.transactions_topic]}  # fmt: skip
    for processor in sorted(PROCESSORS):
        for priority in ("realtime", "normal"):
            group = f"{s.jobs_processor_group(processor)}.{priority}"
            groups[group] = [s.jobs_topic(processor, priority)]
    return groups


def describe_group(
    admin: KafkaAdminClient, consumer: KafkaConsumer, group: str, topics: list[str]
) -> GroupLag:
    """A group's state and members, and per partition of `topics` its committed and end
    offsets (the end a read_committed reader sees: the last stable offset)."""
    try:
        description = admin.describe_groups([group])[group]
        report = GroupLag(group, description["group_state"],
                          [member_text(m) for m in description["members"]])  # fmt: skip
    except Exception as error:  # the report must not hide the failure it may explain
        report = GroupLag(group, "?", error=repr(error))
    tps = [tp for topic in topics for tp in partitions_of(consumer, topic)]
    if not tps:
        return report
    ends = consumer.end_offsets(tps)
    starts = consumer.beginning_offsets(tps)
    committed = list_group_offsets(admin, {group: tps}).get(group) or {}
    for tp in tps:
        done = committed.get(tp)
        offset = done.offset if done is not None and done.offset >= 0 else None
        lag = max(0, ends[tp] - (starts[tp] if offset is None else offset))
        report.partitions.append(PartitionLag(tp.topic, tp.partition, offset, ends[tp], lag))
    return report


def group_lags(settings: Settings, groups: dict[str, list[str]]) -> list[GroupLag]:
    """`describe_group` for each of `groups` ({group: topics})."""
    admin = make_admin(settings)
    consumer = make_consumer(settings=settings, group_id=None)
    try:
        return [describe_group(admin, consumer, group, topics) for group, topics in groups.items()]
    finally:
        consumer.close()
        admin.close()


def format_group(report: GroupLag) -> str:
    head = f"group {report.group}: state {report.state}, {len(report.members)} member(s)"
    if report.members:
        head += f" ({'; '.join(report.members)})"
    if report.error:
        head += f" (not described: {report.error})"
    if not report.partitions:
        return head + "\n  (no partitions: its topics do not exist)"
    table = [("  partition", "committed", "end", "lag")] + [
        (f"  {p.topic}[{p.partition}]", "-" if p.committed is None else str(p.committed),
         str(p.end), str(p.lag))
        for p in report.partitions
    ]  # fmt: skip
    return f"{head}, lag {report.lag}\n{_columns(table)}"


def member_text(member: dict[str, Any]) -> str:
    """`price-alerts.0 trades[0,1,2]`: the member (its static id, else its member id) and
    what it is assigned."""
    assignment = member.get("member_assignment")
    if isinstance(assignment, dict) and "assigned_partitions" in assignment:
        parts = " ".join(f"{a['topic']}[{','.join(map(str, sorted(a['partitions'])))}]"
                         for a in assignment["assigned_partitions"])  # fmt: skip
    else:  # another shape (another client version): as it is
        parts = str(getattr(assignment, "assignment", None) or assignment)
    return f"{member.get('group_instance_id') or member.get('member_id')} {parts}"


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


# --- the whole section ---------------------------------------------------------------------


def report(settings: Settings, *, kafka_up: bool = True) -> str:
    """The workers and (when Kafka answers) their groups, as `make status` prints them."""
    directory = status_dir(settings)
    statuses = read_statuses(directory)
    pid = services.running_pid(services.WORKERS)
    lines = [
        f"stream workers: supervisor {f'running, pid {pid}' if pid else 'not running'} "
        f"(log {services.log_path(services.WORKERS)}); status files in {directory}",
        _indent(format_workers(worker_rows(statuses))) if statuses else "  (no status files)",
    ]
    if kafka_up:
        groups = worker_groups(settings)
        for s in statuses:  # groups of other configurations (e.g. a test's), as they read
            topics = {name.rpartition("[")[0] for name in s.get("assigned") or ()}
            if s.get("group") and s["group"] not in groups:
                groups[s["group"]] = sorted(topics)
        lines.append("consumer groups:")
        lines += [_indent(format_group(g)) for g in group_lags(settings, groups)]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
