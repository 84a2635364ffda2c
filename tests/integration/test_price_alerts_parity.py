"""Batch and stream agree: same averages digit for digit, same fired alerts, one notification
per alert when both sides run at once."""

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from flows.price_averages import ten_minute_average, window_figures
from sources.price_alerts import create_alert
from tasks.prices import to_us, window_bounds_us
from tasks.settings import get_settings
from tasks.warehouse import connect
from tests.helpers import eventually, group_report
from tests.integration.prices_support import (
    WorkerThread,
    committed_total,
    expected_firings,
    notifications,
    produce,
    reference_average,
    reference_figures,
    trade,
    window_prices,
)

pytestmark = pytest.mark.integration

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
PRODUCTS = ["BTC-USD", "ETH-USD"]
EDGE = "EDGE-USD"


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


# Hand-made EDGE-USD trades and alerts (averages worked out by hand, below) where each alert
# fires at one trade only if the rule is exactly right:
#   t1 1 -> 1;  t2 2 -> 1.5;  t3 2 -> 5/3 = 1.666666666..., reported 1.66666667 (rounded up);
#   t4 295 -> 300/4 = 75;  t5 = t4 + 10 min, 105 -> (295 + 105) / 2 = 200 with t4, exactly ten
#   minutes earlier, inside the window (without it: 105).
EDGE_AT = [T0 + timedelta(minutes=1, seconds=s) for s in (0, 30, 60, 90, 690)]
EDGE_PRICES = ["1", "2", "2", "295", "105"]
EDGE_ALERTS = {
    "e-floor": "1.66666666",  # t3: the exact average 1.666... reaches it
    "e-rounded": "1.66666667",  # not at t3 (only the rounded average reaches it): t4
    "e-tie": "75",  # t4: the average equals the threshold
    "e-edge": "200",  # t5: equal, and only with the trade at the window's start
    "e-above": "200.00000001",  # never
}
EDGE_FIRINGS = {
    "e-floor": ("1.66666667", EDGE_AT[2]),
    "e-rounded": ("75.00000000", EDGE_AT[3]),
    "e-tie": ("75.00000000", EDGE_AT[3]),
    "e-edge": ("200.00000000", EDGE_AT[4]),
}


def _use_topics(monkeypatch, tmp_path, suffix: str):
    base = get_settings()
    monkeypatch.setenv("PRICE_ALERTS_TOPIC", f"{base.price_alerts_topic}-{suffix}")
    monkeypatch.setenv("NOTIFICATIONS_TOPIC", f"{base.notifications_topic}-{suffix}")
    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / f"{suffix}.duckdb"))
    get_settings.cache_clear()
    return get_settings()


def _firings(notes: list[dict]) -> dict[str, tuple[str, str]]:
    return {n["alert_id"]: (n["average_price"], n["window_end"]) for n in notes}


def test_stream_and_batch_agree_on_averages_and_fired_alerts(
    prefect_api, settings, unique, seed, monkeypatch, tmp_path
):
    """Both sides against a brute-force reference of the rule (not against each other): an
    alert either side misses, fires early, late or twice fails, ties and window edges
    included. The batch side's window figures are checked at every trade time."""
    rng = random.Random(seed)
    trades = _random_trades(rng, 240)
    trades += [trade(1000 + i, EDGE, price, at)
               for i, (price, at) in enumerate(zip(EDGE_PRICES, EDGE_AT, strict=True))]  # fmt: skip
    # Thresholds equal to averages the window really takes (ties at the threshold, or just
    # above the exact average where it was rounded up), and some never reached.
    averages = [(t["product_id"], reference_average(window_prices(trades, t["product_id"],
                 datetime.fromisoformat(t["time"])))) for t in trades if t["product_id"] != EDGE]  # fmt: skip
    alerts = {f"a{i}": (p, format(a, "f")) for i, (p, a) in enumerate(rng.sample(averages, 8))}
    alerts |= {f"never-{p}": (p, "20000") for p in PRODUCTS}
    alerts |= {alert_id: (EDGE, threshold) for alert_id, threshold in EDGE_ALERTS.items()}
    for i, (alert_id, (product, threshold)) in enumerate(alerts.items()):
        create_alert(f"u{i}", product, threshold, alert_id=alert_id)
    expected = expected_firings(trades, {a: (p, Decimal(t)) for a, (p, t) in alerts.items()})
    replay = f"seed {seed} (replay: SEED={seed})"
    # The reference agrees with the hand-worked EDGE-USD figures, and the data fires enough.
    assert {a: f for a, f in expected.items() if a.startswith("e-")} == {
        a: (average, at.isoformat()) for a, (average, at) in EDGE_FIRINGS.items()
    }
    assert len(expected) >= 8 and not any(a.startswith("never-") for a in expected), replay

    # The stream side: every alert fires once, at the trade of its first crossing.
    group = f"parity-{unique}"
    with WorkerThread(settings, group):
        produce(settings, settings.trades_topic, [(t["product_id"], t) for t in trades])
        eventually(lambda: committed_total(settings, group) >= len(trades), 60, 0.2,
                   lambda: group_report(settings, group, [settings.trades_topic]))  # fmt: skip
    streamed = notifications(settings)
    assert {n["source"] for n in streamed} <= {"stream"}
    assert len(streamed) == len(_firings(streamed)), f"an alert notified twice; {replay}"
    assert _firings(streamed) == expected, f"stream vs reference; {replay}"

    # The batch side, on the same trades and its own alert and notification topics: the flow
    # run at every time the reference fires something (the EDGE-USD ties included) and at
    # two random trade times; each run fires exactly the alerts the reference fires then
    # (so neither early, at a rounded average, nor late).
    batch = _use_topics(monkeypatch, tmp_path, "batch")
    for i, (alert_id, (product, threshold)) in enumerate(alerts.items()):
        create_alert(f"u{i}", product, threshold, alert_id=alert_id, settings=batch)
    fire_at: dict[tuple[str, str], set[str]] = {}
    for alert_id, (_average, end) in expected.items():
        fire_at.setdefault((alerts[alert_id][0], end), set()).add(alert_id)
    runs = set(fire_at)
    runs |= {(t["product_id"], t["time"]) for t in rng.sample(trades, 2)}
    for product, end in sorted(runs, key=lambda run: (run[1], run[0])):
        at = datetime.fromisoformat(end)
        result = ten_minute_average(as_of=at, product_id=product)
        average = reference_average(window_prices(trades, product, at))
        run = f"run {product} at {end}; {replay}"
        assert result["average_price"] == (None if average is None else format(average, "f")), run
        assert result["trades"] == len(window_prices(trades, product, at)), run
        assert sorted(result["fired"]) == sorted(fire_at.get((product, end), ())), run
    batched = notifications(batch)
    assert {n["source"] for n in batched} == {"batch"}
    assert len(batched) == len(_firings(batched)), f"an alert notified twice; {replay}"
    assert _firings(batched) == expected, f"batch vs reference; {replay}"

    # The batch side's window at every trade time (the SQL over the loaded trades): count,
    # rounded average and floor(sum / count), the figure thresholds are compared with.
    con = connect(batch, read_only=True)
    try:
        for t in trades:
            at = datetime.fromisoformat(t["time"])
            start_us, end_us = window_bounds_us(to_us(at), batch.price_window_minutes)
            got = window_figures(con, t["product_id"], start_us, end_us)
            want = reference_figures(window_prices(trades, t["product_id"], at))
            assert got == want, f"{t['product_id']} at {t['time']}; {replay}"
        history = con.execute("SELECT count(*) FROM price_average_history").fetchone()[0]
    finally:
        con.close()
    assert history == len(runs)


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
