"""Benchmark of price alerts (`.venv/bin/python bench/prices.py [--help]`).

Against the real broker, on its own topics and a temporary warehouse:
  1. worker throughput: trades/s through the price-alerts worker (in-process) with 1,000 live
     alerts, against a bare kafka-python consumer reading the same topic (the baseline);
  2. trade-to-notification latency at a steady 2,000 trades/s, worker as a subprocess:
     p50 / p99 of (notification visible read_committed) - (probe trade sent);
  3. the flow's exact window average (sql/prices/window_average.sql) over --rows trades in
     DuckDB, against the same AVG in SQLite (what the original Celery job used), same rows.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _settings(tag: str, tmp: Path):
    os.environ.update(
        TRADES_TOPIC=f"bench-trades-{tag}",
        PRICE_ALERTS_TOPIC=f"bench-price-alerts-{tag}",
        NOTIFICATIONS_TOPIC=f"bench-notifications-{tag}",
        WAREHOUSE_PATH=str(tmp / f"bench-{tag}.duckdb"),
    )
    from tasks.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def _trade(i: int, product: str, price: str, at: datetime) -> dict:
    return {"trade_id": i, "product_id": product, "price": price, "size": "0.01",
            "side": "buy", "time": at.isoformat()}  # fmt: skip


def throughput(trades: int, alerts: int, tmp: Path) -> None:
    from kafka import TopicPartition

    from sources.price_alerts import create_alert
    from stream_workers.price_alerts import PriceAlertsWorker
    from tasks.kafka import StopSignal, make_consumer, make_producer

    s = _settings(f"tp-{uuid.uuid4().hex[:8]}", tmp)
    products = ["BTC-USD", "ETH-USD", "SOL-USD"]
    worker = PriceAlertsWorker(s, group_id=f"bench-{uuid.uuid4().hex[:8]}")
    worker.ensure_topics()
    producer = make_producer(s)
    for i in range(alerts):  # live all along: thresholds the prices never reach
        create_alert(f"user-{i}", products[i % 3], str(100_000 + i), producer=producer,
                     settings=s)  # fmt: skip
    start = datetime.now(UTC) - timedelta(minutes=30)
    for i in range(trades):
        at = start + timedelta(microseconds=i * 10_000)
        producer.send(s.trades_topic, key=products[i % 3],
                      value=_trade(i, products[i % 3], f"{6500 + i % 97}.{i % 100:02d}", at),
                      timestamp_ms=int(at.timestamp() * 1000))  # fmt: skip
    producer.flush()
    producer.close()

    # Baseline: a bare consumer reading the same topic, decoding nothing.
    bare = make_consumer(settings=s, group_id=None, max_poll_records=s.price_alerts_batch_size)
    tps = [
        TopicPartition(s.trades_topic, p) for p in sorted(bare.partitions_for_topic(s.trades_topic))
    ]
    bare.assign(tps)
    bare.seek_to_beginning(*tps)
    seen, began = 0, None
    while seen < trades:
        for records in bare.poll(timeout_ms=200).values():
            began = began or time.perf_counter()
            seen += len(records)
    bare_s = time.perf_counter() - began
    bare.close()

    began: list[float] = []

    def done() -> bool:
        if not began and worker.counts["rebuilds"]:
            began.append(time.perf_counter())
        return worker.stats.records >= trades

    with worker:
        worker.run(StopSignal(done))
    worker_s = time.perf_counter() - began[0]
    bare_rate, worker_rate = trades / bare_s, trades / worker_s
    print(f"  bare kafka-python consumer: {bare_rate:,.0f} trades/s (baseline)")
    print(f"  price-alerts worker ({alerts} live alerts, transactions per poll batch): "
          f"{worker_rate:,.0f} trades/s = {worker_rate / bare_rate:.2f} x bare")  # fmt: skip


def latency(rate: int, seconds: float, tmp: Path) -> None:
    from sources.price_alerts import create_alert
    from tasks.kafka import decode_json, make_consumer, make_producer

    s = _settings(f"lat-{uuid.uuid4().hex[:8]}", tmp)
    probes_per_s = 50
    n_probes = int(seconds * probes_per_s)
    producer = make_producer(s)
    from tasks.kafka import ensure_topics, project_topics

    ensure_topics(project_topics(s), s)
    # One alert per probe product; ordinary trades never reach them.
    for i in range(n_probes + 1):
        create_alert("u", f"P{i}-USD", "150", alert_id=f"probe-{i}", producer=producer, settings=s)
    producer.flush()
    log = (tmp / "latency-worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "stream_workers", "price-alerts", "--group", f"lat-{uuid.uuid4().hex[:6]}"],
        env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    fired_at: dict[str, float] = {}  # the worker's wall clock when it decided
    sent_wall: dict[str, float] = {}
    consumer = make_consumer(s.notifications_topic, settings=s, group_id=None,
                             auto_offset_reset="latest", fetch_max_wait_ms=5)  # fmt: skip
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            for records in consumer.poll(timeout_ms=50).values():
                now = time.perf_counter()
                for r in records:
                    note = decode_json(r.value)
                    received.setdefault(note["alert_id"], now)
                    fired_at[note["alert_id"]] = datetime.fromisoformat(
                        note["fired_at"]
                    ).timestamp()

    listener = threading.Thread(target=listen, daemon=True)
    try:
        consumer.poll(timeout_ms=1000)  # join: assignment at the end of the topic
        listener.start()
        # Warm-up probe: the worker is up and has rebuilt once it fires.
        at = datetime.now(UTC)
        producer.send(s.trades_topic, key="P0-USD", value=_trade(0, "P0-USD", "200", at))
        producer.flush()
        deadline = time.monotonic() + 90
        while "probe-0" not in received and time.monotonic() < deadline:
            time.sleep(0.05)
        began = time.perf_counter()
        total = int(rate * seconds)
        every = rate // probes_per_s
        for i in range(total):
            target = began + i / rate
            while time.perf_counter() < target:
                time.sleep(0.0005)
            at = datetime.now(UTC)
            if i % every == every - 1 and (i // every) + 1 <= n_probes:
                k = i // every + 1
                producer.send(
                    s.trades_topic, key=f"P{k}-USD", value=_trade(i, f"P{k}-USD", "200", at)
                )
                sent[f"probe-{k}"] = time.perf_counter()
                sent_wall[f"probe-{k}"] = time.time()
            else:
                producer.send(s.trades_topic, key="BTC-USD", value=_trade(i, "BTC-USD", "100", at))
        producer.flush()
        achieved = total / (time.perf_counter() - began)
        deadline = time.monotonic() + 30
        while not all(k in received for k in sent) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        worker.terminate()
        worker.wait(timeout=30)
        consumer.close()
        producer.close()
    lat = [(received[k] - t) * 1000 for k, t in sent.items() if k in received]
    print(f"  {achieved:,.0f} trades/s sent, {len(lat)}/{len(sent)} probe notifications seen")
    decide = [(fired_at[k] - t) * 1000 for k, t in sent_wall.items() if k in fired_at]
    if decide:
        print(f"  of which trade -> worker decision: p50 {percentile(decide, 50):.1f} ms, "
              f"p99 {percentile(decide, 99):.1f} ms")  # fmt: skip
    if lat:
        print(f"  trade -> notification: p50 {percentile(lat, 50):.1f} ms, p99 "
              f"{percentile(lat, 99):.1f} ms, max {max(lat):.1f} ms")  # fmt: skip


def averages(rows: int, tmp: Path) -> None:
    from flows.price_averages import ensure_tables, window_average
    from tasks.prices import format_units
    from tasks.warehouse import connect

    start_us = 1_700_000_000_000_000
    end_us = start_us + 600_000_000  # every row inside one ten-minute window
    con = connect(path=tmp / "avg.duckdb")
    ensure_tables(con)
    t = time.perf_counter()
    con.execute(
        """
        INSERT INTO price_trades
        SELECT 'bench', 0, i, i, 'BTC-USD',
               CAST(6000 + (hash(i) % 400000) / 100 AS DECIMAL(18, 8)), 1, 'buy',
               $start + i * (600000000 // $rows), make_timestamp($start + i * (600000000 // $rows))
        FROM range($rows) r(i)
        """,
        {"start": start_us, "rows": rows},
    )
    print(f"  {rows:,} rows generated in DuckDB in {time.perf_counter() - t:.1f}s")
    lite = sqlite3.connect(tmp / "avg.sqlite")
    lite.execute("CREATE TABLE trades (product_id TEXT, price REAL, time_us INTEGER)")
    t = time.perf_counter()
    cursor = con.execute("SELECT product_id, CAST(price AS DOUBLE), time_us FROM price_trades")
    while rows_ := cursor.fetchmany(200_000):
        lite.executemany("INSERT INTO trades VALUES (?, ?, ?)", rows_)
    lite.execute("CREATE INDEX trades_product_time ON trades (product_id, time_us)")
    lite.commit()
    print(f"  same rows copied to SQLite (indexed) in {time.perf_counter() - t:.1f}s")

    def best(fn, runs: int = 3):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t0)
        return min(times), value

    duck_s, (count, avg_units) = best(lambda: window_average(con, "BTC-USD", start_us, end_us))
    lite_s, (lite_avg,) = best(lambda: lite.execute(
        "SELECT AVG(price) FROM trades WHERE product_id = ? AND time_us BETWEEN ? AND ?",
        ("BTC-USD", start_us, end_us)).fetchone())  # fmt: skip
    con.close()
    lite.close()
    print(f"  SQLite AVG(price) (float): {lite_s * 1000:,.0f} ms (baseline) -> {lite_avg!r}")
    print(f"  DuckDB exact window average: {duck_s * 1000:,.0f} ms = {lite_s / duck_s:.1f} x "
          f"faster -> {format_units(avg_units)} over {count:,} trades")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=200_000, help="throughput: trades")
    parser.add_argument("--alerts", type=int, default=1000, help="throughput: live alerts")
    parser.add_argument("--rate", type=int, default=2000, help="latency: trades per second")
    parser.add_argument("--seconds", type=float, default=15, help="latency: run length")
    parser.add_argument("--rows", type=int, default=2_000_000, help="averages: rows (try 10000000)")
    parser.add_argument("--only", choices=["throughput", "latency", "averages"], default=None)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "throughput"):
            print("1. worker throughput")
            throughput(args.trades, args.alerts, Path(tmp))
        if args.only in (None, "latency"):
            print(f"2. latency at {args.rate} trades/s")
            latency(args.rate, args.seconds, Path(tmp))
        if args.only in (None, "averages"):
            print("3. the flow's average: DuckDB vs SQLite")
            averages(args.rows, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
