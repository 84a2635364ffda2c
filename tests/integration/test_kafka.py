"""The Kafka plumbing against the real broker."""

import threading
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
from tests.helpers import eventually

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


def test_two_consumers_in_a_group_split_the_partitions(settings, unique):
    topic = f"split-{unique}"
    ensure_topics([TopicSpec(topic, 4)], settings)
    group = f"group-{unique}"
    sent = {f"k{i}": i for i in range(200)}
    seen: list[dict[str, int]] = [{}, {}]
    assignments: list[set[int]] = [set(), set()]
    done = threading.Event()
    errors: list[BaseException] = []

    def member(i: int) -> None:
        # Each member polls on its own thread, as separate processes would.
        consumer = make_consumer(topic, settings=settings, group_id=group)
        consumer.topics()  # metadata before the first join, as the stream runtime does
        try:
            while not done.is_set():
                for records in consumer.poll(timeout_ms=100).values():
                    for r in records:
                        seen[i][r.key.decode()] = decode_json(r.value)["n"]
                assignments[i] = {tp.partition for tp in consumer.assignment()}
                try:
                    consumer.commit()
                except (RebalanceInProgressError, CommitFailedError):
                    pass  # the group is rebalancing; the next poll rejoins
        except BaseException as error:  # surfaced below
            errors.append(error)
        finally:
            consumer.close()

    def state() -> str:
        return f"assignments {assignments}, seen {len(seen[0])} + {len(seen[1])}, errors {errors}"

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        # Both members joined first, so no record is handed over in a rebalance.
        eventually(lambda: all(len(a) == 2 for a in assignments), 60, 0.1, state)
        producer = make_producer(settings)
        for key, value in sent.items():
            producer.send(topic, key=key, value={"n": value})
        producer.flush()
        producer.close()
        eventually(lambda: len(seen[0]) + len(seen[1]) >= len(sent), 60, 0.1, state)
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
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
