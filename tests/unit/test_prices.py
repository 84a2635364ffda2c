"""The price-alert rule at its edges, the parsers, the stream state (no services)."""

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from kafka.partitioner.default import DefaultPartitioner

from flows.price_averages import validate_as_of, validate_product
from sources.price_alerts import main as alerts_main
from sources.price_alerts import validate_alert
from sources.trades import random_walk
from tasks.prices import (
    AlertBook,
    AlertRow,
    PriceState,
    ProductWindow,
    TradeRow,
    decimal_units,
    exact_average,
    fires,
    format_units,
    parse_alert,
    parse_trade,
    product_partition,
    reached_units,
    to_us,
    window_average_units,
)
from tasks.wire import InvalidRecord

T = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MIN = 60_000_000  # microseconds


def trade_json(**overrides) -> bytes:
    value = {"trade_id": 1, "product_id": "BTC-USD", "price": "6500.01", "size": "0.01",
             "side": "buy", "time": T.isoformat()} | overrides  # fmt: skip
    return json.dumps({k: v for k, v in value.items() if v is not ...}).encode()


def reference(trades: list[tuple[int, Decimal]], end_us: int, minutes: int = 10):
    """Brute force: the exact average of the prices with end - window <= time <= end."""
    inside = [p for t, p in trades if end_us - minutes * MIN <= t <= end_us]
    return exact_average(inside)


# --- the rule at its edges ---------------------------------------------------------------


def test_a_trade_exactly_ten_minutes_old_is_inside_and_one_microsecond_older_is_not():
    end = to_us(T)
    trades = [(end - 10 * MIN, Decimal("100")), (end, Decimal("200"))]
    assert reference(trades, end) == Decimal("150.00000000")
    window = ProductWindow(10 * MIN)
    window.add(end - 10 * MIN - 1, 10_000 * 10**8)
    window.add(end - 10 * MIN, 100 * 10**8)
    window.add(end, 200 * 10**8)
    assert window.count == 2
    assert format_units(window.average_units()) == "150.00000000"


def test_average_equal_to_the_threshold_fires_and_one_unit_below_does_not():
    state = PriceState(10)
    state.alerts.upsert(AlertRow("at", "u1", "BTC-USD", decimal_units("150.00", "t"), "150.00", ""))
    state.alerts.upsert(AlertRow("above", "u2", "BTC-USD", 150 * 10**8 + 1, "150.00000001", ""))
    end = to_us(T)
    first = state.on_trade(TradeRow(1, "BTC-USD", 100 * 10**8, 1, "buy", end - 10 * MIN))
    assert first.fired == []
    second = state.on_trade(TradeRow(2, "BTC-USD", 200 * 10**8, 1, "buy", end))
    assert second.average_units == 150 * 10**8
    assert [a.alert_id for a in second.fired] == ["at"]
    assert "at" not in state.alerts and "above" in state.alerts  # fires once, then removed
    assert fires(300 * 10**8, 2, 150 * 10**8) and not fires(300 * 10**8 - 1, 2, 150 * 10**8)
    assert not fires(0, 0, 1)


def test_an_average_that_only_rounds_up_to_the_threshold_does_not_fire():
    # 1, 1, 0.99999999: exact average 0.99999999666..., rounded half-even to 1.00000000.
    state = PriceState(10)
    state.alerts.upsert(AlertRow("one", "u1", "BTC-USD", decimal_units("1", "t"), "1", ""))
    end = to_us(T)
    # Lowest first: after two trades the average is 0.999999995, rounded (half-even) to 1 too.
    for i, price in enumerate(["0.99999999", "1.00000000", "1.00000000"]):
        evaluation = state.on_trade(
            TradeRow(i, "BTC-USD", decimal_units(price, "price"), 1, "buy", end)
        )
        assert evaluation.fired == [] and "one" in state.alerts, price
    assert format_units(evaluation.average_units) == "1.00000000"
    units = 3 * 10**8 - 1
    assert not fires(units, 3, 10**8) and reached_units(units, 3) == 10**8 - 1


def test_an_empty_window_has_no_average():
    assert window_average_units(0, 0) is None
    assert exact_average([]) is None


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        (["0.00000001", "0.00000002"], "0.00000002"),  # 1.5 units -> 2 (half to even)
        (["0.00000002", "0.00000003"], "0.00000002"),  # 2.5 units -> 2 (half to even)
        (["0.00000003", "0.00000004"], "0.00000004"),  # 3.5 units -> 4
        (["1", "1", "2"], "1.33333333"),
        (["1", "2", "2"], "1.66666667"),
        (["6500.01", "6500.02"], "6500.01500000"),
    ],
)
def test_rounding_is_half_to_even_at_eight_places(prices, expected):
    units = [decimal_units(p, "price") for p in prices]
    assert format_units(window_average_units(sum(units), len(units))) == expected
    assert format(exact_average([Decimal(p) for p in prices]), "f") == expected


def test_integer_average_matches_the_decimal_definition_on_random_windows():
    rng = random.Random(3)
    for _ in range(3000):
        n = rng.randint(1, 40)
        prices = [Decimal(rng.randint(1, 10**9)).scaleb(-rng.choice([0, 2, 8])) for _ in range(n)]
        if rng.random() < 0.3:  # force exact halves
            prices = [Decimal(rng.randint(1, 9)).scaleb(-8) for _ in range(2)]
        units = [decimal_units(format(p, "f"), "price") for p in prices]
        got = window_average_units(sum(units), len(units))
        assert format_units(got) == format(exact_average(prices), "f"), prices


# --- the stream window --------------------------------------------------------------------


def test_window_with_out_of_order_trades_matches_brute_force():
    rng = random.Random(11)
    window = ProductWindow(10 * MIN)
    accepted: list[tuple[int, Decimal]] = []
    watermark = None
    start = to_us(T)
    clock = start
    for _ in range(4000):
        clock += rng.randint(0, 20_000_000)
        # Mostly in order, some late inside the window, some too late for it.
        t = clock - rng.choice([0, 0, 0, rng.randint(0, 9 * MIN), rng.randint(10 * MIN, 30 * MIN)])
        price = Decimal(rng.randint(1, 10**9)).scaleb(-rng.choice([2, 8]))
        ok = window.add(t, decimal_units(format(price, "f"), "price"))
        expected_ok = watermark is None or t >= watermark - 10 * MIN
        assert ok == expected_ok
        if ok:
            accepted.append((t, price))
            watermark = max(watermark or t, t)
        assert window.watermark_us == watermark
        assert format_units(window.average_units()) == format(reference(accepted, watermark), "f")


def test_alert_book_finds_due_alerts_by_threshold():
    book = AlertBook()
    for i, threshold in enumerate(["10", "20", "20", "30"]):
        book.upsert(AlertRow(f"a{i}", "u", "BTC-USD", decimal_units(threshold, "t"), threshold, ""))
    book.upsert(AlertRow("other", "u", "ETH-USD", 1, "0.00000001", ""))
    assert [a.alert_id for a in book.due("BTC-USD", 20 * 10**8)] == ["a0", "a1", "a2"]
    assert book.due("BTC-USD", 10 * 10**8 - 1) == []
    book.remove("a1")
    book.upsert(AlertRow("a0", "u", "BTC-USD", 25 * 10**8, "25", ""))  # threshold changed
    assert [a.alert_id for a in book.due("BTC-USD", 20 * 10**8)] == ["a2"]
    assert book.due("BTC-USD", None) == []


# --- parsing and validation ---------------------------------------------------------------


def test_a_valid_trade_parses_exactly():
    trade = parse_trade(trade_json(time="2024-05-01T14:00:00.5+02:00"))
    assert trade.price_units == 650001000000
    assert trade.time_us == to_us(T) + 500_000


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (trade_json(price=...), "missing field(s): price"),
        (trade_json(time=...), "missing field(s): time"),
        (trade_json(price="abc"), "not a decimal"),
        (trade_json(price="-1.00"), "not positive"),
        (trade_json(price="0"), "not positive"),
        (trade_json(price="NaN"), "not a finite decimal"),
        (trade_json(price=6500.01), "not a decimal string"),
        (trade_json(price="1.000000001"), "more than 8 decimal places"),
        (trade_json(price="10000000000"), "too large"),
        (trade_json(price="123456789012345678901234567890.000000001"), "too large"),
        (trade_json(price="6.5E+3"), "not a decimal"),
        (trade_json(price="6.5e3"), "not a decimal"),
        (trade_json(price="\uff11\uff12"), "not a decimal"),  # full-width "12"
        (trade_json(price="1_000"), "not a decimal"),
        (trade_json(product_id="BTC-USD\n"), "not a product id"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),
        (trade_json(time="yesterday"), "not an ISO-8601 time"),
        (trade_json(time="2024-05-01T12:00:00"), "has no timezone"),
        (trade_json(side="hold"), "side"),
        (trade_json(product_id="btc usd"), "not a product id"),
        (trade_json(trade_id="7"), "not an integer"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (None, "null"),
    ],
)
def test_bad_trades_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidRecord, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_trade(raw)


def test_alert_records_and_tombstones():
    value = {"alert_id": "a1", "user_id": "u", "product_id": "BTC-USD", "threshold": "6500.00",
             "created_at": T.isoformat()}  # fmt: skip
    alert = parse_alert(b"a1", json.dumps(value).encode())
    assert (alert.threshold_units, alert.threshold) == (650000000000, "6500.00")
    assert parse_alert(b"a1", None) is None
    with pytest.raises(InvalidRecord, match="differs"):
        parse_alert(b"other", json.dumps(value).encode())
    with pytest.raises(InvalidRecord, match="not positive"):
        parse_alert(b"a1", json.dumps(value | {"threshold": "-3"}).encode())
    # A user_id that cannot be a Kafka key (a lone surrogate is not valid Unicode text, so
    # the JSON parser refuses it), exponents, deep nesting.
    with pytest.raises(InvalidRecord, match="surrogate"):
        parse_alert(b"a1", json.dumps(value | {"user_id": "\ud800"}).encode())
    with pytest.raises(InvalidRecord, match="not a decimal"):
        parse_alert(b"a1", json.dumps(value | {"threshold": "6.5E+3"}).encode())
    with pytest.raises(InvalidRecord, match="not UTF-8 JSON"):
        parse_alert(b"a1", b'{"a": ' * 100_000 + b"}" * 100_000)
    with pytest.raises(InvalidRecord, match="not a product id"):
        parse_alert(b"a1", json.dumps(value | {"product_id": "BTC-USD\n"}).encode())


@pytest.mark.parametrize(
    "threshold", ["-5", "0", "abc", "", "1e400000", "0.000000001", "6.5E+3", "6.5e3", "\uff11"]
)
def test_a_threshold_that_is_not_a_positive_decimal_is_refused(threshold, capsys):
    with pytest.raises(ValueError, match="threshold"):
        validate_alert("u1", "BTC-USD", threshold)
    # The command refuses it too, before touching Kafka, with the message on stderr.
    code = alerts_main(["create", "--user", "u1", "--product", "BTC-USD", "--threshold", threshold])
    assert code == 2
    assert "threshold" in capsys.readouterr().err


def test_flow_parameters_are_validated_naming_the_bad_value():
    assert validate_as_of("2024-05-01T12:00:00Z") == T
    assert validate_as_of(T.astimezone(UTC)) == T
    with pytest.raises(ValueError, match=r"2024-05-01T12:00:00'.*no timezone"):
        validate_as_of(datetime(2024, 5, 1, 12))
    with pytest.raises(ValueError, match="'soon'"):
        validate_as_of("soon")
    with pytest.raises(ValueError, match="'btc'"):
        validate_product("btc")
    assert validate_product("ETH-USD") == "ETH-USD"


def test_random_walk_is_deterministic_with_a_seed_and_exact():
    a = list(random_walk(["BTC-USD", "ETH-USD"], 500, seed=5, rate=100, start=T))
    b = list(random_walk(["BTC-USD", "ETH-USD"], 500, seed=5, rate=100, start=T))
    c = list(random_walk(["BTC-USD", "ETH-USD"], 500, seed=6, rate=100, start=T))
    assert a == b and a != c
    assert a[-1].time == T + timedelta(seconds=4.99)
    for trade in a:  # every generated trade passes the consumer-side validation
        parsed = parse_trade(json.dumps(trade.message()).encode())
        assert format_units(parsed.price_units) == format(
            trade.price.quantize(Decimal("1E-8")), "f"
        )


def test_product_partition_is_kafkas_default_partitioner():
    class Cluster:
        def topics(self):
            return {"t"}

        def partitions_for_topic(self, topic):
            return {0, 1, 2, 3, 4}

        def available_partitions_for_topic(self, topic):
            return {0, 1, 2, 3, 4}

    partitioner = DefaultPartitioner()
    for product in ["BTC-USD", "ETH-USD", "SOL-EUR", "X1-Y2", "DOGE-USDT"]:
        key = product.encode()
        assert product_partition(product, 5) == partitioner.partition(
            "t", product, key, None, None, Cluster()
        )
