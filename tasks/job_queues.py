"""The Kafka side of the job queues, shared by the processor daemon and the SLOW flow:
which job ids already have results, and how much REALTIME / NORMAL work is pending."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from tasks.jobs import Priority
from tasks.kafka import committed_lag, make_admin, make_consumer, partitions_of, read_to_end
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


def priority_topics(
    processor: str, settings: Settings | None = None, priorities: Iterable[Priority] = Priority
) -> dict[str, Priority]:
    """Topic name -> priority for a processor's job topics."""
    s = settings or get_settings()
    return {s.jobs_topic(processor, p.value): p for p in priorities}


def result_ids_since(
    processor: str, since: datetime | None, settings: Settings | None = None
) -> set[str]:
    """Job ids with a committed result on `job-results.<processor>` written since `since`
    (None: since the beginning), read up to the topic's end at the time of the call."""
    s = settings or get_settings()
    consumer = make_consumer(settings=s, group_id=None, max_poll_records=10_000)
    found: set[str] = set()
    try:
        tps = partitions_of(consumer, s.job_results_topic(processor))
        if not tps:
            return found
        start = consumer.beginning_offsets(tps)
        if since is not None:
            end = consumer.end_offsets(tps)
            by_time = consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            start = {tp: by_time[tp].offset if by_time[tp] else end[tp] for tp in tps}
        for records in read_to_end(consumer, tps, max(60.0, s.kafka_timeout_s), start=start):
            # Keys only: the job id is the key, no need to parse the values.
            found.update(r.key.decode() for r in records if r.key)
    finally:
        consumer.close()
    return found


class PendingWork:
    """Jobs waiting for the processor daemon: end offsets minus the committed offsets of its
    lanes' groups (`<processor group>.realtime` and `.normal`)."""

    def __init__(self, processor: str, settings: Settings | None = None) -> None:
        self.settings = s = settings or get_settings()
        self.topics = priority_topics(processor, s, (Priority.REALTIME, Priority.NORMAL))
        base = s.jobs_processor_group(processor)
        self.groups = {p: f"{base}.{p.value.lower()}" for p in self.topics.values()}
        self._admin = make_admin(s)
        self._consumer = make_consumer(settings=s, group_id=None)

    def pending(self) -> dict[Priority, int]:
        """Jobs not yet committed by the processor's group, per priority (REALTIME, NORMAL)."""
        specs = {
            self.groups[priority]: partitions_of(self._consumer, topic)
            for topic, priority in self.topics.items()
        }
        counts = dict.fromkeys(self.topics.values(), 0)
        for tp, lag in committed_lag(self._admin, self._consumer, specs).items():
            counts[self.topics[tp.topic]] += lag
        return counts

    def close(self) -> None:
        self._consumer.close()
        self._admin.close()
