"""The DuckDB side of the rule against the stream side, digit for digit (real DuckDB file)."""

import random
from datetime import UTC, datetime

import polars as pl

from flows.price_averages import alerts_to_fire, ensure_tables, window_average, window_figures
from tasks.prices import (
    PriceState,
    TradeRow,
    decimal_units,
    format_units,
    reached_units,
    to_us,
)
from tasks.warehouse import connect, run_sql

T0 = to_us(datetime(2024, 5, 1, tzinfo=UTC))
MIN = 60_000_000


def _insert_trades(con, trades: list[TradeRow]) -> None:
    frame = pl.DataFrame(
        {
            "topic": ["trades"] * len(trades),
            "partition": [0] * len(trades),
            "offset": list(range(len(trades))),
            "trade_id": [t.trade_id for t in trades],
            "product_id": [t.product_id for t in trades],
            "price": [format_units(t.price_units) for t in trades],
            "size": ["1"] * len(trades),
            "side": ["buy"] * len(trades),
            "time_us": [t.time_us for t in trades],
        },
        schema_overrides={"partition": pl.Int32},
    ).with_columns(
        time=pl.from_epoch(pl.col("time_us"), time_unit="us").dt.replace_time_zone("UTC")
    )
    con.register("batch", frame)
    run_sql(con, "prices/insert_trades")
    con.unregister("batch")


def test_sql_average_equals_the_stream_state_at_every_trade(tmp_path):
    rng = random.Random(21)
    trades = []
    clock = T0
    for i in range(2500):
        # Ties in time, trades exactly ten minutes apart, prices with 0..8 places and halves.
        clock += rng.choice([0, 1, 10 * MIN, rng.randint(1, 30_000_000)])
        scale = rng.choice([0, 2, 8])
        price = rng.randint(1, 10**10 - 1) if scale == 8 else rng.randint(1, 10**7)
        units = price * 10 ** (8 - scale)
        trades.append(TradeRow(i, rng.choice(["BTC-USD", "ETH-USD"]), units, 1, "buy", clock))
    con = connect(path=tmp_path / "w.duckdb")
    ensure_tables(con)
    _insert_trades(con, trades)

    state = PriceState(10)
    last_eval: dict[tuple[str, int], tuple[int, int]] = {}
    for trade in trades:
        evaluation = state.on_trade(trade)
        # With ties in time, the stream's last evaluation at T has every trade of T.
        last_eval[(trade.product_id, evaluation.window_end_us)] = (
            evaluation.count,
            evaluation.average_units,
        )
    assert len(last_eval) > 1500
    for (product, end), (count, average) in rng.sample(sorted(last_eval.items()), 600):
        sql_count, sql_average = window_average(con, product, end - 10 * MIN, end)
        assert (sql_count, sql_average) == (count, average), (product, end)
        price = run_sql(con, "prices/window_average",
                        {"product_id": product, "start_us": end - 10 * MIN, "end_us": end}).fetchone()[3]  # fmt: skip
        assert format(price, "f") == format_units(average)
    assert window_average(con, "BTC-USD", 0, 1) == (0, None)
    con.close()


def test_sql_does_not_fire_on_an_average_that_only_rounds_up_to_the_threshold(tmp_path):
    # 1, 1, 0.99999999: exact average 0.99999999666..., rounded half-even to 1.00000000.
    con = connect(path=tmp_path / "w.duckdb")
    ensure_tables(con)
    prices = ["1.00000000", "1.00000000", "0.99999999"]
    units = [decimal_units(p, "price") for p in prices]
    _insert_trades(con, [TradeRow(i, "BTC-USD", u, 1, "buy", T0) for i, u in enumerate(units)])
    _insert_alerts(con, [(0, "one", False, "1"), (1, "below", False, "0.99999999")])
    count, average, reached = window_figures(con, "BTC-USD", T0 - 10 * MIN, T0)
    assert (count, format_units(average)) == (3, "1.00000000")
    assert reached == reached_units(sum(units), len(units))
    assert [a.alert_id for a in alerts_to_fire(con, "BTC-USD", reached)] == ["below"]
    con.close()


def _insert_alerts(con, rows: list[tuple[int, str, bool, str | None]]) -> None:
    frame = pl.DataFrame(
        {
            "topic": ["a"] * len(rows),
            "partition": [0] * len(rows),
            "offset": [r[0] for r in rows],
            "alert_id": [r[1] for r in rows],
            "deleted": [r[2] for r in rows],
            "user_id": ["u"] * len(rows),
            "product_id": ["BTC-USD"] * len(rows),
            "threshold_units": [decimal_units(r[3], "t") if r[3] else None for r in rows],
            "threshold_text": [r[3] for r in rows],
            "created_at": [""] * len(rows),
        },
        schema_overrides={"partition": pl.Int32},
    )
    con.register("batch", frame)
    run_sql(con, "prices/insert_alert_events")
    con.unregister("batch")


def test_alerts_to_fire_skips_fired_deleted_and_higher_alerts(tmp_path):
    con = connect(path=tmp_path / "w.duckdb")
    ensure_tables(con)
    rows = [
        # (offset, alert_id, deleted, threshold)
        (0, "low", False, "100.00"),
        (1, "equal", False, "150.00"),
        (2, "high", False, "150.00000001"),
        (3, "deleted", False, "1"),
        (4, "deleted", True, None),
        (5, "notified", False, "2"),
        (6, "changed", False, "1"),
        (7, "changed", False, "9999"),
    ]
    _insert_alerts(con, rows)
    con.execute(
        'INSERT INTO price_notifications (topic, partition, "offset", alert_id) '
        "VALUES ('n', 0, 0, 'notified')"
    )
    due = alerts_to_fire(con, "BTC-USD", 150 * 10**8)
    assert [a.alert_id for a in due] == ["low", "equal"]
    assert due[1].threshold == "150.00"
    assert alerts_to_fire(con, "ETH-USD", 10**17) == []
    con.close()
