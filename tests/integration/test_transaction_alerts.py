"""The transaction-alerts worker against the real broker (in-process workers)."""

import pytest

from sources.transactions import generate
from stream_workers.transaction_alerts import TransactionAlertsWorker
from tasks.kafka import TopicSpec, ensure_topics, make_producer
from tests.helpers import eventually, read_topic
from tests.integration._transactions import (
    MALFORMED,
    alerts_by_user,
    changelog_totals,
    dead_letters,
    produce,
    reference,
    worker_thread,
)

pytestmark = pytest.mark.integration


def test_alerts_changelog_and_dead_letters_match_a_reference_across_a_restart(settings):
    stream = list(generate(8, 1200, seed=21))
    first, second = stream[:700], stream[700:]
    # Malformed messages among the good ones; the worker must go on past each.
    produce(settings, first[:300] + [m[:2] for m in MALFORMED] + first[300:])
    with worker_thread(settings, instance="a", batch_size=200) as worker:
        eventually(lambda: worker.stats.records == len(first) + len(MALFORMED), 60)
        assert worker.stats.aborts == 0

    want_alerts, want_totals = reference(first)
    assert alerts_by_user(settings) == want_alerts
    assert changelog_totals(settings) == want_totals

    letters = dead_letters(settings)
    assert [d["value"] for d in letters] == [m[1].decode() for m in MALFORMED]
    for letter, (_, _, reason) in zip(letters, MALFORMED, strict=True):
        assert letter["reason"].startswith(reason), letter
        assert letter["topic"] == settings.transactions_topic

    # A new process (another instance) restores the totals from the changelog and goes on.
    produce(settings, second)
    with worker_thread(settings, instance="b") as worker:
        eventually(lambda: worker.stats.records == len(second), 60)
        assert worker.restored_users == len(want_totals)

    want_alerts, want_totals = reference(stream)
    assert sum(map(len, want_alerts.values())) > 100
    assert alerts_by_user(settings) == want_alerts
    assert changelog_totals(settings) == want_totals
    assert len(dead_letters(settings)) == len(MALFORMED)


def test_a_poison_record_in_the_changelog_is_dead_lettered_and_the_worker_serves(settings):
    stream = list(generate(6, 900, seed=33))
    first, second = stream[:400], stream[400:]
    produce(settings, first)
    with worker_thread(settings, instance="a") as worker:
        eventually(lambda: worker.stats.records == len(first), 60)
    changelog = settings.transaction_totals_changelog_topic
    latest = {r.key: r.partition for r in read_topic(settings, changelog)}
    victim = sorted(latest)[0]
    # Planted behind the worker's back: garbage for a user with a total, and a record of a
    # user it never saw (nothing good to fall back on).
    producer = make_producer(settings, key_serializer=None, value_serializer=None)
    producer.send(changelog, key=victim, value=b"not json", partition=latest[victim])
    producer.send(changelog, key=b"Ghost", value=b'{"total": "1"}', partition=0)
    producer.flush()
    producer.close()

    produce(settings, second)
    with worker_thread(settings, instance="b") as worker:
        eventually(lambda: worker.stats.records == len(second), 60)
        assert worker.bad_changelog_records == 2
    # The poisoned user goes on from its last good total: every output as if no poison.
    want_alerts, want_totals = reference(stream)
    assert alerts_by_user(settings) == want_alerts
    assert changelog_totals(settings) == want_totals
    letters = dead_letters(settings, changelog)
    assert sorted((d["key"], d["value"]) for d in letters) == sorted(
        [("Ghost", '{"total": "1"}'), (victim.decode(), "not json")]
    )
    assert all(d["topic"] == changelog for d in letters), letters
    assert all(d["reason"].startswith("bad changelog record: ") for d in letters), letters

    # The poison was superseded: the next restore neither meets it nor dead-letters it again.
    with worker_thread(settings, instance="c") as worker:
        eventually(lambda: worker.owned == {0, 1, 2}, 60)
        assert worker.bad_changelog_records == 0
        assert worker.restored_users == len(want_totals)
    assert len(dead_letters(settings, changelog)) == 2


def test_at_least_once_mode_gives_the_same_output_when_nothing_fails(settings):
    stream = list(generate(5, 400, seed=4))
    produce(settings, stream)
    with worker_thread(settings, exactly_once=False) as worker:
        eventually(lambda: worker.stats.records == len(stream), 60)
    want_alerts, want_totals = reference(stream)
    assert alerts_by_user(settings) == want_alerts
    assert changelog_totals(settings) == want_totals


def test_a_changelog_not_co_partitioned_with_the_source_is_refused(settings):
    ensure_topics([TopicSpec(settings.transaction_totals_changelog_topic, 2, compacted=True)],
                  settings)  # fmt: skip
    with pytest.raises(SystemExit, match="same partitions"):
        TransactionAlertsWorker(settings)
