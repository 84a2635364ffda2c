"""The wire rules every domain shares, and the dead-letter wording each domain keeps."""

import json
import random
from datetime import UTC, datetime
from decimal import Decimal, localcontext

import pytest
from kafka.partitioner import DefaultPartitioner

from tasks import jobs, prices, transactions
from tasks.wire import (
    DecimalReasons,
    InvalidRecord,
    TimeReasons,
    aware_time,
    key_partition,
    minor_units,
    try_minor_units,
)

TIME = TimeReasons(
    not_iso="{name}: {value!r} ({short!r}) is not ISO", naive="{name}: {value!r} naive"
)
DECIMAL = DecimalReasons(
    not_decimal="{name} {short!r} bad", too_precise="{name} {value!r} > {scale}"
)
RULES = transactions.Rules.of(Decimal("2000"), Decimal("-2000"), Decimal("1000000"), scale=2)
T0 = "2024-05-01T12:00:00+00:00"


def refusal(call, *args) -> str:
    with pytest.raises(InvalidRecord) as refused:
        call(*args)
    return str(refused.value)


# --- one exception ------------------------------------------------------------------------


def test_every_domain_refuses_a_record_with_the_one_invalid_record():
    assert issubclass(InvalidRecord, ValueError)
    refusal(prices.parse_trade, b"{not json")
    refusal(prices.parse_alert, b"a1", b"{not json")
    refusal(transactions.validate, b"Fido", b"{not json", RULES)
    refusal(jobs.parse_job, b"{not json", "payments", jobs.Priority.NORMAL)


# --- times --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00+00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T14:30:00.5+02:30", datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        ("2024-04-30T23:00:00-13:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ],
)
def test_an_aware_time_is_the_instant_it_names(text, instant):
    moment = aware_time(text, "time", TIME)
    assert moment == instant
    assert moment.utcoffset() is not None


def test_a_naive_time_is_refused_in_the_callers_words():
    assert refusal(aware_time, "2024-05-01T12:00:00", "at", TIME) == (
        "at: '2024-05-01T12:00:00' naive"
    )


@pytest.mark.parametrize("text", ["yesterday", "", "2024-13-01T00:00:00Z", "12:00", "x" * 60])
def test_a_malformed_time_is_refused_quoting_at_most_40_characters_in_short(text):
    assert refusal(aware_time, text, "at", TIME) == f"at: {text!r} ({text[:40]!r}) is not ISO"


# --- exact decimals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scale", "units"),
    [
        ("0", 2, 0),
        ("-0.00", 2, 0),
        ("12.5", 2, 1250),
        ("+0.01", 2, 1),
        ("-1250", 2, -125000),
        ("-0.5", 2, -50),
        ("1.500", 2, 150),  # trailing zeros past the scale are exact
        ("7", 0, 7),
        ("7.000", 0, 7),
        ("6500.01", 8, 650001000000),
        ("0.00000001", 8, 1),
        ("007.10", 2, 710),
        ("9" * 40 + "." + "9" * 8, 8, int("9" * 48)),
        ("-" + "1" * 40, 0, -int("1" * 40)),
    ],
)
def test_plain_decimals_are_exact_integer_units(text, scale, units):
    assert try_minor_units(text, scale) == units
    assert minor_units(text, scale, "amount", DECIMAL) == units


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1e3", "6.5E+3", "NaN", "Infinity", "1,5", " 1", "1 ", "--1", "+-1", "1.", ".5",
     "1_000", "\uff11\uff12", "\u0661\u0662", "0x10", "1" * 41, "1." + "1" * 41, "-", "1.2.3"],
)  # fmt: skip
def test_what_is_not_a_plain_decimal_is_refused_as_such(text):
    assert try_minor_units(text, 2) is None
    assert refusal(minor_units, text, 2, "amount", DECIMAL) == f"amount {text[:40]!r} bad"


@pytest.mark.parametrize(("text", "scale"), [("0.001", 2), ("7.5", 0), ("1.000000001", 8)])
def test_more_places_than_the_scale_are_refused_never_rounded(text, scale):
    assert try_minor_units(text, scale) is None
    assert refusal(minor_units, text, scale, "amount", DECIMAL) == f"amount {text!r} > {scale}"


def test_units_agree_with_decimal_arithmetic_on_random_decimals():
    rng = random.Random(7)
    for _ in range(5000):
        scale = rng.randint(0, 10)
        text = rng.choice(["", "-", "+"]) + "0" * rng.randint(0, 2)
        text += str(rng.randint(0, 10 ** rng.randint(0, 30)))
        if rng.random() < 0.8:
            text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14)))
        with localcontext() as ctx:
            ctx.prec = 100  # exact: scaleb would round to 28 digits in the default context
            exact = Decimal(text).scaleb(scale)
        expected = int(exact) if exact == exact.to_integral_value() else None
        assert try_minor_units(text, scale) == expected, (text, scale)


def test_prices_fast_path_agrees_with_the_price_contract_on_random_text():
    rng = random.Random(3)
    for _ in range(3000):
        text = rng.choice(["", "-", "+", " "]) + str(rng.randint(0, 10 ** rng.randint(0, 12)))
        if rng.random() < 0.8:
            text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 10)))
        number = Decimal(text.strip())
        valid = 0 < number < 10**10 and number == round(number, 8)
        if valid:
            assert prices.decimal_units(text, "price") == int(number * 10**8), text
        else:
            with pytest.raises(InvalidRecord):
                prices.decimal_units(text, "price")


# --- each domain keeps its wording --------------------------------------------------------


def _transaction(**fields) -> bytes:
    return json.dumps({"user": "Fido", "amount": "-1250", "time": T0} | fields).encode()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_transaction(amount="ten"), "amount 'ten' is not a decimal number"),
        (_transaction(amount="x" * 50), f"amount {'x' * 40!r} is not a decimal number"),
        (_transaction(amount="1.001"), "amount '1.001' has more than 2 decimal places"),
        (_transaction(time="yesterday"), "time 'yesterday' is not ISO-8601"),
        (_transaction(time="y" * 50), f"time {'y' * 40!r} is not ISO-8601"),
        (
            _transaction(time="2024-05-01T12:00:00"),
            "time '2024-05-01T12:00:00' has no time zone (times are UTC)",
        ),
    ],
)
def test_transactions_keep_their_reasons(value, reason):
    assert refusal(transactions.validate, b"Fido", value, RULES) == reason


@pytest.mark.parametrize(
    ("call", "args", "reason"),
    [
        (prices.decimal_units, ("x", "price"),
         "price: 'x' is not a decimal (ASCII digits with an optional fraction)"),
        (prices.decimal_units, ("-1.000000001", "price"), "price: '-1.000000001' is not positive"),
        (prices.decimal_units, ("10000000000.000000001", "size"),
         "size: '10000000000.000000001' is too large (limit 9999999999.99999999)"),
        (prices.decimal_units, ("1.000000001", "price"),
         "price: '1.000000001' has more than 8 decimal places"),
        (prices.parse_time_us, ("yesterday",), "time: 'yesterday' is not an ISO-8601 time"),
        (prices.parse_time_us, ("2024-05-01T12:00:00", "created_at"),
         "created_at: '2024-05-01T12:00:00' has no timezone (expected UTC, e.g. ...Z)"),
        (prices.parse_time_us, (5,), "time: 5 is not an ISO-8601 string"),
    ],
)  # fmt: skip
def test_prices_keep_their_reasons(call, args, reason):
    assert refusal(call, *args) == reason


# --- partitions ---------------------------------------------------------------------------


class _Cluster:
    """Just enough cluster metadata for kafka-python's DefaultPartitioner."""

    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))

    def topics(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


def test_key_partition_gives_the_partitions_the_java_client_gives():
    # Kafka's Java default partitioner over 1000 partitions, as kafka-python's own tests
    # record it.
    java = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"123456789": 566, b"\x00 ": 742}
    assert {key: key_partition(key, 1000) for key in java} == java


def test_key_partition_is_kafka_pythons_default_partitioner_on_random_keys():
    rng = random.Random(11)
    partitioner = DefaultPartitioner()
    for _ in range(3000):
        key = rng.randbytes(rng.randint(0, 40))
        partitions = rng.randint(1, 64)
        expected = partitioner.partition("t", None, key, None, None, _Cluster(partitions))
        assert key_partition(key, partitions) == expected, (key, partitions)
