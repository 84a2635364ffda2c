"""Restoring totals from the changelog: tombstones, poison records and what supersedes them."""

import json

from kafka.consumer.fetcher import ConsumerRecord

from tasks.transactions import UserTotal, changelog_value, fold_changelog

T0 = "2024-05-01T12:00:00+00:00"


def record(offset: int, key: bytes | None, value: bytes | None, partition: int = 0):
    return ConsumerRecord("changelog", partition, 0, offset, 0, 0, key, value, None, None,
                          len(key or b""), len(value or b""), -1)  # fmt: skip


def total(user: str, minor: int, count: int) -> bytes:
    return json.dumps(changelog_value(user, UserTotal(minor, count, 0, T0), 2)).encode()


def test_a_poison_record_keeps_the_last_good_total_and_is_reported():
    records = [
        record(0, b"Rex", total("Rex", 1000, 1)),
        record(1, b"Fido", total("Fido", 500, 2)),
        record(2, b"Rex", b"not json"),
        record(3, None, total("Rex", 1, 1)),  # no key: nothing can supersede it
    ]
    state, bad = fold_changelog(records, [0, 1], 2)
    assert state[0]["Rex"].minor == 1000 and state[0]["Fido"].minor == 500
    assert state[1] == {}
    assert [(r.offset, reason.split(":")[0]) for r, reason in bad] == [
        (2, "bad changelog record"),
        (3, "bad changelog record"),
    ]
    assert "JSONDecodeError" in bad[0][1]


def test_a_poison_record_superseded_by_a_later_one_of_its_key_is_not_reported():
    records = [
        record(0, b"Rex", total("Rex", 1000, 1)),
        record(1, b"Rex", b'{"total": "ten"}'),
        record(2, b"Rex", total("Rex", 3000, 2)),
        record(3, b"Fido", b"[]"),
        record(4, b"Fido", None),  # a tombstone supersedes too
        record(0, b"Rex", b"{", partition=1),  # same key, other partition: its own record
    ]
    state, bad = fold_changelog(records, [0, 1], 2)
    assert state[0] == {"Rex": state[0]["Rex"]} and state[0]["Rex"].minor == 3000
    assert [(r.partition, r.offset) for r, _ in bad] == [(1, 0)]
