"""Batch and stream agree: same averages digit for digit, same fired alerts, one notification
per alert when both sides run at once."""

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from flows.price_averages import ten_minute_average
from sources.price_alerts import create_alert
from tasks.prices import exact_average
from tasks.settings import get_settings
from tasks.warehouse import connect
from tests.helpers import eventually
from tests.integration.prices_support import (
    WorkerThread,
    committed_total,
    notifications,
    produce,
    trade,
)

pytestmark = pytest.mark.integration

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
PRODUCTS = ["BTC-USD", "ETH-USD"]


def _random_trades(rng: random.Random, n: int) -> list[dict]:
    """Times on a 30 s grid (many trades exactly ten minutes apart), prices with 0-8 places."""
    trades, clock = [], dict.fromkeys(PRODUCTS, T0)
    for i in range(n):
        product = PRODUCTS[i % 2]
        clock[product] += timedelta(seconds=30 * rng.randint(1, 3))
        price = Decimal(rng.randint(9_000, 11_000 * 10**6)).scaleb(-rng.choice([0, 2, 6, 8]))
        price = price if Decimal(90) < price < Decimal(11_000) else Decimal(rng.randint(95, 105))
        trades.append(trade(i, product, format(price, "f"), clock[product]))
    return trades


def _reference(trades: list[dict], product: str, end: datetime) -> Decimal | None:
    return exact_average([
        Decimal(t["price"]) for t in trades if t["product_id"] == product
        and end - timedelta(minutes=10) <= datetime.fromisoformat(t["time"]) <= end
    ])  # fmt: skip


def _use_topics(monkeypatch, tmp_path, suffix: str):
    base = get_settings()
    monkeypatch.setenv("PRICE_ALERTS_TOPIC", f"{base.price_alerts_topic}-{suffix}")
    monkeypatch.setenv("NOTIFICATIONS_TOPIC", f"{base.notifications_topic}-{suffix}")
    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / f"{suffix}.duckdb"))
    get_settings.cache_clear()
    return get_settings()


def test_stream_and_batch_agree_on_averages_and_fired_alerts(
    prefect_api, settings, unique, monkeypatch, tmp_path
):
    rng = random.Random(unique)
    trades = _random_trades(rng, 240)
    # Thresholds equal to averages the window really takes (ties at the threshold), and some
    # the average never reaches.
    averages = [(t["product_id"], _reference(trades, t["product_id"], datetime.fromisoformat(t["time"])))
                for t in trades]  # fmt: skip
    alerts = [(p, format(a, "f")) for p, a in rng.sample(averages, 10)]
    alerts += [(p, "20000") for p in PRODUCTS]
    for i, (product, threshold) in enumerate(alerts):
        create_alert(f"u{i}", product, threshold, alert_id=f"a{i}")

    # The stream side.
    group = f"parity-{unique}"
    with WorkerThread(settings, group):
        produce(settings, settings.trades_topic, [(t["product_id"], t) for t in trades])
        eventually(lambda: committed_total(settings, group) >= len(trades), 60)
    streamed = {n["alert_id"]: n for n in notifications(settings)}
    assert len(streamed) >= 5

    # The batch side: the same trades, the same alerts on their own topics, the flow run at
    # every time the stream fired and at random trade times.
    batch = _use_topics(monkeypatch, tmp_path, "batch")
    for i, (product, threshold) in enumerate(alerts):
        create_alert(f"u{i}", product, threshold, alert_id=f"a{i}", settings=batch)
    times = {(n["product_id"], n["window_end"]) for n in streamed.values()}
    times |= {(t["product_id"], t["time"]) for t in rng.sample(trades, 3)}
    averages_by_run = {}
    for product, end in sorted(times, key=lambda pt: pt[1]):
        result = ten_minute_average(as_of=datetime.fromisoformat(end), product_id=product)
        averages_by_run[(product, end)] = result["average_price"]
        reference = _reference(trades, product, datetime.fromisoformat(end))
        assert result["average_price"] == format(reference, "f")
    batched = {n["alert_id"]: n for n in notifications(batch)}

    assert set(batched) == set(streamed)
    for alert_id, note in streamed.items():
        other = batched[alert_id]
        assert (note["source"], other["source"]) == ("stream", "batch")
        assert other["average_price"] == note["average_price"]  # digit for digit
        assert other["window_end"] == note["window_end"]
        assert averages_by_run[(note["product_id"], note["window_end"])] == note["average_price"]
    con = connect(batch, read_only=True)
    history = con.execute("SELECT count(*) FROM price_average_history").fetchone()[0]
    con.close()
    assert history == len(times)


def _alerts(product: str, alerts: int) -> list[str]:
    ids = [f"{product}-{i}" for i in range(alerts)]
    for alert_id in ids:
        create_alert("u", product, "100", alert_id=alert_id)
    return ids


def test_a_batch_firing_fences_an_open_stream_transaction(prefect_api, settings, unique):
    """The worker has fired in an open transaction; the flow fires the same alert meanwhile:
    the flow's init fences the worker, whose transaction aborts; one notification."""
    at = T0 + timedelta(minutes=30)
    (alert_id,) = _alerts("BTC-USD", 1)
    results = []

    with WorkerThread(settings, f"fence-{unique}") as worker:

        def flow_first():
            if worker.counts["fired"] == 1 and not results:
                results.append(ten_minute_average(as_of=at, product_id="BTC-USD"))

        worker.before_commit = flow_first
        produce(settings, settings.trades_topic, [("BTC-USD", trade(1, "BTC-USD", "150", at))])
        eventually(lambda: results and worker.stats.records >= 1, 60)
        eventually(lambda: committed_total(settings, f"fence-{unique}") >= 1, 60)
        assert worker.stats.aborts >= 1, "the worker's transaction must have been fenced"
    assert results[0]["fired"] == [alert_id]
    fired = notifications(settings)
    assert [(n["alert_id"], n["source"]) for n in fired] == [(alert_id, "batch")]


def test_a_flow_after_the_stream_fired_fires_nothing(prefect_api, settings, unique):
    at = T0 + timedelta(minutes=30)
    (alert_id,) = _alerts("ETH-USD", 1)
    group = f"after-{unique}"
    with WorkerThread(settings, group) as worker:
        produce(settings, settings.trades_topic, [("ETH-USD", trade(1, "ETH-USD", "150", at))])
        eventually(lambda: worker.counts["fired"] == 1, 60)
        # At once: the flow may not even see the committed tombstone yet; its re-check does.
        result = ten_minute_average(as_of=at, product_id="ETH-USD")
    assert result["fired"] == [] and result["average_price"] == "150.00000000"
    assert [(n["alert_id"], n["source"]) for n in notifications(settings)] == [(alert_id, "stream")]


def test_racing_sides_notify_each_alert_exactly_once(prefect_api, settings, unique):
    """Worker and flow see the same crossings at the same moment, round after round."""
    group = f"race-{unique}"
    expected = []
    with WorkerThread(settings, group) as worker:
        for round_ in range(2):
            product = f"R{round_}-USD"
            at = T0 + timedelta(minutes=40 + round_)
            new = _alerts(product, 25)
            expected += new
            eventually(lambda new=new: all(a in worker.state.alerts for a in new), 30, 0.05)
            feeder = threading.Thread(
                target=produce,
                args=(settings, settings.trades_topic, [(product, trade(round_, product, "101", at))]),
            )  # fmt: skip
            feeder.start()
            ten_minute_average(as_of=at, product_id=product)  # may see the trade or not yet
            feeder.join()
            ten_minute_average(as_of=at, product_id=product)
        eventually(lambda: committed_total(settings, group) >= 2, 60)
    fired = [n["alert_id"] for n in notifications(settings)]
    assert sorted(fired) == sorted(expected), "every alert once, none twice"
