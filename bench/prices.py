"""Benchmark of price alerts (`.venv/bin/python bench/prices.py [--help]`).

Against the real broker, on its own topics (deleted afterwards) and a temporary warehouse:
  1. worker throughput: trades/s through the price-alerts worker (in-process, in a thread;
     clock: end of its start-up rebuild -> commit of the batch holding the last timed trade)
     against a bare kafka-python consumer reading the same topic (the baseline; clock: first
     poll, already positioned -> the poll bringing the last record, nothing decoded). The prices
     climb over the first 60% of the run, then hold, so a share of the alerts (--firing-share,
     7% by default) is reached: those fire (notification + tombstone in the partition's
     transaction) and a "user" process re-creates each fired alert at the next level (new id,
     threshold + one step), as a user would, for the worker to read and fire again. The rest
     sit above every price. Once the timed trades are done, a few more trades at the final
     price let re-created alerts that arrived late fire; then every notification on the topic
     (read_committed) is checked against an independent reference computed here (exact
     fractions over the trades sent): the same alert ids, each once, and each notification's
     average equal to that of the window it names. A disagreement exits 1.
  2. trade-to-notification latency at a steady 2,000 trades/s, worker as a subprocess: one
     probe alert per probe product; clock: producer.send() of the probe trade here -> its
     notification polled here (read_committed); percentiles over the probes whose notification
     arrived, the others counted as lost and reported (exit 1 if any is lost or notified twice).
  3. the flow's exact window average (sql/prices/window_average.sql) over --rows trades in
     DuckDB, against a plain float AVG in SQLite (a row store's answer), same rows;
     clock: the query alone, best of 3, rows loaded and indexed. The DuckDB result must equal
     the exact average computed here from the generating formula (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# Throughput prices in cents per product: (start, rise). Each climbs by `rise` over the first
# RAMP of its trades, then holds at start + rise. The run spans SPAN of event time, so the last
# part at the final price is longer than a ten-minute window (the average ends there exactly).
PRODUCTS = {"BTC-USD": (640_000, 20_000), "ETH-USD": (320_000, 10_000), "SOL-USD": (14_000, 1_000)}
RAMP = 0.6
SPAN = timedelta(minutes=40)
LEVELS = 8  # a firing chain's step: 1/LEVELS of its product's rise

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAILED: {message}")


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


def _delete_topics(tag: str) -> None:
    # The broker is shared: leave nothing of this run behind.
    from tasks.kafka import make_admin

    admin = make_admin()
    try:
        admin.delete_topics([t for t in admin.list_topics() if t.startswith("bench-") and tag in t])
    except Exception as error:  # cleanup only
        print(f"  (could not delete the topics of {tag}: {error})")
    finally:
        admin.close()


def _trade(i: int, product: str, price: str, at: datetime) -> dict:
    return {"trade_id": i, "product_id": product, "price": price, "size": "0.01",
            "side": "buy", "time": at.isoformat()}  # fmt: skip


def _cents_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --- the independent reference ------------------------------------------------------------


def reference_max_average(series: list[tuple[int, int]], window_us: int) -> Fraction:
    """The highest exact average of the windows [t - window, t] (both ends inclusive) over a
    product's trades (time in us, price in cents), in plain fractions. The bench relies on it
    never going down (prices only climb), so a re-created alert is reached iff its threshold
    is <= the last average: checked here."""
    left, total, last = 0, 0, None
    for right, (time_us, cents) in enumerate(series):
        if right and time_us < series[right - 1][0]:
            raise RuntimeError("bench bug: trades of a product not in time order")
        total += cents
        while series[left][0] < time_us - window_us:
            total -= series[left][1]
            left += 1
        average = Fraction(total, 100 * (right - left + 1))
        if last is not None and average < last:
            raise RuntimeError("bench bug: the window average went down")
        last = average
    assert last is not None
    return last


def reference_window(
    series: list[tuple[int, int]], end_us: int, window_us: int
) -> tuple[int, int] | None:
    """(sum of cents, count) of a product's trades with end - window <= time <= end, or None
    when no trade of the product has time `end` (a window ends at a trade: the watermark)."""
    times = [t for t, _ in series]
    if end_us not in set(times):
        return None
    left = bisect.bisect_left(times, end_us - window_us)
    right = bisect.bisect_right(times, end_us)
    return sum(cents for _, cents in series[left:right]), right - left


def expected_firings(
    chains: dict[str, tuple[str, Decimal, Decimal]], reached: dict[str, Fraction]
) -> set[str]:
    """Alert ids that must fire: level k of a chain (threshold start + k * step) for every k
    whose threshold the product's average reached."""
    ids = set()
    for chain, (product, start, step) in chains.items():
        level = 0
        while Fraction(start + level * step) <= reached[product]:
            ids.add(f"{chain}-L{level}")
            level += 1
    return ids


# --- 1. throughput ------------------------------------------------------------------------


def user_child(steps_json: str) -> int:
    """The "user" (a subprocess): re-create each fired chain alert at its next level."""
    from kafka import TopicPartition

    from sources.price_alerts import create_alert
    from tasks.kafka import StopSignal, decode_json, make_consumer, make_producer
    from tasks.settings import get_settings

    logging.basicConfig(level=logging.WARNING)
    s = get_settings()
    steps = {product: Decimal(step) for product, step in json.loads(steps_json).items()}
    stop = StopSignal().install()
    consumer = make_consumer(settings=s, group_id=None, fetch_max_wait_ms=10)
    deadline = time.monotonic() + 30
    while not (partitions := consumer.partitions_for_topic(s.notifications_topic)):
        if time.monotonic() > deadline:
            print(f"no partitions for {s.notifications_topic}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    tps = [TopicPartition(s.notifications_topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    producer = make_producer(s, linger_ms=0)
    recreated = 0
    print("ready", flush=True)
    while not stop:
        sent = False
        for records in consumer.poll(timeout_ms=100).values():
            for record in records:
                note = decode_json(record.value)
                chain, _, level = note["alert_id"].rpartition("-L")
                if not chain.startswith("chain"):
                    continue  # not ours to re-create (the parent checks every firing)
                product = note["product_id"]
                threshold = Decimal(note["threshold"]) + steps[product]
                create_alert(note["user_id"], product, format(threshold, "f"),
                             alert_id=f"{chain}-L{int(level) + 1}", producer=producer,
                             settings=s)  # fmt: skip
                recreated += 1
                sent = True
        if sent:
            producer.flush()
    producer.flush()
    producer.close()
    consumer.close()
    print(json.dumps({"recreated": recreated}), flush=True)
    return 0


def throughput(trades: int, alerts: int, share: float, tmp: Path) -> None:
    tag = f"tp-{uuid.uuid4().hex[:8]}"
    s = _settings(tag, tmp)
    try:
        _throughput(s, tag, trades, alerts, share, tmp)
    finally:
        _delete_topics(tag)


def _throughput(s, tag: str, trades: int, alerts: int, share: float, tmp: Path) -> None:
    from kafka import TopicPartition

    from sources.price_alerts import create_alert
    from stream_workers.price_alerts import PriceAlertsWorker
    from tasks.kafka import StopSignal, decode_json, make_consumer, make_producer, read_to_end

    rng = random.Random(5)
    names = list(PRODUCTS)
    steps = {p: Decimal(rise // LEVELS).scaleb(-2) for p, (_, rise) in PRODUCTS.items()}
    worker = PriceAlertsWorker(s, group_id=f"bench-{tag}")
    producer = make_producer(s, linger_ms=20, batch_size=512 * 1024)
    # Alerts: a share on "chains" whose first level sits inside the climb; the rest above
    # every price (live all along, the "nothing due" check).
    firing = round(alerts * share)
    chains: dict[str, tuple[str, Decimal, Decimal]] = {}
    for i in range(alerts):
        product = names[i % len(names)]
        low, rise = PRODUCTS[product]
        if i < firing:
            cents = low + rng.randrange(rise // 20, rise - rise // 20)
            chains[f"chain{i}"] = (product, Decimal(cents).scaleb(-2), steps[product])
            alert_id = f"chain{i}-L0"
        else:
            cents = low + rise + 1 + rng.randrange(2 * rise)
            alert_id = f"idle{i}"
        create_alert(f"user-{i}", product, _cents_text(cents), alert_id=alert_id,
                     producer=producer, settings=s)  # fmt: skip
    # Trades: each product climbs over the first RAMP of its trades, then holds.
    series: dict[str, list[tuple[int, int]]] = {p: [] for p in names}
    per_product = -(-trades // len(names))
    ramp = max(1, int(per_product * RAMP))
    span_us = SPAN // _US
    start_us = (datetime.now(UTC) - SPAN - timedelta(minutes=20) - EPOCH) // _US

    def send_trade(i: int, product: str, cents: int, time_us: int) -> None:
        at = EPOCH + timedelta(microseconds=time_us)
        producer.send(s.trades_topic, key=product,
                      value=_trade(i, product, _cents_text(cents), at),
                      timestamp_ms=time_us // 1000)  # fmt: skip
        series[product].append((time_us, cents))

    for i in range(trades):
        product = names[i % len(names)]
        low, rise = PRODUCTS[product]
        send_trade(i, product, low + rise * min(i // len(names), ramp) // ramp,
                   start_us + i * span_us // trades)  # fmt: skip
    producer.flush()

    # Baseline: a bare consumer reading the same topic, decoding nothing; positioned before
    # the clock starts, so the clock covers every fetch (as the worker's does).
    bare = make_consumer(settings=s, group_id=None, max_poll_records=s.price_alerts_batch_size)
    tps = [
        TopicPartition(s.trades_topic, p) for p in sorted(bare.partitions_for_topic(s.trades_topic))
    ]
    bare.assign(tps)
    bare.seek_to_beginning(*tps)
    for tp in tps:
        bare.position(tp)
    seen, began = 0, time.perf_counter()
    while seen < trades:
        seen += sum(map(len, bare.poll(timeout_ms=200).values()))
    bare_s = time.perf_counter() - began
    bare.close()

    # The user: a separate process, as real users are.
    user_log = (tmp / "user.log").open("w")
    user = subprocess.Popen(
        [sys.executable, __file__, "--user-child", json.dumps({p: str(v) for p, v in steps.items()})],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=user_log, text=True,
    )  # fmt: skip
    assert user.stdout is not None
    if user.stdout.readline().strip() != "ready":
        user.kill()
        raise SystemExit(f"the user process did not start: see {tmp / 'user.log'}")

    marks: dict[str, float] = {}

    def on_batch(_report) -> None:
        if "end" not in marks and worker.stats.records >= trades:
            marks["end"] = time.perf_counter()
            marks["fired"] = worker.counts["fired"]

    def after_rebuild() -> bool:
        if "start" not in marks and worker.counts["rebuilds"]:
            marks["start"] = time.perf_counter()
        return False

    worker.stats.listeners.append(on_batch)
    stop = StopSignal(after_rebuild)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name="price-alerts-worker", daemon=True)
    notes = make_consumer(settings=s, group_id=None)
    try:
        thread.start()
        deadline = time.monotonic() + 600
        while "end" not in marks and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if "end" not in marks:
            raise SystemExit(f"the worker did not process {trades} trades: {errors or 'timeout'}")

        # Settle (not timed): a re-created alert read after the last trade needs one more
        # trade to fire. Trades at the final price (the average stays where it ended) until
        # the expected firings are on the topic, then 2 s more to catch any extra one.
        window_us = s.price_window_minutes * 60_000_000
        reached = {p: reference_max_average(series[p], window_us) for p in names}
        expected = expected_firings(chains, reached)
        notes_tps = [TopicPartition(s.notifications_topic, p)
                     for p in sorted(notes.partitions_for_topic(s.notifications_topic))]  # fmt: skip
        notes.assign(notes_tps)
        notes.seek_to_beginning(*notes_tps)
        fired_ids: set[str] = set()
        last_us = max(series[p][-1][0] for p in names)
        extra, quiet_until, deadline = 0, None, time.monotonic() + 60
        while time.monotonic() < deadline and thread.is_alive():
            for records in notes.poll(timeout_ms=200).values():
                fired_ids.update(decode_json(r.value)["alert_id"] for r in records)
            if len(fired_ids) >= len(expected):
                quiet_until = quiet_until or time.monotonic() + 2
                if time.monotonic() >= quiet_until:
                    break
            extra += 1
            for product in names:
                low, rise = PRODUCTS[product]
                send_trade(trades + extra, product, low + rise, last_us + extra * 10_000)
            producer.flush()
    finally:
        stop.set()
        thread.join(60)
        worker.close()
        notes.close()
        producer.close()
        user.terminate()
        out, _ = user.communicate(timeout=30)
    if errors:
        raise errors[0]
    recreated = json.loads(out.strip().splitlines()[-1])["recreated"] if out.strip() else None

    # The check: every notification on the topic (read_committed) against the reference.
    reader = make_consumer(settings=s, group_id=None)
    try:
        parts = reader.partitions_for_topic(s.notifications_topic)
        messages = [decode_json(r.value) for batch in read_to_end(
            reader, [TopicPartition(s.notifications_topic, p) for p in parts], 60) for r in batch]  # fmt: skip
    finally:
        reader.close()
    reached = {p: reference_max_average(series[p], window_us) for p in names}
    expected = expected_firings(chains, reached)
    counts = Counter(m["alert_id"] for m in messages)
    twice = sorted(a for a, n in counts.items() if n > 1)
    missing, unexpected = sorted(expected - set(counts)), sorted(set(counts) - expected)
    if twice:
        fail(f"throughput: {len(twice)} alerts notified more than once: {twice[:5]}")
    if missing:
        fail(f"throughput: {len(missing)} expected firings missing: {missing[:5]}")
    if unexpected:
        fail(f"throughput: {len(unexpected)} firings the reference does not expect: "
             f"{unexpected[:5]}")  # fmt: skip
    # Each notification: from the stream, its window ends at a trade of its product, its
    # average_price is that window's exact average rounded half to even to 8 places, and that
    # exact average reached the threshold.
    wrong = []
    for m in messages:
        end = datetime.fromisoformat(m["window_end"])
        window = reference_window(series[m["product_id"]], (end - EPOCH) // _US, window_us)
        if window is None:
            wrong.append(f"{m['alert_id']}: no trade at window_end {m['window_end']}")
            continue
        exact = Fraction(window[0] * 10**6, window[1])  # in 10^-8 units
        if (m["source"] != "stream"
                or Decimal(m["average_price"]).scaleb(8) != round(exact)
                or exact < Decimal(m["threshold"]).scaleb(8)):  # fmt: skip
            wrong.append(f"{m['alert_id']}: {m['source']} average {m['average_price']} vs "
                         f"{Decimal(round(exact)).scaleb(-8)}, threshold {m['threshold']}")  # fmt: skip
    if wrong:
        fail(f"throughput: {len(wrong)} notifications disagree with the reference window: "
             f"{wrong[:3]}")  # fmt: skip
    if recreated != len(messages):
        fail(
            f"throughput: the user re-created {recreated} alerts for {len(messages)} notifications"
        )
    if worker.stats.dead_letters or worker.counts["too_late"]:
        fail(f"throughput: {worker.stats.dead_letters} dead letters, "
             f"{worker.counts['too_late']} too late (expected none)")  # fmt: skip

    worker_s = marks["end"] - marks["start"]
    bare_rate, worker_rate = trades / bare_s, trades / worker_s
    print(f"  bare kafka-python consumer, poll only, no decoding (baseline; clock: first poll, "
          f"partitions assigned and positioned -> the poll bringing the {trades:,}th record): "
          f"{bare_rate:,.0f} trades/s")  # fmt: skip
    print(f"  price-alerts worker (clock: end of its start-up rebuild, before its first fetch "
          f"-> commit of the batch holding the {trades:,}th trade; every fetch, parse, window, "
          f"alert check, firing, re-created alerts read between polls, one transaction per "
          f"partition per poll batch): {worker_rate:,.0f} trades/s = "
          f"{worker_rate / bare_rate:.2f} x bare")  # fmt: skip
    timed = marks["fired"]
    agree = not (twice or missing or unexpected or wrong)
    print(f"  alerts: {alerts:,} live at the start, {firing} ({firing / alerts:.0%}) on levels "
          f"the prices reach; {len(messages)} fired ({timed} inside the timed run, "
          f"{len(messages) - timed} on the {extra} settle trade(s) per product), {recreated} "
          f"re-created by the user process; reference: {len(expected)} firings expected, "
          f"each notification's window recomputed -> {'agree' if agree else 'DISAGREE'}")  # fmt: skip
    if worker.stats.aborts:
        print(f"  ({worker.stats.aborts} aborted batch(es) in the worker, read again)")


# --- 2. latency ---------------------------------------------------------------------------


def latency(rate: int, seconds: float, tmp: Path) -> None:
    tag = f"lat-{uuid.uuid4().hex[:8]}"
    s = _settings(tag, tmp)
    try:
        _latency(s, rate, seconds, tmp)
    finally:
        _delete_topics(tag)


def _latency(s, rate: int, seconds: float, tmp: Path) -> None:
    from sources.price_alerts import create_alert
    from tasks.kafka import decode_json, ensure_topics, make_consumer, make_producer, project_topics

    probes_per_s = 50
    n_probes = int(seconds * probes_per_s)
    producer = make_producer(s)
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
    notified: Counter[str] = Counter()
    fired_at: dict[str, float] = {}  # the worker's wall clock when it built the notification
    sent_wall: dict[str, float] = {}
    consumer = make_consumer(s.notifications_topic, settings=s, group_id=None,
                             auto_offset_reset="latest", fetch_max_wait_ms=5)  # fmt: skip
    done = threading.Event()
    wait_s = 30

    def listen() -> None:
        while not done.is_set():
            for records in consumer.poll(timeout_ms=50).values():
                now = time.perf_counter()
                for r in records:
                    note = decode_json(r.value)
                    notified[note["alert_id"]] += 1
                    received.setdefault(note["alert_id"], now)
                    fired_at[note["alert_id"]] = datetime.fromisoformat(
                        note["fired_at"]
                    ).timestamp()

    listener = threading.Thread(target=listen, daemon=True)
    achieved = 0.0
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
        if "probe-0" not in received:
            fail(f"latency: the warm-up probe was never notified within 90 s "
                 f"(worker log {tmp / 'latency-worker.log'})")  # fmt: skip
            return
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
        deadline = time.monotonic() + wait_s
        while not all(k in received for k in sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a duplicate notification would arrive about now
    finally:
        done.set()
        listener.join(5)
        worker.terminate()
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait()
        consumer.close()
        producer.close()
    if code != 0:
        fail(f"latency: the worker exited {code} on SIGTERM (expected 0; log {tmp / 'latency-worker.log'})")  # fmt: skip
    lost = sorted((k for k in sent if k not in received), key=lambda k: int(k.split("-")[1]))
    twice = sorted(k for k, n in notified.items() if n > 1)
    lat = [(received[k] - t) * 1000 for k, t in sent.items() if k in received]
    print(f"  {achieved:,.0f} trades/s sent (target {rate:,}); {len(sent)} probes, "
          f"{len(lat)} notified, {len(lost)} lost (no notification {wait_s} s after the last send)")  # fmt: skip
    if lat:
        print(f"  trade -> notification (clock: here, producer.send() of the probe -> its "
              f"notification polled read_committed): p50 {percentile(lat, 50):.1f} ms, "
              f"p99 {percentile(lat, 99):.1f} ms, max {max(lat):.1f} ms over {len(sent)} "
              f"probes, {len(lost)} lost")  # fmt: skip
    decide = [(fired_at[k] - t) * 1000 for k, t in sent_wall.items() if k in fired_at]
    if decide:
        print(f"  of which trade -> worker decision (wall clocks: send here -> the "
              f"notification's fired_at, set before the commit): p50 "
              f"{percentile(decide, 50):.1f} ms, p99 {percentile(decide, 99):.1f} ms")  # fmt: skip
    if lost:
        fail(f"latency: {len(lost)} of {len(sent)} probes lost (no notification within "
             f"{wait_s} s): {lost[:5]}")  # fmt: skip
    if twice:
        fail(f"latency: {len(twice)} probe alerts notified more than once: {twice[:5]}")


# --- 3. the flow's average ----------------------------------------------------------------


def averages(rows: int, tmp: Path) -> None:
    from flows.price_averages import ensure_tables, window_figures
    from tasks.prices import format_units
    from tasks.warehouse import connect

    start_us = 1_700_000_000_000_000
    end_us = start_us + 600_000_000  # every row inside one ten-minute window
    con = connect(path=tmp / "avg.duckdb")
    ensure_tables(con)
    t = time.perf_counter()
    # Price of row i in cents: 600000 + (i * 7919) % 399989 (6000.00 .. 9999.88), exact.
    con.execute(
        """
        INSERT INTO price_trades
        SELECT 'bench', 0, i, i, 'BTC-USD',
               CAST(CAST(600000 + (i * 7919) % 399989 AS DECIMAL(18, 0)) * 0.01 AS DECIMAL(18, 8)),
               1, 'buy',
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

    duck_s, (count, avg_units, reached) = best(
        lambda: window_figures(con, "BTC-USD", start_us, end_us)
    )
    lite_s, (lite_avg,) = best(lambda: lite.execute(
        "SELECT AVG(price) FROM trades WHERE product_id = ? AND time_us BETWEEN ? AND ?",
        ("BTC-USD", start_us, end_us)).fetchone())  # fmt: skip
    con.close()
    lite.close()
    # The reference, from the formula: 399989 is prime, so every 399989 consecutive
    # rows hold each residue once.
    blocks = rows // 399_989
    sum_cents = 600_000 * rows + blocks * sum(range(399_989))
    sum_cents += sum((i * 7919) % 399_989 for i in range(blocks * 399_989, rows))
    exact = Fraction(sum_cents * 10**6, rows)  # in 10^-8 units
    ref_avg, ref_reached = round(exact), exact.numerator // exact.denominator  # half to even
    print(f"  SQLite AVG(price) (float): {lite_s * 1000:,.0f} ms (baseline; clock: the query "
          f"alone, best of 3, rows loaded and indexed) -> {lite_avg!r}")  # fmt: skip
    print(f"  DuckDB exact window average (sql/prices/window_average.sql; clock: the query "
          f"alone, best of 3): {duck_s * 1000:,.0f} ms = {lite_s / duck_s:.1f} x faster -> "
          f"{format_units(avg_units)} over {count:,} trades")  # fmt: skip
    ok = (count, avg_units, reached) == (rows, ref_avg, ref_reached)
    print(f"  reference from the generating formula: {Decimal(ref_avg).scaleb(-8)} "
          f"(floor {Decimal(ref_reached).scaleb(-8)}) over {rows:,} -> "
          f"{'agree' if ok else 'DISAGREE'}")  # fmt: skip
    if not ok:
        fail(f"averages: DuckDB gave count {count}, average units {avg_units}, reached "
             f"{reached}; the reference {rows}, {ref_avg}, {ref_reached}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=200_000, help="throughput: trades")
    parser.add_argument("--alerts", type=int, default=1000, help="throughput: live alerts")
    parser.add_argument("--firing-share", type=float, default=0.07,
                        help="throughput: share of the alerts the prices reach (0.07)")  # fmt: skip
    parser.add_argument("--rate", type=int, default=2000, help="latency: trades per second")
    parser.add_argument("--seconds", type=float, default=15, help="latency: run length")
    parser.add_argument("--rows", type=int, default=2_000_000, help="averages: rows (try 10000000)")
    parser.add_argument("--only", choices=["throughput", "latency", "averages"], default=None)
    parser.add_argument("--user-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.user_child is not None:
        return user_child(args.user_child)
    if not 0 <= args.firing_share <= 1:
        parser.error(f"--firing-share {args.firing_share} is not between 0 and 1")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "throughput"):
            print("1. worker throughput")
            throughput(args.trades, args.alerts, args.firing_share, Path(tmp))
        if args.only in (None, "latency"):
            print(f"2. latency at {args.rate} trades/s")
            latency(args.rate, args.seconds, Path(tmp))
        if args.only in (None, "averages"):
            print("3. the flow's average: DuckDB vs SQLite")
            averages(args.rows, Path(tmp))
    if failures:
        print(f"\nFAILED ({len(failures)}):", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
