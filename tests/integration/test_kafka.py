"""The Kafka plumbing against the real broker."""

import time

import pytest
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import CommitFailedError, RebalanceInProgressError

from tasks.kafka import (
    BrokerUnavailableError,
    TopicSpec,
    decode_json,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    wait_for_broker,
)
from tasks.settings import Settings

pytestmark = pytest.mark.integration


def test_topic_creation_is_idempotent_and_applies_compaction(settings, unique):
    specs = [TopicSpec(f"plain-{unique}", 3), TopicSpec(f"compact-{unique}", 2, compacted=True)]
    assert sorted(ensure_topics(specs, settings)) == sorted(s.name for s in specs)
    assert ensure_topics(specs, settings) == []
    admin = make_admin(settings)
    try:
        described = {t["name"]: t for t in admin.describe_topics([s.name for s in specs])}
        assert len(described[f"plain-{unique}"]["partitions"]) == 3
        assert len(described[f"compact-{unique}"]["partitions"]) == 2
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, f"compact-{unique}")]
        )
        assert "'cleanup.policy', 'compact'" in str(configs) or "compact" in str(configs)
    finally:
        admin.close()


def _poll_until(consumers, seen, done, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not done():
        for consumer, got in zip(consumers, seen, strict=True):
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    got[r.key.decode()] = decode_json(r.value)["n"]
            try:
                consumer.commit()
            except (RebalanceInProgressError, CommitFailedError):
                pass  # the group is rebalancing; the next poll rejoins


def test_two_consumers_in_a_group_split_the_partitions(settings, unique):
    topic = f"split-{unique}"
    ensure_topics([TopicSpec(topic, 4)], settings)
    group = f"group-{unique}"
    consumers = [make_consumer(topic, settings=settings, group_id=group) for _ in range(2)]
    for consumer in consumers:
        # Metadata before the first join (as the stream runtime does): a member assigned a
        # topic it has no metadata for yet may never fetch it.
        consumer.topics()
    seen: list[dict[str, int]] = [{}, {}]
    sent = {f"k{i}": i for i in range(200)}
    try:
        # Join both members first, so no record is handed over in a rebalance.
        _poll_until(consumers, seen, lambda: all(len(c.assignment()) == 2 for c in consumers), 60)
        producer = make_producer(settings)
        for key, value in sent.items():
            producer.send(topic, key=key, value={"n": value})
        producer.flush()
        _poll_until(consumers, seen, lambda: len(seen[0]) + len(seen[1]) >= len(sent), 60)
        assignments = [{tp.partition for tp in c.assignment()} for c in consumers]
    finally:
        for consumer in consumers:
            consumer.close()
    assert assignments[0].isdisjoint(assignments[1])
    assert assignments[0] | assignments[1] == {0, 1, 2, 3}
    assert seen[0] and seen[1], "each consumer got a share"
    assert seen[0].keys().isdisjoint(seen[1].keys())
    assert {**seen[0], **seen[1]} == sent


def test_unreachable_broker_gives_a_clear_error_in_time():
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1", kafka_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1 within 2s"):
        wait_for_broker(settings)
    assert time.monotonic() - started < 15
