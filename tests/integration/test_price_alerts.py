"""The price-alerts stream worker through the real broker: firing, DLQ, lateness, SIGKILL."""

import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from sources.price_alerts import create_alert, delete_alert
from tasks.kafka import (
    ensure_topics,
    make_consumer,
    make_producer,
    project_topics,
)
from tasks.prices import fire_transactional_id, to_us
from tests.conftest import subprocess_env
from tests.helpers import eventually, group_report, settled
from tests.integration.prices_support import (
    WorkerThread,
    committed_total,
    expected_firings,
    notifications,
    produce,
    produce_raw,
    read_all,
    trade,
)

pytestmark = pytest.mark.integration

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def test_worker_fires_once_tombstones_and_dead_letters(settings, unique):
    group = f"pa-{unique}"
    create_alert("ann", "BTC-USD", "105.00", alert_id="reach")
    create_alert("bob", "BTC-USD", "105.00000001", alert_id="just-above")
    create_alert("cat", "BTC-USD", "1", alert_id="deleted")
    delete_alert("deleted")
    create_alert("dan", "ETH-USD", "1", alert_id="other-product")
    with WorkerThread(settings, group) as worker:
        # An alert added while the worker runs is picked up.
        create_alert("eve", "BTC-USD", "102.5", alert_id="added-live")
        eventually(lambda: "added-live" in worker.state.alerts, 30, 0.05)
        produce(settings, settings.trades_topic, [
            ("BTC-USD", trade(1, "BTC-USD", "100", T0)),
            ("BTC-USD", trade(2, "BTC-USD", "not-a-price", T0)),
            ("BTC-USD", trade(3, "BTC-USD", "-1", T0)),
            ("BTC-USD", {"trade_id": 4, "product_id": "BTC-USD", "price": "1"}),
            ("BTC-USD", trade(5, "BTC-USD", "100", T0) | {"time": "noon"}),
            ("BTC-USD", trade(6, "BTC-USD", "110.00", T0 + timedelta(minutes=10))),
            # Too late: older than the window start (T0 + 10min - 10min) of the watermark.
            ("BTC-USD", trade(7, "BTC-USD", "1", T0 - timedelta(microseconds=1))),
            # Late but inside the window: joins it, average re-evaluated at the watermark.
            ("BTC-USD", trade(8, "BTC-USD", "90", T0 + timedelta(minutes=1))),
            ("BTC-USD", trade(9, "BTC-USD", "1000", T0 + timedelta(minutes=10))),
        ])  # fmt: skip
        produce_raw(settings, settings.trades_topic, "BTC-USD", b"\xff not json")
        eventually(lambda: worker.stats.records >= 10, 30, 0.05)
        eventually(lambda: committed_total(settings, group) >= 10, 30)

    fired = {n["alert_id"]: n for n in notifications(settings)}
    assert sorted(fired) == ["added-live", "just-above", "reach"]
    # Both fired on trade 6: [T0, T0+10min] holds 100 and 110 -> 105.
    for alert_id in ("reach", "added-live"):
        assert fired[alert_id]["average_price"] == "105.00000000"
        assert fired[alert_id]["window_end"] == (T0 + timedelta(minutes=10)).isoformat()
        assert fired[alert_id]["source"] == "stream"
    # "just-above" needed more: after 90 joined (100) then 1000 -> (100+110+90+1000)/4 = 325.
    assert fired["just-above"]["average_price"] == "325.00000000"
    assert fired["reach"]["user_id"] == "ann" and fired["reach"]["threshold"] == "105.00"

    tombstoned = {k for k, v in read_all(settings, settings.price_alerts_topic) if v is None}
    assert tombstoned == {"reach", "added-live", "just-above", "deleted"}

    dead = read_all(settings, settings.dlq_topic(settings.trades_topic))
    reasons = [v["reason"] for _k, v in dead]
    assert len(reasons) == 6
    for expected in ("not a decimal", "not positive", "missing field(s): size, side, time",
                     "not an ISO-8601 time", "too late", "not UTF-8 JSON"):  # fmt: skip
        assert any(expected in r for r in reasons), (expected, reasons)
    assert all(v["topic"] == settings.trades_topic for _k, v in dead)


def test_bad_alerts_are_dead_lettered_once_even_across_a_rebuild(settings, unique):
    group = f"pa-bad-{unique}"
    create_alert("ann", "BTC-USD", "1", alert_id="good")
    produce_raw(settings, settings.price_alerts_topic, "bad-before", b"\xff not json")
    with WorkerThread(settings, group) as worker:
        eventually(lambda: worker.counts["bad_alerts"] >= 1 and "good" in worker.state.alerts, 30)
        produce_raw(settings, settings.price_alerts_topic, "bad-live", b'{"alert_id": 1}')
        eventually(lambda: worker.counts["bad_alerts"] >= 2, 30, 0.05)
        # Fence the worker's transactional ids (as a batch firing does): it rebuilds, which
        # re-reads the alert topic from the beginning, bad records included.
        consumer = make_consumer(settings=settings, group_id=None)
        partitions = consumer.partitions_for_topic(settings.trades_topic)
        consumer.close()
        for partition in partitions:
            fencer = make_producer(settings, transactional_id=fire_transactional_id(
                settings.price_fire_transactional_prefix, settings.trades_topic, partition))  # fmt: skip
            fencer.init_transactions()
            fencer.close()
        produce(settings, settings.trades_topic, [("BTC-USD", trade(1, "BTC-USD", "2", T0))])
        eventually(lambda: worker.counts["rebuilds"] >= 2 and worker.counts["fired"] >= 1, 60)
        assert worker.counts["bad_alerts"] >= 4  # both read again by the rebuild
    dead = read_all(settings, settings.dlq_topic(settings.price_alerts_topic))
    assert sorted(k for k, _v in dead) == ["bad-before", "bad-live"]
    reasons = {k: v["reason"] for k, v in dead}
    assert "not UTF-8 JSON" in reasons["bad-before"]
    assert "missing field(s)" in reasons["bad-live"]
    assert all(v["topic"] == settings.price_alerts_topic for _k, v in dead)


def drifting_trades_and_alerts(rng: random.Random, n_trades: int, top_cents: int):
    """Trades of three products, 0.9 s apart (the window slides), whose prices drift up so
    thresholds get crossed over time; 90 alerts up to `top_cents` (created); returns the
    trades and the firings the reference expects (some alerts fire, some never do)."""
    products = ["BTC-USD", "ETH-USD", "SOL-USD"]
    trades = []
    cents = dict.fromkeys(products, 10_000)
    for i in range(n_trades):
        product = products[i % 3]
        cents[product] += rng.randint(-40, 60)
        at = T0 + timedelta(milliseconds=900 * i)
        trades.append(trade(i, product, str(Decimal(cents[product]).scaleb(-2)), at))
    alerts = {}
    for i in range(90):
        product = products[i % 3]
        threshold = Decimal(rng.randint(9_900, top_cents)).scaleb(-2)
        alerts[f"alert-{i}"] = (product, threshold)
        create_alert(f"user-{i % 7}", product, str(threshold), alert_id=f"alert-{i}")
    expected = expected_firings(trades, alerts)
    assert 20 < len(expected) < len(alerts), "the data must both fire and not fire alerts"
    return trades, expected


def _start_worker(group: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_workers", "price-alerts", "--group", group,
             "--batch-size", "50", "--instance", "a"],
            env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_sigkill_and_restart_neither_lose_nor_repeat_notifications(
    settings, unique, seed, tmp_path
):
    """Kill the worker at random moments while trades flow; restart; every alert fires exactly
    once, with the average a brute-force reference gives at its first crossing."""
    group = f"pa-kill-{unique}"
    rng = random.Random(seed)
    trades, expected = drifting_trades_and_alerts(rng, 1800, 20_000)

    # Trades arrive over time (paced, not waiting for anything), so kills land mid-stream.
    feeder = threading.Thread(
        target=lambda: [
            (produce(settings, settings.trades_topic,
                     [(t["product_id"], t) for t in trades[k:k + 100]]), time.sleep(0.4))
            for k in range(0, len(trades), 100)
        ]
    )  # fmt: skip
    logs = [tmp_path / f"worker-{n}.log" for n in range(4)]
    worker = _start_worker(group, logs[0])
    feeder.start()
    killed_at = []
    try:
        for n in range(1, 4):
            # Kill at a random moment once this worker has committed something new: the
            # kill lands in the middle of its work, not before it started.
            before = committed_total(settings, group)
            eventually(lambda before=before: committed_total(settings, group) > before, 60, 0.02,
                       lambda n=n: logs[n - 1].read_text()[-3000:])  # fmt: skip
            time.sleep(rng.uniform(0, 0.2))  # not a wait for anything: the moment of the kill
            worker.send_signal(signal.SIGKILL)
            assert worker.wait(timeout=30) == -signal.SIGKILL
            killed_at.append(committed_total(settings, group))
            worker = _start_worker(group, logs[n])
        feeder.join(timeout=120)
        eventually(
            lambda: committed_total(settings, group) >= len(trades), 90, 0.25,
            lambda: group_report(settings, group, [settings.trades_topic])
            + "\n" + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}"
                                for log in logs if log.exists()),
        )  # fmt: skip
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, logs[-1].read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    # The kills hit a worker in the middle of the stream, and restarts rebuilt windows.
    assert any(0 < c < len(trades) for c in killed_at), killed_at
    replayed = [
        int(m) for log in logs for m in re.findall(r"(\d+) trades replayed", log.read_text())
    ]
    assert max(replayed) > 0, replayed

    got = notifications(settings)
    ids = [n["alert_id"] for n in got]
    assert len(ids) == len(set(ids)), "a notification was repeated"
    assert {n["alert_id"]: (n["average_price"], n["window_end"]) for n in got} == expected


def test_sigterm_mid_stream_commits_what_it_fired_and_a_restart_repeats_nothing(
    settings, unique, tmp_path, seed
):
    """SIGTERM twice while trades that fire alerts flow: each time the worker finishes its
    batch, commits and exits 0; restarted, every alert is notified exactly once, with the
    average a brute-force reference gives at its first crossing."""
    group = f"pa-term-{unique}"
    rng = random.Random(seed)
    trades, expected = drifting_trades_and_alerts(rng, 1500, 18_000)

    # Signals once the worker has committed 100 trades (two batches of every partition) past
    # a random firing trade of the first third of the firings, then of the second third: it
    # has fired before each signal, and fires after.
    index = {t["time"]: i for i, t in enumerate(trades)}
    firing = sorted({index[window_end] for _, window_end in expected.values()})
    third = len(firing) // 3
    points = [rng.choice(firing[:third]) + 100, rng.choice(firing[third : 2 * third]) + 100]
    print(f"SIGTERM after {points} of {len(trades)} trades committed")
    # The stream runs at most 300 trades past a point before that point's signal has gone
    # out: trades keep coming after each signal, however fast or slow the worker is.
    gates = [min(point + 300, len(trades) - 50) for point in points]
    signalled = [threading.Event() for _ in points]
    done = threading.Event()

    def feed() -> None:  # chunks of trades at a steady pace, each stamped with its event time
        producer = make_producer(settings)
        try:
            for k in range(0, len(trades), 50):
                for gate, sent in zip(gates, signalled, strict=True):
                    if k >= gate:
                        sent.wait()
                if done.is_set():
                    return
                for t in trades[k : k + 50]:
                    stamp = to_us(datetime.fromisoformat(t["time"])) // 1000
                    producer.send(settings.trades_topic, key=t["product_id"], value=t,
                                  timestamp_ms=stamp)  # fmt: skip
                producer.flush()
                if done.wait(0.1):
                    return
        finally:
            producer.close()

    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    outputs = [settings.notifications_topic, settings.price_alerts_topic]

    def diagnose() -> str:
        return (group_report(settings, group, [settings.trades_topic]) + "\n"
                + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}"
                            for log in logs if log.exists()))  # fmt: skip

    feeder = threading.Thread(target=feed)
    worker = _start_worker(group, logs[0])
    trades_topic = [t for t in project_topics(settings) if t.name == settings.trades_topic]
    ensure_topics(trades_topic, settings)  # before the feeder's first send
    feeder.start()
    stops: list[tuple[int, int]] = []  # (trades committed, notifications) at each stop
    try:
        for n, point in enumerate(points, start=1):
            # Past the point, and past what the previous worker committed: this worker has
            # committed work of its own (so it is running, its signal handler installed).
            floor = max(point, stops[-1][0] + 1 if stops else 0)
            eventually(lambda f=floor: committed_total(settings, group) >= f, 90, 0.02, diagnose)
            worker.send_signal(signal.SIGTERM)
            signalled[n - 1].set()
            assert worker.wait(timeout=60) == 0, diagnose()
            assert "price-alerts stopped:" in logs[n - 1].read_text(), diagnose()
            eventually(lambda: settled(settings, outputs), 60, 0.1, diagnose)
            stops.append((committed_total(settings, group), len(notifications(settings))))
            assert stops[-1][0] < len(trades), ("the signal came mid-stream", stops)
            worker = _start_worker(group, logs[n])
        feeder.join(timeout=120)
        eventually(lambda: committed_total(settings, group) >= len(trades), 90, 0.25, diagnose)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, diagnose()
        assert "price-alerts stopped:" in logs[-1].read_text(), diagnose()
    finally:
        done.set()
        for sent in signalled:  # a failed wait must not leave the feeder blocked
            sent.set()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    print(f"stopped at (trades committed, notifications): {stops}")
    assert 0 < stops[0][1] < len(expected), ("stopped amid firings", stops)

    got = notifications(settings)
    ids = [n["alert_id"] for n in got]
    assert len(ids) == len(set(ids)), "a notification was repeated"
    assert {n["alert_id"]: (n["average_price"], n["window_end"]) for n in got} == expected
