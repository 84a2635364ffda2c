"""`python -m sources transactions`: seeded random transactions for N users at a chosen
rate, or a replay of a JSON-lines file, onto the `transactions` topic (key = user).

    python -m sources transactions --users 50 --rate 500 --duration 20 --seed 1
    python -m sources transactions --replay data/transactions.jsonl

A replayed line is sent as it is (so bad input can be replayed too); its key is its
"user" when the line is a JSON object with a string user.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tasks.commands import HelpFormatter
from tasks.kafka import encode_key, ensure_topics, make_producer, project_topics
from tasks.settings import Settings, get_settings
from tasks.transactions import Transaction


def user_names(users: int) -> list[str]:
    """The sample users: "user-000", "user-001", ..."""
    return [f"user-{i:03d}" for i in range(users)]


def generate(
    users: int,
    count: int,
    *,
    seed: int = 1,
    start: datetime | None = None,
    spacing: timedelta = timedelta(milliseconds=2),
    scale: int = 2,
) -> Iterator[Transaction]:
    """Seeded random transactions: each user's balance wanders around zero (mean-reverting)
    widely enough to cross both ±2000 thresholds again and again."""
    rng = random.Random(seed)
    names = user_names(users)
    balances = [0] * users
    at = start or datetime.now(UTC)
    unit = 10**scale
    for i in range(count):
        u = rng.randrange(users)
        minor = rng.randint(-1500 * unit, 1500 * unit) - balances[u] // 4
        if rng.random() < 0.3:
            minor -= minor % unit  # some whole amounts ("-1250"), as people type them
        balances[u] += minor
        amount = Decimal(minor).scaleb(-scale)
        if minor % unit == 0:
            amount = Decimal(minor // unit)
        yield Transaction(names[u], amount, (at + spacing * i).isoformat())


def replay_lines(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, raw value) per non-empty line of a JSON-lines file."""
    with path.open("rb") as lines:
        for line in lines:
            raw = line.strip()
            if not raw:
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            user = data.get("user") if isinstance(data, dict) else None
            yield (encode_key(user) if isinstance(user, str) else None), raw


def generated(args: argparse.Namespace, settings: Settings) -> Iterator[tuple[bytes, bytes]]:
    spacing = timedelta(seconds=1 / args.rate) if args.rate else timedelta(milliseconds=1)
    start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
    for t in generate(args.users, args.count, seed=args.seed, start=start, spacing=spacing,
                      scale=settings.transaction_amount_scale):  # fmt: skip
        yield t.user.encode(), json.dumps(t.as_value(), separators=(",", ":")).encode()


def produce(
    messages: Iterator[tuple[bytes | None, bytes]],
    total: int | None,
    rate: float,
    settings: Settings,
    record: Path | None = None,
) -> int:
    """Send raw (key, value) messages at `rate` per second (0: as fast as possible)."""
    ensure_topics([t for t in project_topics(settings) if t.name == settings.transactions_topic],
                  settings)  # fmt: skip
    # Raw bytes in: replayed lines go out exactly as they are in the file.
    producer = make_producer(settings, key_serializer=None, value_serializer=None)
    out = record.open("wb") if record else None
    sent = 0
    started = time.monotonic()
    columns = (TextColumn("transactions"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    try:
        with Progress(*columns) as progress:
            bar = progress.add_task("send", total=total)
            for key, value in messages:
                producer.send(settings.transactions_topic, key=key, value=value)
                if out:
                    out.write(value + b"\n")
                sent += 1
                if sent % 100 == 0:
                    progress.update(bar, completed=sent)
                    if rate:  # pace to the wall clock, not per message
                        ahead = sent / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
            producer.flush()
            progress.update(bar, completed=sent)
    finally:
        producer.close()
        if out:
            out.close()
    return sent


def epilog(settings: Settings) -> str:
    """What the command writes and the settings that change it, with their current values."""
    return f"""\
writes:
  {settings.transactions_topic} (TRANSACTIONS_TOPIC), key = the user; created if missing, with
  KAFKA_DEFAULT_PARTITIONS partitions.
  value: {{"user": str, "amount": "-1250.50" (decimal string), "time": ISO-8601}}
  read by: python -m stream_workers transaction-alerts; the transaction-totals and
  load-events deployments. Invalid records end in {settings.dlq_topic(settings.transactions_topic)} with the reason.

settings (environment variables or .env; now):
  TRANSACTIONS_TOPIC={settings.transactions_topic}  \
TRANSACTION_AMOUNT_SCALE={settings.transaction_amount_scale} (decimal places of generated amounts)
  KAFKA_DEFAULT_PARTITIONS={settings.kafka_default_partitions}  \
KAFKA_REPLICATION_FACTOR={settings.kafka_replication_factor}
  KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} and the other KAFKA_* connection settings

every setting: docs/settings.md; the transactions contract: docs/contracts.md"""


def main(argv: list[str]) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m sources transactions", description=__doc__,
                                     epilog=epilog(settings), formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--users", type=int, default=50, help="users user-000, user-001, ...")
    parser.add_argument("--rate", type=float, default=500,
                        help="transactions per second; 0 = as fast as possible (needs --count)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=20, help="seconds of traffic")
    parser.add_argument("--count", type=int, help="transactions; default: rate x duration")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the generator: the same seed, the same transactions")  # fmt: skip
    parser.add_argument("--start", help="ISO-8601 time (with a zone) of the first transaction; "
                        "default: now")  # fmt: skip
    parser.add_argument("--replay", type=Path,
                        help="send the lines of this JSON-lines file instead, as they are "
                        "(paced by --rate)")  # fmt: skip
    parser.add_argument("--record", type=Path, help="also write what is sent to this file")
    args = parser.parse_args(argv)
    if args.replay:
        if not args.replay.is_file():
            parser.error(f"--replay: no such file {str(args.replay)!r}")
        sent = produce(replay_lines(args.replay), None, args.rate, settings, args.record)
    else:
        if args.users < 1:
            parser.error(f"--users must be >= 1, got {args.users}")
        if args.rate < 0 or args.duration < 0:
            parser.error(f"--rate and --duration must be >= 0, got {args.rate}, {args.duration}")
        if args.count is None:
            if not args.rate:
                parser.error("--rate 0 (unthrottled) needs --count")
            args.count = int(args.rate * args.duration)
        if args.start:
            try:
                aware = datetime.fromisoformat(args.start).tzinfo is not None
            except ValueError:
                aware = False
            if not aware:
                parser.error(f"--start: {args.start!r} is not an ISO-8601 time with a zone")
        sent = produce(generated(args, settings), args.count, args.rate, settings, args.record)
    print(f"sent {sent} transactions to {settings.transactions_topic}")
    return 0
