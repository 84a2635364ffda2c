"""The Kafka plumbing against the real broker."""

import threading
import time
from typing import Any

import pytest
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

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
from tests.helpers import eventually, group_report

pytestmark = pytest.mark.integration


def _cleanup_policy(admin, topic: str) -> str:
    """The topic's effective `cleanup.policy` (its own setting or the broker's default)."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=["cleanup.policy"])
    configs = admin.describe_configs([resource], config_filter="all")
    return configs["topic"][topic]["cleanup.policy"]["value"]


def test_topic_creation_is_idempotent_and_applies_compaction(settings, unique):
    specs = [TopicSpec(f"plain-{unique}", 3), TopicSpec(f"compact-{unique}", 2, compacted=True)]
    assert sorted(ensure_topics(specs, settings)) == sorted(s.name for s in specs)
    assert ensure_topics(specs, settings) == []
    admin = make_admin(settings)
    try:
        described = {t["name"]: t for t in admin.describe_topics([s.name for s in specs])}
        assert len(described[f"plain-{unique}"]["partitions"]) == 3
        assert len(described[f"compact-{unique}"]["partitions"]) == 2
        assert _cleanup_policy(admin, f"compact-{unique}") == "compact"
        assert _cleanup_policy(admin, f"plain-{unique}") == "delete"
    finally:
        admin.close()


def _topic_ready(settings: Settings, topic: str, partitions: int) -> bool:
    """The broker's metadata has every partition of `topic`, each with a leader."""
    admin = make_admin(settings)
    try:
        (described,) = admin.describe_topics([topic])
    except KafkaError:
        return False
    finally:
        admin.close()
    leaders = {p["partition_index"]: p["leader_id"] for p in described.get("partitions", [])}
    return sorted(leaders) == list(range(partitions)) and all(n >= 0 for n in leaders.values())


def _group_assignment(settings: Settings, group: str, topic: str) -> tuple[str, list[set[int]]]:
    """The group's state and each member's partitions of `topic`, as the broker sees them."""
    admin = make_admin(settings)
    try:
        description = admin.describe_groups([group])[group]
    finally:
        admin.close()
    members = []
    for member in description["members"]:
        assignment: Any = member.get("member_assignment") or {}
        members.append({p for a in assignment.get("assigned_partitions", [])
                        if a["topic"] == topic for p in a["partitions"]})  # fmt: skip
    return description["group_state"], members


def test_two_consumers_in_a_group_split_the_partitions(settings, unique):
    topic = f"split-{unique}"
    group = f"group-{unique}"
    ensure_topics([TopicSpec(topic, 4)], settings)
    # A freshly created topic reaches the broker's metadata a little later. Members joining
    # before it is there are assigned nothing ("No partition metadata"), then rebalance
    # again when it shows up; kafka-python's poll can stay stuck through that rebalance
    # while the other member ends up with every partition. So: metadata first.
    eventually(lambda: _topic_ready(settings, topic, 4), 60, 0.1,
               lambda: f"{topic} has no leader for every partition yet")  # fmt: skip
    sent = {f"k{i}": i for i in range(200)}
    seen: list[dict[str, int]] = [{}, {}]
    foreign: list[list[tuple[int, str]]] = [[], []]  # records from partitions not held
    assignments: list[set[int]] = [set(), set()]
    history: list[list[set[int]]] = [[], []]  # every assignment each member held
    metadata_known = threading.Barrier(2, timeout=120)
    done = threading.Event()
    errors: list[BaseException] = []

    def member(i: int) -> None:
        # Each member polls on its own thread, as separate processes would.
        consumer = make_consumer(topic, settings=settings, group_id=group)
        try:
            # Both members know the topic's partitions before either joins the group: the
            # leader assigns from its own metadata.
            eventually(lambda: consumer.partitions_for_topic(topic) == {0, 1, 2, 3}, 60, 0.1)
            metadata_known.wait()
            while not done.is_set():
                polled = consumer.poll(timeout_ms=100)
                held = {tp.partition for tp in consumer.assignment()}
                for tp, records in polled.items():
                    for r in records:
                        if tp.partition not in held:
                            foreign[i].append((tp.partition, r.key.decode()))
                        seen[i][r.key.decode()] = decode_json(r.value)["n"]
                if held != assignments[i]:
                    assignments[i] = held
                    history[i].append(held)
                try:
                    consumer.commit()
                except (RebalanceInProgressError, CommitFailedError):
                    pass  # the group is rebalancing; the next poll rejoins
        except BaseException as error:  # surfaced below
            errors.append(error)
            metadata_known.abort()  # the other member stops waiting for this one
        finally:
            consumer.close()

    def state() -> str:
        return (
            f"member assignments {assignments} (history {history}), seen "
            f"{len(seen[0])} + {len(seen[1])} of {len(sent)}, errors {errors!r}\n"
            + group_report(settings, group, [topic])
        )

    def split_settled() -> bool:
        """Broker: group Stable, two members, 2 + 2 partitions; and each member applied it."""
        group_state, members = _group_assignment(settings, group, topic)
        if group_state != "Stable" or len(members) != 2 or errors:
            return False
        if sorted(map(sorted, members)) != sorted(map(sorted, assignments)):
            return False
        return all(len(m) == 2 for m in members) and members[0] | members[1] == {0, 1, 2, 3}

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        # Both members joined and hold their final shares before anything is produced, so no
        # record is handed over in a rebalance.
        eventually(lambda: split_settled() or errors, 90, 0.1, state)
        assert not errors, errors
        held = [set(a) for a in assignments]
        producer = make_producer(settings)
        try:
            futures = {
                key: producer.send(topic, key=key, value={"n": n}) for key, n in sent.items()
            }
            producer.flush()
            partition_of = {
                key: future.get(timeout=30).partition for key, future in futures.items()
            }
        finally:
            producer.close()
        expected = [{k: n for k, n in sent.items() if partition_of[k] in held[i]} for i in range(2)]
        assert expected[0] and expected[1], f"no record for a member's partitions: {partition_of}"
        # Each member receives exactly the records of its own partitions.
        eventually(lambda: (seen[0], seen[1]) == (expected[0], expected[1]) or errors, 60, 0.1,
                   lambda: f"expected {len(expected[0])} + {len(expected[1])}\n{state()}")  # fmt: skip
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert assignments == held, f"a rebalance after producing: {history}"
    assert foreign == [[], []], foreign
    assert seen == expected


def test_unreachable_broker_gives_a_clear_error_in_time():
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1", kafka_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1 within 2s"):
        wait_for_broker(settings)
    # A lower bound only: it keeps trying for KAFKA_TIMEOUT_S (a broker still starting up
    # gets that long) instead of giving up at the first refused connection.
    elapsed = time.monotonic() - started
    assert elapsed >= settings.kafka_timeout_s * 0.95, f"gave up after {elapsed:.2f}s"
