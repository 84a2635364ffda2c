"""Price alerts: the stream worker fires on live trades, the batch flow on its ten minutes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from infra import services
from sources.price_alerts import create_alert
from sources.trades import produce as send_trades
from sources.trades import random_walk
from tasks.kafka import ensure_topics, group_lag, make_producer, project_topics
from tasks.warehouse import connect, run_sql

ORDER = 10
TRADES = 1200  # ten minutes of event time at 2 trades/s, sent as fast as the broker takes


def prepare(ctx) -> None:
    s = ctx.settings
    ensure_topics(project_topics(s), s)
    # Alerts around the random walk's start (6500): low ones fire on the first trades.
    for user, threshold in [("ann", "6400.00"), ("bob", "6500.00"), ("cat", "6600.00"),
                            ("dan", "9999.00")]:  # fmt: skip
        create_alert(user, "BTC-USD", threshold, settings=s)
    ctx.start_worker("price-alerts")


def produce(ctx) -> None:
    s = ctx.settings
    start = datetime.now(UTC) - timedelta(minutes=10)
    trades = random_walk(["BTC-USD", "ETH-USD"], TRADES, seed=1, rate=2, start=start)
    send_trades(trades, TRADES, rate=None, settings=s, progress=False)
    producer = make_producer(s)  # one malformed trade: the worker dead-letters it
    producer.send(s.trades_topic, key="BTC-USD", value={"trade_id": -1, "product_id": "BTC-USD",
                                                      "price": "not-a-price"})  # fmt: skip
    producer.flush()
    producer.close()
    ctx.add("prices", "trades produced", TRADES + 1)
    # Let the worker fire first (the batch run would fire the same alerts otherwise).
    services.wait_for(lambda: group_lag(s.price_alerts_group, [s.trades_topic], s) == 0, 60, 0.2)


def batch(ctx) -> None:
    ctx.run_deployment("ten_minute_average/price-averages", {"product_id": "BTC-USD"})


def summarize(ctx) -> None:
    con = connect(ctx.settings, read_only=True)
    try:
        row = con.execute(
            "SELECT trade_count, CAST(average_price AS VARCHAR) FROM price_average_history "
            "ORDER BY computed_at DESC LIMIT 1"
        ).fetchone()
        if row:
            ctx.add("prices", "BTC-USD trades in last window (batch)", row[0])
            ctx.add("prices", "BTC-USD ten-minute average (batch)", row[1])
        for source, count in run_sql(con, "prices/fired_by_source").fetchall():
            ctx.add("prices", f"notifications ({source})", count)
    finally:
        con.close()
