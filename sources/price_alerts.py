"""`python -m sources price-alerts`: create and delete alerts on the compacted `price-alerts`.

    python -m sources price-alerts create --user U --product BTC-USD --threshold 6500.00
    python -m sources price-alerts delete --alert-id ID

Importable: `create_alert(...)` / `delete_alert(...)`. An alert fires once, when the
ten-minute average of its product reaches the threshold, then is tombstoned.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaProducer

from tasks.commands import HelpFormatter
from tasks.kafka import ensure_topics, make_producer, project_topics
from tasks.prices import PriceAlert, check_product_id, decimal_units
from tasks.settings import Settings, get_settings
from tasks.wire import InvalidRecord


def _ensure(settings: Settings) -> None:
    # The alert topic must exist compacted before the first write (auto-creation would not be).
    wanted = {settings.price_alerts_topic}
    ensure_topics([t for t in project_topics(settings) if t.name in wanted], settings)


def validate_alert(user_id: Any, product_id: Any, threshold: Any) -> None:
    """Raise ValueError with a clear message for a bad user, product or threshold."""
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError(f"user: {user_id!r} must be a non-empty string")
    try:
        user_id.encode()  # the notification key
    except UnicodeEncodeError:
        raise ValueError(f"user: {user_id!r} is not valid Unicode text") from None
    try:
        check_product_id(product_id, "product")
        if isinstance(threshold, float):
            raise InvalidRecord(
                f"threshold: {threshold!r} is a binary float; give a decimal string"
            )
        decimal_units(str(threshold) if isinstance(threshold, int) else threshold, "threshold")
    except InvalidRecord as error:
        raise ValueError(f"{error} (the threshold must be a positive decimal)") from None


@contextmanager
def _sending(settings: Settings, producer: KafkaProducer | None) -> Iterator[KafkaProducer]:
    """The caller's producer, or an own one (topic ensured) flushed and closed after use."""
    if producer is not None:
        yield producer
        return
    _ensure(settings)
    own = make_producer(settings)
    try:
        yield own
        own.flush()
    finally:
        own.close()


def create_alert(
    user_id: str,
    product_id: str,
    threshold: str,
    *,
    alert_id: str | None = None,
    created_at: datetime | None = None,
    settings: Settings | None = None,
    producer: KafkaProducer | None = None,
) -> PriceAlert:
    """Write a new alert (key: its id) and wait for the broker's ack; returns the alert."""
    validate_alert(user_id, product_id, threshold)
    alert = PriceAlert(
        alert_id=alert_id or uuid.uuid4().hex,
        user_id=user_id,
        product_id=product_id,
        threshold=threshold,
        created_at=created_at or datetime.now(UTC),
    )
    s = settings or get_settings()
    message = alert.message()
    # The validated value as plain digits (never an exponent form such as "6.5E+3").
    message["threshold"] = format(alert.threshold, "f")
    with _sending(s, producer) as sender:
        sender.send(s.price_alerts_topic, key=alert.alert_id, value=message)
    return alert


def delete_alert(
    alert_id: str, *, settings: Settings | None = None, producer: KafkaProducer | None = None
) -> None:
    """Remove an alert: a tombstone (null value) for its key on the compacted topic."""
    if not isinstance(alert_id, str) or not alert_id.strip():
        raise ValueError(f"alert id: {alert_id!r} must be a non-empty string")
    s = settings or get_settings()
    with _sending(s, producer) as sender:
        sender.send(s.price_alerts_topic, key=alert_id, value=None)


def epilog(settings: Settings) -> str:
    """What the command writes and the settings that change it, with their current values."""
    return f"""\
writes:
  {settings.price_alerts_topic} (PRICE_ALERTS_TOPIC), compacted, key alert_id; created if missing,
  with KAFKA_DEFAULT_PARTITIONS partitions.
  create: {{"alert_id": str, "user_id": str, "product_id": "BTC-USD",
           "threshold": "6500.00" (decimal string), "created_at": ISO-8601}}
  delete: a tombstone (null value) for the alert's key
  read by: python -m stream_workers price-alerts; the price-averages deployment. An alert
  fires once, when the ten-minute average of its product reaches the threshold, on
  {settings.notifications_topic} (NOTIFICATIONS_TOPIC); then it is tombstoned.

settings (environment variables or .env; now):
  PRICE_ALERTS_TOPIC={settings.price_alerts_topic}  \
KAFKA_DEFAULT_PARTITIONS={settings.kafka_default_partitions}  \
KAFKA_REPLICATION_FACTOR={settings.kafka_replication_factor}
  KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} and the other KAFKA_* connection settings

every setting: docs/settings.md; the price-alerts contract: docs/contracts.md"""


def main(argv: list[str]) -> int:
    settings = get_settings()
    about = epilog(settings)
    parser = argparse.ArgumentParser(prog="python -m sources price-alerts", description=__doc__,
                                     epilog=about, formatter_class=HelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create an alert (prints its id)",
                                 description="Create an alert; prints its id.", epilog=about,
                                 formatter_class=HelpFormatter)  # fmt: skip
    create.add_argument("--user", required=True, help="the user to notify (the notification key)")
    create.add_argument("--product", required=True, help="a product id, e.g. BTC-USD")
    create.add_argument("--threshold", required=True, help="a positive decimal, e.g. 6500.00")
    create.add_argument("--alert-id", default=None, help="default: a new random id")
    delete = commands.add_parser("delete", help="delete an alert",
                                 description="Delete an alert (a tombstone for its key).",
                                 epilog=about, formatter_class=HelpFormatter)  # fmt: skip
    delete.add_argument("--alert-id", required=True, help="the id `create` printed")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            alert = create_alert(args.user, args.product, args.threshold, alert_id=args.alert_id,
                                 settings=settings)  # fmt: skip
            print(alert.alert_id)
        else:
            delete_alert(args.alert_id, settings=settings)
            print(f"deleted {args.alert_id}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
