"""`python -m sources trades`: realistic trades on `trades` (key `product_id`).

    python -m sources trades --products BTC-USD,ETH-USD --rate 200 --duration 30 --seed 1
    python -m sources trades --replay trades.csv        # or .parquet; keeps the file's times

The random walk moves each product's price by whole cents (integers: no binary floats),
with sizes and sides drawn from the same seeded generator: the same seed gives the same
trades (and, with --start, the same event times). Each record's Kafka timestamp is the
trade's event time, so the stream worker can seek `trades` by event time on restart.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.progress import Progress

from tasks.commands import HelpFormatter
from tasks.kafka import ensure_topics, make_producer, project_topics
from tasks.prices import Trade, parse_time_us, time_from_us, to_us
from tasks.settings import Settings, get_settings

START_PRICES = {"BTC-USD": Decimal("6500.00"), "ETH-USD": Decimal("300.00")}
DEFAULT_START = Decimal("100.00")


def now() -> datetime:
    return datetime.now(UTC)


def random_walk(
    products: list[str],
    count: int,
    *,
    seed: int,
    rate: float,
    start: datetime,
    first_id: int = 1,
    step_cents: int = 150,
) -> Iterator[Trade]:
    """`count` trades round-robin over `products`, event times `start + i / rate`."""
    rng = random.Random(seed)
    cents = {p: int(START_PRICES.get(p, DEFAULT_START) * 100) for p in products}
    for i in range(count):
        product = products[i % len(products)]
        cents[product] = max(1, cents[product] + rng.randint(-step_cents, step_cents))
        yield Trade(
            trade_id=first_id + i,
            product_id=product,
            price=Decimal(cents[product]).scaleb(-2),
            size=Decimal(rng.randint(1, 200_000)).scaleb(-6),
            side=rng.choice(("buy", "sell")),
            time=start + timedelta(microseconds=round(i * 1_000_000 / rate)),
        )


def read_trades(path: Path) -> Iterator[Trade]:
    """Trades of a CSV or Parquet file (columns as the `trades` contract; trade_id optional)."""
    import polars as pl

    if path.suffix == ".csv":
        frame = pl.read_csv(path, infer_schema=False)  # strings: decimals stay exact
    elif path.suffix == ".parquet":
        frame = pl.read_parquet(path)
    else:
        raise ValueError(f"--replay: {path} is neither .csv nor .parquet")
    for name in ("price", "size"):
        if name in frame.columns and frame[name].dtype in (pl.Float32, pl.Float64):
            raise ValueError(
                f"--replay: column {name!r} of {path} holds binary floats; store prices as "
                "decimal or text so they stay exact"
            )
    for i, row in enumerate(frame.iter_rows(named=True)):
        yield Trade(
            trade_id=int(row.get("trade_id") or i + 1),
            product_id=row["product_id"],
            price=_text(row["price"]),
            size=_text(row["size"]),
            side=row["side"],
            time=row["time"],
        )


def _text(value: Any) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def produce(
    trades: Iterator[Trade],
    total: int | None,
    *,
    rate: float | None,
    settings: Settings | None = None,
    progress: bool = True,
) -> int:
    """Send `trades` (paced at `rate` per second if given); returns how many were sent."""
    s = settings or get_settings()
    ensure_topics([t for t in project_topics(s) if t.name == s.trades_topic], s)
    producer = make_producer(s)
    sent = 0
    began = time.monotonic()
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(f"trades -> {s.trades_topic}", total=total)
        for trade in trades:
            if rate:
                ahead = began + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(
                s.trades_topic,
                key=trade.product_id,
                value=trade.message(),
                timestamp_ms=to_us(trade.time) // 1000,
            )
            sent += 1
            if sent % 100 == 0:
                bar.update(job, completed=sent)
        bar.update(job, completed=sent)
    producer.flush()
    producer.close()
    return sent


def epilog(settings: Settings) -> str:
    """What the command writes and the settings that change it, with their current values."""
    return f"""\
writes:
  {settings.trades_topic} (TRADES_TOPIC), key product_id; created if missing, with
  KAFKA_DEFAULT_PARTITIONS partitions. Each record's Kafka timestamp is the trade's event time.
  value: {{"trade_id": int, "product_id": "BTC-USD", "price": "6500.00" (decimal string),
          "size": "0.012345" (decimal string), "side": "buy" | "sell", "time": ISO-8601}}
  read by: python -m stream_workers price-alerts; the price-averages deployment

settings (environment variables or .env; now):
  TRADES_TOPIC={settings.trades_topic}  KAFKA_DEFAULT_PARTITIONS={settings.kafka_default_partitions}  \
KAFKA_REPLICATION_FACTOR={settings.kafka_replication_factor}
  KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} and the other KAFKA_* connection settings

every setting: docs/settings.md; the trades contract: docs/contracts.md"""


def main(argv: list[str]) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m sources trades", description=__doc__,
                                     epilog=epilog(settings), formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--products", default="BTC-USD", help="comma-separated product ids")
    parser.add_argument("--rate", type=float, default=200,
                        help="trades per second, all products together; also the pace of "
                        "--replay unless --fast")  # fmt: skip
    parser.add_argument("--duration", type=float, default=30, help="seconds of trades")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the random walk: the same seed, the same trades")  # fmt: skip
    parser.add_argument("--start", default=None,
                        help="event time of the first trade (ISO-8601 with a zone); default: now")  # fmt: skip
    parser.add_argument("--first-id", type=int, default=1, help="trade_id of the first trade")
    parser.add_argument("--fast", action="store_true",
                        help="send as fast as possible (event times still follow --rate)")  # fmt: skip
    parser.add_argument("--replay", type=Path, default=None,
                        help="send the trades of this .csv or .parquet instead, with their "
                        "own times (columns as the value above; trade_id optional)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.rate <= 0 or args.duration <= 0:
            raise ValueError("--rate and --duration must be positive")
        if args.replay is not None:
            if not args.replay.is_file():
                raise ValueError(f"--replay: no file {args.replay}")
            trades = list(read_trades(args.replay))
            total, rate = len(trades), (None if args.fast else args.rate)
            stream: Iterator[Trade] = iter(trades)
        else:
            products = [p.strip() for p in args.products.split(",") if p.strip()]
            start = time_from_us(parse_time_us(args.start, "--start")) if args.start else now()
            total = max(1, int(args.rate * args.duration))
            stream = random_walk(products, total, seed=args.seed, rate=args.rate, start=start,
                                 first_id=args.first_id)  # fmt: skip
            rate = None if args.fast else args.rate
        sent = produce(stream, total, rate=rate, settings=settings, progress=not args.no_progress)
    except ValueError as error:  # pydantic's ValidationError is one too
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sent {sent} trades to {settings.trades_topic}")
    return 0
