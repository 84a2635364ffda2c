"""Price alerts: the models, the parsing rules and the one ten-minute-average rule.

Both sides call this module: the stream worker (`stream_workers/price_alerts.py`) on every
trade, the batch flow (`flows/price_averages.py`) through the loader's `to_frame` and the
SQL file `sql/prices/window_average.sql`, which implements `window_average_units` in
DuckDB integer arithmetic.

Exactness, the rule both sides apply identically:
- prices and thresholds are positive decimal strings with at most 8 decimal places and
  below 10^10 (they fit DuckDB DECIMAL(18,8)); internally integers of 10^-8 units;
- the window of `T` is every trade with `T - window <= time <= T` (inclusive at both ends);
- an alert fires when the EXACT average >= its threshold: sum >= threshold * count, which
  for a threshold of whole units is floor(sum / count) >= threshold (`reached_units`);
- the reported `average_price` is sum / count rounded half-to-even to 8 places
  (`window_average_units`); it is never what is compared (it may round up to the threshold).
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator

from tasks.kafka import decode_json
from tasks.wire import InvalidRecord, TimeReasons, aware_time, key_partition, try_minor_units

PRICE_SCALE = 8  # decimal places kept for prices, thresholds, sizes and averages
MAX_UNITS = 10**18 - 1  # DECIMAL(18,8)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
PRODUCT_ID = re.compile(r"[A-Z0-9]{2,12}-[A-Z0-9]{2,12}")  # used with fullmatch
SIDES = ("buy", "sell")
TRADE_FIELDS = ("trade_id", "product_id", "price", "size", "side", "time")
TIME_REASONS = TimeReasons(
    not_iso="{name}: {value!r} is not an ISO-8601 time",
    naive="{name}: {value!r} has no timezone (expected UTC, e.g. ...Z)",
)


# --- field rules (shared by the fast parsers and the pydantic models) ----------------------


# The contract's shape: ASCII digits with an optional fraction (no exponent, no "_").
_SHAPE = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_NOT_FINITE = {"nan", "snan", "inf", "infinity"}


def decimal_units(value: Any, name: str) -> int:
    """A positive decimal string (<= 8 places, < 10^10) as an integer of 10^-8 units."""
    if isinstance(value, str):
        # Fast path for the usual "6500.01": plain digits need no Decimal (same result). The
        # Decimal path below words the reason of a refusal, in the price contract's order.
        units = try_minor_units(value, PRICE_SCALE)
        if units is not None and 0 < units <= MAX_UNITS:
            return units
    if isinstance(value, Decimal):
        value = format(value, "f")
    if not isinstance(value, str):
        # JSON numbers would have gone through binary floats somewhere: the contract is strings.
        raise InvalidRecord(f"{name}: {value!r} is not a decimal string")
    text = value.strip()
    if _SHAPE.fullmatch(text) is None:
        if text.lstrip("+-").lower() in _NOT_FINITE:
            raise InvalidRecord(f"{name}: {value!r} is not a finite decimal")
        raise InvalidRecord(
            f"{name}: {value!r} is not a decimal (ASCII digits with an optional fraction)"
        )
    number = Decimal(text)  # cannot fail on that shape
    if number <= 0:
        raise InvalidRecord(f"{name}: {value!r} is not positive")
    # The magnitude before quantize: with <= 10 integer digits it stays within the context
    # precision (28), where quantize of a huge value would raise InvalidOperation.
    if number.adjusted() >= 10:
        raise InvalidRecord(f"{name}: {value!r} is too large (limit 9999999999.99999999)")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent < -PRICE_SCALE and number != number.quantize(Decimal(1).scaleb(-PRICE_SCALE)):
        raise InvalidRecord(f"{name}: {value!r} has more than {PRICE_SCALE} decimal places")
    return int(number.scaleb(PRICE_SCALE))


def format_units(units: int) -> str:
    """Integer 10^-8 units as a plain decimal string with 8 places ("6500.01000000")."""
    return format(Decimal(units).scaleb(-PRICE_SCALE), "f")


def units_to_decimal(units: int) -> Decimal:
    return Decimal(units).scaleb(-PRICE_SCALE)


def parse_time_us(value: Any, name: str = "time") -> int:
    """An ISO-8601 time with a timezone as integer microseconds since the epoch (UTC)."""
    if not isinstance(value, str):
        raise InvalidRecord(f"{name}: {value!r} is not an ISO-8601 string")
    return (aware_time(value, name, TIME_REASONS) - EPOCH) // _MICROSECOND


def time_from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def to_us(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()!r} has no timezone")
    delta = moment - EPOCH  # by fields: datetime subclasses (pendulum) return their own types
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def check_product_id(value: Any, name: str = "product_id") -> str:
    if not isinstance(value, str) or not PRODUCT_ID.fullmatch(value):
        raise InvalidRecord(
            f"{name}: {value!r} is not a product id like 'BTC-USD' (upper-case BASE-QUOTE)"
        )
    return value


# --- the rule -----------------------------------------------------------------------------


def window_average_units(sum_units: int, count: int) -> int | None:
    """sum / count rounded half-to-even to an integer of units; None for an empty window."""
    if count <= 0:
        return None
    quotient, remainder = divmod(sum_units, count)
    twice = 2 * remainder
    if twice > count or (twice == count and quotient % 2 == 1):
        quotient += 1
    return quotient


def exact_average(prices: list[Decimal]) -> Decimal | None:
    """The rule's definition in plain Decimal arithmetic (the reference for the fast paths)."""
    if not prices:
        return None
    with localcontext() as ctx:
        ctx.prec = 80  # far more than 28 integer + 8 fraction digits: the division is exact enough
        mean = sum(prices, Decimal(0)) / len(prices)
        return mean.quantize(Decimal(1).scaleb(-PRICE_SCALE), rounding="ROUND_HALF_EVEN")


def reached_units(sum_units: int, count: int) -> int | None:
    """floor(sum / count): an alert fires iff its threshold <= this; None when empty."""
    return None if count <= 0 else sum_units // count


def fires(sum_units: int, count: int, threshold_units: int) -> bool:
    """The firing rule: the exact window average sum / count reached the threshold."""
    return count > 0 and sum_units >= threshold_units * count


def product_partition(product_id: str, partitions: int) -> int:
    """The `trades` partition of a product: Kafka's default partitioner (murmur2 of the key)."""
    return key_partition(product_id.encode(), partitions)


def fire_transactional_id(prefix: str, trades_topic: str, partition: int) -> str:
    """The transactional id that alone may fire the alerts of a `trades` partition's products."""
    return f"{prefix}-{trades_topic}-{partition}"


def window_bounds_us(end_us: int, window_minutes: int) -> tuple[int, int]:
    """[start, end] of the window ending at `end_us`, both inclusive."""
    return end_us - window_minutes * 60_000_000, end_us


# --- records ------------------------------------------------------------------------------


class TradeRow(NamedTuple):
    """A validated trade in the exact internal form (units, microseconds)."""

    trade_id: int
    product_id: str
    price_units: int
    size_units: int
    side: str
    time_us: int


def parse_trade_value(value: Any) -> TradeRow:
    """Validate a decoded trade message; raises InvalidRecord with the reason."""
    if not isinstance(value, dict):
        raise InvalidRecord(f"a trade must be a JSON object, got {type(value).__name__}")
    missing = [name for name in TRADE_FIELDS if value.get(name) is None]
    if missing:
        raise InvalidRecord(f"missing field(s): {', '.join(missing)}")
    trade_id = value["trade_id"]
    if isinstance(trade_id, bool) or not isinstance(trade_id, int):
        raise InvalidRecord(f"trade_id: {trade_id!r} is not an integer")
    if not -(2**63) <= trade_id < 2**63:
        raise InvalidRecord(f"trade_id: {trade_id!r} does not fit 64 bits")
    side = value["side"]
    if side not in SIDES:
        raise InvalidRecord(f"side: {side!r} is not 'buy' or 'sell'")
    return TradeRow(
        trade_id=trade_id,
        product_id=check_product_id(value["product_id"]),
        price_units=decimal_units(value["price"], "price"),
        size_units=decimal_units(value["size"], "size"),
        side=side,
        time_us=parse_time_us(value["time"]),
    )


def parse_trade(raw: bytes | None) -> TradeRow:
    """Parse and validate a raw trade message (UTF-8 JSON)."""
    if raw is None:
        raise InvalidRecord("empty (null) trade message")
    try:
        value = decode_json(raw)
    except (ValueError, UnicodeError, RecursionError) as error:  # RecursionError: deep nesting
        raise InvalidRecord(f"not UTF-8 JSON: {error}") from None
    return _checked(parse_trade_value, value)


def _checked(parse: Any, *args: Any) -> Any:
    """`parse(*args)`, any error of an unforeseen bad value turned into InvalidRecord."""
    try:
        return parse(*args)
    except InvalidRecord:
        raise
    except (ValueError, ArithmeticError, RecursionError, UnicodeError) as error:
        raise InvalidRecord(f"invalid record: {type(error).__name__}: {error}") from None


@dataclass(frozen=True, slots=True)
class AlertRow:
    """A validated alert: the threshold both as units and as the text the user gave."""

    alert_id: str
    user_id: str
    product_id: str
    threshold_units: int
    threshold: str
    created_at: str


def parse_alert_value(value: Any, key: str | None = None) -> AlertRow:
    if not isinstance(value, dict):
        raise InvalidRecord(f"an alert must be a JSON object, got {type(value).__name__}")
    missing = [n for n in ("alert_id", "user_id", "product_id", "threshold") if not value.get(n)]
    if missing:
        raise InvalidRecord(f"missing field(s): {', '.join(missing)}")
    alert_id, user_id = value["alert_id"], value["user_id"]
    if not isinstance(alert_id, str) or not isinstance(user_id, str):
        raise InvalidRecord("alert_id and user_id must be strings")
    for name, text in (("alert_id", alert_id), ("user_id", user_id)):
        try:
            text.encode()  # they become Kafka keys: a lone surrogate cannot
        except UnicodeEncodeError:
            raise InvalidRecord(f"{name}: {text!r} is not valid Unicode text") from None
    if key is not None and key != alert_id:
        raise InvalidRecord(f"key {key!r} differs from alert_id {alert_id!r}")
    threshold = value["threshold"]
    units = decimal_units(threshold, "threshold")
    created_at = value.get("created_at") or ""
    if created_at:
        parse_time_us(created_at, "created_at")
    return AlertRow(
        alert_id, user_id, check_product_id(value["product_id"]), units, threshold, created_at
    )


def parse_alert(key: bytes | None, raw: bytes | None) -> AlertRow | None:
    """An alert record of the compacted topic; None for a tombstone (the alert is gone)."""
    if key is None:
        raise InvalidRecord("alert record without a key (the key is the alert_id)")
    try:
        key_text = key.decode()
        if raw is None:
            return None
        value = decode_json(raw)
    except (ValueError, UnicodeError, RecursionError) as error:  # RecursionError: deep nesting
        raise InvalidRecord(f"not UTF-8 JSON: {error}") from None
    return _checked(parse_alert_value, value, key_text)


# --- the public models (messages on the topics) --------------------------------------------


def _decimal_text(value: Any, name: str) -> Decimal:
    if isinstance(value, float):
        raise ValueError(f"{name}: {value!r} is a binary float; give a decimal string")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    decimal_units(value, name)
    return Decimal(value.strip()) if isinstance(value, str) else value


class Trade(BaseModel):
    """A trade as it travels on `trades` (key `product_id`)."""

    model_config = ConfigDict(frozen=True)

    trade_id: int
    product_id: str
    price: Decimal
    size: Decimal
    side: Literal["buy", "sell"]
    time: datetime

    @field_validator("product_id")
    @classmethod
    def _product(cls, value: str) -> str:
        return check_product_id(value)

    @field_validator("price", "size", mode="before")
    @classmethod
    def _positive_decimal(cls, value: Any, info) -> Decimal:
        return _decimal_text(value, info.field_name)

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"time: {value.isoformat()!r} has no timezone")
        return value.astimezone(UTC)

    @field_serializer("price", "size")
    def _plain(self, value: Decimal) -> str:
        return format(value, "f")

    def message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PriceAlert(BaseModel):
    """An alert subscription on the compacted `price-alerts` topic (key `alert_id`)."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    user_id: str
    product_id: str
    threshold: Decimal
    created_at: datetime

    @field_validator("user_id", "alert_id")
    @classmethod
    def _not_blank(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name}: must not be blank")
        return value

    @field_validator("product_id")
    @classmethod
    def _product(cls, value: str) -> str:
        return check_product_id(value)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Decimal:
        return _decimal_text(value, "threshold")

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"created_at: {value.isoformat()!r} has no timezone")
        return value.astimezone(UTC)

    @field_serializer("threshold")
    def _plain(self, value: Decimal) -> str:
        return format(value, "f")

    def message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Notification(BaseModel):
    """A fired alert on `notifications` (key `user_id`)."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    user_id: str
    product_id: str
    threshold: str
    average_price: str
    window_end: str
    fired_at: str
    source: Literal["stream", "batch"]


def notification(
    alert: AlertRow, average_units: int, window_end_us: int, source: str
) -> dict[str, Any]:
    """The notification message of `alert` fired on the average of the window ending then."""
    return {
        "alert_id": alert.alert_id,
        "user_id": alert.user_id,
        "product_id": alert.product_id,
        "threshold": alert.threshold,
        "average_price": format_units(average_units),
        "window_end": time_from_us(window_end_us).isoformat(),
        "fired_at": datetime.now(UTC).isoformat(),
        "source": source,
    }


# --- stream state -------------------------------------------------------------------------


@dataclass
class ProductWindow:
    """One product's sliding window on event time, with O(1) amortised updates.

    The window ends at the watermark (the latest event time seen). A trade older than the
    watermark but still inside the window joins it (the average is re-evaluated at the
    watermark); a trade older than the window start is too late and is not added.
    """

    window_us: int
    trades: deque[tuple[int, int]] = field(default_factory=deque)  # (time_us, price_units)
    sum_units: int = 0
    watermark_us: int | None = None

    @property
    def count(self) -> int:
        return len(self.trades)

    @property
    def start_us(self) -> int | None:
        return None if self.watermark_us is None else self.watermark_us - self.window_us

    def add(self, time_us: int, price_units: int) -> bool:
        """Add a trade; False (and nothing changes) when it is too late for the window."""
        trades = self.trades
        if self.watermark_us is None or time_us >= self.watermark_us:
            self.watermark_us = time_us
            trades.append((time_us, price_units))
            self.sum_units += price_units
            start = time_us - self.window_us
            while trades[0][0] < start:  # the new trade itself is always inside
                self.sum_units -= trades.popleft()[1]
            return True
        if time_us < self.watermark_us - self.window_us:
            return False
        # Late but inside: keep the deque sorted by time (late trades land near the end).
        index = len(trades)
        while index > 0 and trades[index - 1][0] > time_us:
            index -= 1
        trades.insert(index, (time_us, price_units))
        self.sum_units += price_units
        return True

    def average_units(self) -> int | None:
        return window_average_units(self.sum_units, len(self.trades))

    def reached_units(self) -> int | None:
        return reached_units(self.sum_units, len(self.trades))


class AlertBook:
    """Live alerts per product, sorted by threshold: finding the due ones is O(log n)."""

    def __init__(self) -> None:
        self.alerts: dict[str, AlertRow] = {}
        self._sorted: dict[str, tuple[list[int], list[str]]] = {}
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self.alerts)

    def __contains__(self, alert_id: str) -> bool:
        return alert_id in self.alerts

    def upsert(self, alert: AlertRow) -> None:
        old = self.alerts.get(alert.alert_id)
        if old is not None:
            self._dirty.add(old.product_id)
        self.alerts[alert.alert_id] = alert
        self._dirty.add(alert.product_id)

    def remove(self, alert_id: str) -> AlertRow | None:
        old = self.alerts.pop(alert_id, None)
        if old is not None:
            self._dirty.add(old.product_id)
        return old

    def clear(self) -> None:
        self.alerts.clear()
        self._sorted.clear()
        self._dirty.clear()

    def _index(self, product_id: str) -> tuple[list[int], list[str]]:
        if product_id in self._dirty or product_id not in self._sorted:
            self._dirty.discard(product_id)
            pairs = sorted(
                (a.threshold_units, a.alert_id)
                for a in self.alerts.values()
                if a.product_id == product_id
            )
            self._sorted[product_id] = ([t for t, _ in pairs], [i for _, i in pairs])
        return self._sorted[product_id]

    def due(self, product_id: str, reached: int | None) -> list[AlertRow]:
        """The alerts of `product_id` with threshold <= `reached` (`reached_units`: exact)."""
        if reached is None:
            return []
        thresholds, ids = self._index(product_id)
        if not thresholds or thresholds[0] > reached:
            return []  # the common case: O(1)
        upto = bisect.bisect_right(thresholds, reached)
        return [self.alerts[alert_id] for alert_id in ids[:upto]]


class Evaluation(NamedTuple):
    """What one trade did to its product's window."""

    product_id: str
    accepted: bool
    window_end_us: int | None
    count: int
    average_units: int | None
    fired: list[AlertRow]


class PriceState:
    """The worker's in-memory state: windows per product and the live alerts."""

    def __init__(self, window_minutes: int) -> None:
        self.window_us = window_minutes * 60_000_000
        self.windows: dict[str, ProductWindow] = {}
        self.alerts = AlertBook()

    def window(self, product_id: str) -> ProductWindow:
        window = self.windows.get(product_id)
        if window is None:
            window = self.windows[product_id] = ProductWindow(self.window_us)
        return window

    def replay(self, trade: TradeRow) -> None:
        """Rebuild: add a trade without evaluating alerts."""
        self.window(trade.product_id).add(trade.time_us, trade.price_units)

    def on_trade(self, trade: TradeRow) -> Evaluation:
        """Add a trade and fire every due alert (removed from the book at once)."""
        window = self.window(trade.product_id)
        if not window.add(trade.time_us, trade.price_units):
            return Evaluation(trade.product_id, False, window.watermark_us, window.count, None, [])
        average = window.average_units()
        fired = self.alerts.due(trade.product_id, window.reached_units())
        for alert in fired:
            self.alerts.remove(alert.alert_id)
        return Evaluation(trade.product_id, True, window.watermark_us, window.count, average, fired)
