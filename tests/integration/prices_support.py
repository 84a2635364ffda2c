"""Helpers shared by the price-alert integration tests (real broker, real worker code)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

from kafka import TopicPartition

from stream_workers.price_alerts import PriceAlertsWorker
from tasks.kafka import (
    StopSignal,
    decode_json,
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
)
from tasks.prices import to_us
from tasks.settings import Settings
from tests.helpers import read_topic


def trade(i: int, product: str, price: str, at: datetime, **extra: Any) -> dict[str, Any]:
    return {"trade_id": i, "product_id": product, "price": price, "size": "0.5",
            "side": "buy" if i % 2 else "sell", "time": at.isoformat()} | extra  # fmt: skip


def produce(settings: Settings, topic: str, messages: list[tuple[str | None, Any]]) -> None:
    """Send (key, value) pairs; trades carry their event time as the Kafka timestamp."""
    _ensure(settings, topic)
    producer = make_producer(settings)
    for key, value in messages:
        timestamp = None
        if isinstance(value, dict) and isinstance(value.get("time"), str):
            try:
                timestamp = to_us(datetime.fromisoformat(value["time"])) // 1000
            except ValueError:
                timestamp = None
        producer.send(topic, key=key, value=value, timestamp_ms=timestamp)
    producer.flush()
    producer.close()


def _ensure(settings: Settings, topic: str) -> None:
    ensure_topics([t for t in project_topics(settings) if t.name == topic], settings)


def produce_raw(settings: Settings, topic: str, key: str, raw: bytes) -> None:
    _ensure(settings, topic)
    producer = make_producer(settings, value_serializer=None)
    producer.send(topic, key=key, value=raw)
    producer.flush()
    producer.close()


def read_all(settings: Settings, topic: str) -> list[tuple[str | None, Any]]:
    """Every committed record of `topic` (read_committed), as (key, decoded value)."""
    return [(r.key.decode() if r.key else None, decode_json(r.value))
            for r in read_topic(settings, topic)]  # fmt: skip


def notifications(settings: Settings) -> list[dict[str, Any]]:
    return [value for _key, value in read_all(settings, settings.notifications_topic)]


def committed_total(settings: Settings, group: str) -> int:
    consumer = make_consumer(settings=settings, group_id=group)
    try:
        partitions = consumer.partitions_for_topic(settings.trades_topic) or set()
        return sum(
            consumer.committed(TopicPartition(settings.trades_topic, p)) or 0 for p in partitions
        )
    finally:
        consumer.close()


class WorkerThread:
    """The real worker loop in a thread of the test process (stopped like SIGTERM would)."""

    def __init__(self, settings: Settings, group: str, **kwargs: Any) -> None:
        self.stop = StopSignal()
        self.worker = PriceAlertsWorker(settings, group_id=group, **kwargs)
        self.result: list[int] = []

        def run() -> None:
            with self.worker:
                self.worker.run(self.stop)
            self.result.append(0)

        self.thread = threading.Thread(target=run)

    def __enter__(self) -> PriceAlertsWorker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.result == [0]


def window_prices(
    trades: list[dict[str, Any]], product: str, end: datetime, minutes: int = 10
) -> list[Decimal]:
    """The prices of `product`'s trades in [end - minutes, end], both ends included."""
    start = end - timedelta(minutes=minutes)
    return [Decimal(t["price"]) for t in trades
            if t["product_id"] == product and start <= datetime.fromisoformat(t["time"]) <= end]  # fmt: skip


def reference_average(prices: list[Decimal]) -> Decimal | None:
    """The reported average, from its definition: sum / count rounded half-to-even to 8
    places (plain Decimal arithmetic, not the code under test)."""
    if not prices:
        return None
    with localcontext() as ctx:
        ctx.prec = 100
        mean = sum(prices, Decimal(0)) / len(prices)
        return mean.quantize(Decimal("0.00000001"), rounding=ROUND_HALF_EVEN)


def reference_figures(prices: list[Decimal]) -> tuple[int, int | None, int | None]:
    """(count, rounded average in 10^-8 units, floor(sum / count) in 10^-8 units)."""
    if not prices:
        return 0, None, None
    sum_units = int(sum(prices, Decimal(0)).scaleb(8))  # exact: prices have <= 8 places
    average = reference_average(prices)
    assert average is not None
    return len(prices), int(average.scaleb(8)), sum_units // len(prices)


def reaches(prices: list[Decimal], threshold: Decimal) -> bool:
    """The firing rule from its definition: the EXACT average sum / count >= threshold
    (never the rounded one)."""
    return bool(prices) and sum(prices, Decimal(0)) >= threshold * len(prices)


def expected_firings(
    trades: list[dict[str, Any]], alerts: dict[str, tuple[str, Decimal]], minutes: int = 10
) -> dict[str, tuple[str, str]]:
    """Brute-force reference: alert_id -> (average, window_end) of its first crossing, trade
    by trade in order (trades in event-time order per product)."""
    seen: dict[str, list[tuple[datetime, Decimal]]] = {}
    fired: dict[str, tuple[str, str]] = {}
    for t in trades:
        at = datetime.fromisoformat(t["time"])
        seen.setdefault(t["product_id"], []).append((at, Decimal(t["price"])))
        inside = [
            p for when, p in seen[t["product_id"]] if at - timedelta(minutes=minutes) <= when <= at
        ]
        for alert_id, (product, threshold) in alerts.items():
            if alert_id not in fired and product == t["product_id"] and reaches(inside, threshold):
                fired[alert_id] = (format(reference_average(inside), "f"), at.isoformat())
    return fired
