"""The transaction rule, validation and exact decimals (no services)."""

import json
import random
from decimal import Decimal

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from sources.transactions import generate
from tasks.settings import Settings
from tasks.transactions import (
    Rules,
    Transaction,
    UserTotal,
    alert_values,
    apply_batch,
    changelog_value,
    encode_alerts,
    encode_changelog,
    format_minor,
    frame_of,
    parse_changelog_value,
    parse_records,
    to_minor,
    validate,
)
from tasks.wire import InvalidRecord

RULES = Rules.of(Decimal("2000"), Decimal("-2000"), Decimal("1000000"), scale=2)
T0 = "2024-05-01T12:00:00+00:00"


def tx(user: str, amount: str) -> Transaction:
    return Transaction(user, Decimal(amount), T0)


def kinds(alerts) -> list[tuple[str, str, str]]:
    return [(a["kind"], a["user"], a["total"]) for a in alert_values(alerts, RULES.scale)]


def reference(transactions, deposit=Decimal(2000), withdrawal=Decimal(-2000)):
    """The rule written plainly: one loop, Decimal, a dict of totals."""
    totals: dict[str, Decimal] = {}
    alerts = []
    for t in transactions:
        total = totals[t.user] = totals.get(t.user, Decimal(0)) + t.amount
        if total > deposit:
            alerts.append(("deposit", t.user, total))
        elif total < withdrawal:
            alerts.append(("withdrawal", t.user, total))
    return totals, alerts


def test_exactly_at_the_thresholds_gives_nothing():
    totals, alerts = apply_batch({}, [tx("a", "2000"), tx("b", "-2000.00")], RULES)
    assert alerts.is_empty()
    assert {u: t.minor for u, t in totals.items()} == {"a": 200000, "b": -200000}


def test_one_cent_beyond_alerts():
    _, alerts = apply_batch({}, [tx("a", "2000.01"), tx("b", "-2000.01")], RULES)
    assert kinds(alerts) == [("deposit", "a", "2000.01"), ("withdrawal", "b", "-2000.01")]


def test_every_transaction_while_beyond_alerts_again_until_back_inside():
    batch = [tx("a", "2500"), tx("a", "1"), tx("a", "-0.5"), tx("a", "-501"), tx("a", "-0.5")]
    _, alerts = apply_batch({}, batch, RULES)
    assert kinds(alerts) == [
        ("deposit", "a", "2500.00"),
        ("deposit", "a", "2501.00"),
        ("deposit", "a", "2500.50"),
        # 1999.50: inside, nothing; then 1999.00: nothing
    ]


def test_users_are_independent():
    batch = [tx("a", "1500"), tx("b", "1500"), tx("a", "600"), tx("b", "-3600"), tx("c", "1")]
    totals, alerts = apply_batch({}, batch, RULES)
    assert kinds(alerts) == [("deposit", "a", "2100.00"), ("withdrawal", "b", "-2100.00")]
    assert {u: (t.minor, t.transactions) for u, t in totals.items()} == {
        "a": (210000, 2),
        "b": (-210000, 2),
        "c": (100, 1),
    }


def test_prior_totals_carry_over_and_are_not_modified():
    prior = {"a": UserTotal(199_999, 7, 41, T0)}
    totals, alerts = apply_batch(prior, [tx("a", "0.02")], RULES)
    assert kinds(alerts) == [("deposit", "a", "2000.01")]
    assert totals["a"].minor == 200_001 and totals["a"].transactions == 8
    assert prior == {"a": UserTotal(199_999, 7, 41, T0)}


def test_batches_of_any_size_agree_with_a_plain_decimal_loop():
    stream = list(generate(7, 3000, seed=11))
    want_totals, want_alerts = reference(stream)
    assert len(want_alerts) > 100, "the sample must cross the thresholds many times"
    assert {a[0] for a in want_alerts} == {"deposit", "withdrawal"}
    rng = random.Random(3)
    totals: dict[str, UserTotal] = {}
    got = []
    i = 0
    while i < len(stream):
        n = rng.randint(1, 400)
        new, alerts = apply_batch(totals, stream[i : i + n], RULES)
        totals = totals | new
        got += [(k, u, Decimal(t)) for k, u, t in kinds(alerts)]
        i += n
    assert got == want_alerts
    assert {u: Decimal(format_minor(t.minor, 2)) for u, t in totals.items()} == want_totals


def test_thresholds_finer_than_the_scale_stay_exact():
    rules = Rules.of(Decimal("10.005"), Decimal("-10.005"), Decimal(100), scale=2)
    _, alerts = apply_batch({}, [tx("a", "10.00"), tx("b", "10.01"), tx("c", "-10.01")], rules)
    assert [(a["kind"], a["user"]) for a in alert_values(alerts, 2)] == [
        ("deposit", "b"),
        ("withdrawal", "c"),
    ]


@pytest.mark.parametrize(
    ("text", "minor"),
    [("0", 0), ("-1250", -125000), ("12.5", 1250), ("+0.01", 1), ("7.100", 710), ("-0.00", 0)],
)
def test_decimal_strings_to_minor_units_and_back(text, minor):
    assert to_minor(text, 2) == minor
    assert Decimal(format_minor(minor, 2)) == Decimal(text)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1e3", "6.5E+3", "NaN", "1,5", " 1", "--1", "1.", ".5", "0.001", "\uff11\uff12"],
)
def test_amounts_that_are_not_plain_decimals_at_the_scale_are_invalid(text):
    with pytest.raises(InvalidRecord):
        to_minor(text, 2)


def _value(**fields) -> bytes:
    return json.dumps({"user": "Fido", "amount": "-1250", "time": T0} | fields).encode()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"Fido", None, "empty message"),
        (b"Fido", b"{not json", "not valid JSON"),
        (b"Fido", b"[1, 2]", "not a JSON object"),
        (b"Fido", _value(user=None), "missing user"),
        (b"Fido", _value(user=""), "missing user"),
        (b"Fido", _value(user="   "), "blank user"),
        (b"Fido", _value(user=12), "user must be a string"),
        (b"Fido", _value(amount="twelve"), "is not a decimal number"),
        (b"Fido", _value(amount=12.5), "amount must be a decimal string"),
        (b"Fido", _value(amount=None), "missing amount"),
        (b"Fido", _value(amount="1.001"), "more than 2 decimal places"),
        (b"Fido", _value(amount="1000000.01"), "absurd amount"),
        (b"Fido", _value(amount="-99999999999999"), "absurd amount"),
        (b"Fido", _value(time=None), "missing time"),
        (b"Fido", _value(time="yesterday"), "not ISO-8601"),
        (b"Fido", _value(time="2024-05-01T12:00:00"), "no time zone"),
        (None, _value(), "missing key"),
        (b"Rex", _value(), "key does not match user"),
        (b"Fido", _value(user="\ud800"), "surrogate"),  # not valid Unicode: no key
        (b"Fido", b'{"a": ' * 100_000 + b"}" * 100_000, "not valid JSON"),  # deep nesting
        (b"Fido", _value(amount="\uff11\uff12"), "is not a decimal number"),  # full-width 12
        (b"Fido", _value(amount="6.5e3"), "is not a decimal number"),
    ],
)
def test_bad_transactions_are_rejected_with_a_reason(key, value, reason):
    with pytest.raises(InvalidRecord, match=reason):
        validate(key, value, RULES)


def test_a_time_with_another_offset_is_converted_to_utc():
    *_, at = validate(b"Fido", _value(time="2024-05-01T17:00:00+05:00"), RULES)
    assert at == "2024-05-01T12:00:00+00:00"


def test_the_absurd_bound_itself_is_accepted():
    assert validate(b"Fido", _value(amount="-1000000.00"), RULES) == ("Fido", -100_000_000, T0)


def _record(offset: int, key: bytes | None, value: bytes | None, partition: int):
    return ConsumerRecord("transactions", partition, 0, offset, 0, 0, key, value, [], None, 0, 0, 0)


# The partition Kafka's Java client gives each key on a 3-partition topic with its default
# partitioner (kafka-clients 4.1.1, the broker's own jars in .cache/kafka/libs:
# BuiltInPartitioner.partitionForKey; and the same read back from the RecordMetadata of a
# Java KafkaProducer sending these keys, no explicit partition, to the local broker). An
# independent source: the code under test hashes with kafka-python's murmur2.
JAVA_PARTITION_OF_3 = {b"Fido": 1, b"Rex": 0, b"user-1": 2}


def test_parse_records_keeps_order_and_rejects_users_off_their_partition():
    home = JAVA_PARTITION_OF_3
    records = [
        _record(0, b"Fido", _value(amount="1"), home[b"Fido"]),
        _record(1, b"Fido", b"oops", home[b"Fido"]),
        _record(2, b"Fido", _value(amount="2"), (home[b"Fido"] + 1) % 3),
        _record(3, b"Fido", _value(amount="3"), home[b"Fido"]),
        _record(4, b"Rex", _value(user="Rex", amount="4"), home[b"Rex"]),
        _record(5, b"Rex", _value(user="Rex", amount="5"), (home[b"Rex"] + 1) % 3),
        _record(6, b"user-1", _value(user="user-1", amount="6"), home[b"user-1"]),
        _record(7, b"user-1", _value(user="user-1", amount="7"), (home[b"user-1"] + 1) % 3),
    ]
    frame, rejects = parse_records(records, RULES, partitions=3)
    assert frame["offset"].to_list() == [0, 3, 4, 6]
    assert frame["amount"].to_list() == [100, 300, 400, 600]
    assert [(r.offset, reason.split(":")[0]) for r, reason in rejects] == [
        (1, "not valid JSON"),
        (2, "on partition 2 but its key hashes to 1"),
        (5, "on partition 1 but its key hashes to 0"),
        (7, "on partition 0 but its key hashes to 2"),
    ]


def test_changelog_values_round_trip_exactly():
    total = UserTotal(-123456789012345678901234567, 3, 99, T0)
    value = changelog_value("Fido", total, 2)
    assert value["total"] == "-1234567890123456789012345.67"
    assert parse_changelog_value("Fido", json.loads(json.dumps(value)), 2) == total
    with pytest.raises(ValueError, match="malformed"):
        parse_changelog_value("Rex", value, 2)


def test_generator_is_seeded_and_crosses_thresholds_many_times():
    a = list(generate(10, 500, seed=5))

    def picks(seed):
        return [(t.user, t.amount) for t in generate(10, 500, seed=seed)]

    assert [(t.user, t.amount) for t in a] == picks(5) != picks(6)
    _, alerts = reference(a)
    assert len(alerts) > 20
    assert frame_of(a, RULES).height == 500


def test_rules_come_from_settings(monkeypatch):
    monkeypatch.setenv("DEPOSIT_ALERT_THRESHOLD", "100.5")
    monkeypatch.setenv("TRANSACTION_MAX_ABS_AMOUNT", "5000")
    rules = Rules.from_settings(Settings(_env_file=None))
    assert (rules.deposit_above, rules.withdrawal_below, rules.max_abs_minor) == (
        10050,
        -200000,
        500000,
    )


def test_vectorised_encodings_equal_the_plain_json():
    batch = [*generate(6, 400, seed=2), tx('Q"uote é', "-2500.5")]
    totals, alerts = apply_batch({}, batch, RULES)
    encoded = encode_alerts(alerts, 2)
    assert [json.loads(v) for _, v, _ in encoded] == alert_values(alerts, 2)
    assert [(k.decode(), p) for k, _, p in encoded] == list(
        zip(alerts["user"].to_list(), alerts["partition"].to_list(), strict=True)
    )
    assert {k.decode(): json.loads(v) for k, v in encode_changelog(totals, 2)} == {
        u: changelog_value(u, t, 2) for u, t in totals.items()
    }
    assert encode_changelog({}, 2) == []
