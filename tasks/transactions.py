"""Per-user running totals and deposit / withdrawal alerts, shared by the stream worker
(`stream_workers/transaction_alerts.py`) and the batch check (`flows/transaction_totals.py`).

Money is exact: amounts are parsed from decimal strings into integer minor units
(10**-scale, `transaction_amount_scale`) and summed as Int128 in polars; totals go out as
decimal strings with exactly `scale` places. The rule, after each transaction of a user:
total > deposit threshold -> "deposit" alert, total < withdrawal threshold -> "withdrawal"
alert, exactly at a threshold -> nothing; every transaction while beyond alerts again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Any, NamedTuple

import polars as pl

from tasks.kafka import decode_json
from tasks.settings import Settings, get_settings
from tasks.wire import (
    DecimalReasons,
    InvalidRecord,
    Record,
    TimeReasons,
    aware_time,
    key_partition,
    minor_units,
)

MAX_USER_LENGTH = 200  # a user name longer than this is not a name but bad input
AMOUNT_REASONS = DecimalReasons(
    not_decimal="{name} {short!r} is not a decimal number",
    too_precise="{name} {value!r} has more than {scale} decimal places",
)
TIME_REASONS = TimeReasons(
    not_iso="{name} {short!r} is not ISO-8601",
    naive="{name} {value!r} has no time zone (times are UTC)",
)

Rejects = list[tuple[Record, str]]

BATCH_SCHEMA = {
    "partition": pl.Int32,
    "offset": pl.Int64,
    "user": pl.String,
    "amount": pl.Int128,  # minor units
    "time": pl.String,
}
ALERT_SCHEMA = {
    "kind": pl.String,
    "user": pl.String,
    "total": pl.Int128,  # minor units
    "time": pl.String,
    "partition": pl.Int32,
    "offset": pl.Int64,
}


@dataclass(frozen=True)
class Rules:
    """The thresholds and bounds, pre-converted to integer minor units for exact compares."""

    scale: int
    deposit_above: int  # total_minor > this -> deposit alert
    withdrawal_below: int  # total_minor < this -> withdrawal alert
    max_abs_minor: int
    max_abs_amount: Decimal

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Rules:
        s = settings or get_settings()
        return cls.of(
            s.deposit_alert_threshold,
            s.withdrawal_alert_threshold,
            s.transaction_max_abs_amount,
            s.transaction_amount_scale,
        )

    @classmethod
    def of(cls, deposit: Decimal, withdrawal: Decimal, max_abs: Decimal, scale: int = 2) -> Rules:
        # total > D  <=>  minor > floor(D * 10**s) and total < W  <=>  minor < ceil(W * 10**s)
        # for integer minor units, so thresholds need not be representable at the scale.
        return cls(
            scale=scale,
            deposit_above=math.floor(Decimal(deposit).scaleb(scale)),
            withdrawal_below=math.ceil(Decimal(withdrawal).scaleb(scale)),
            max_abs_minor=math.floor(Decimal(max_abs).scaleb(scale)),
            max_abs_amount=Decimal(max_abs),
        )


class UserTotal(NamedTuple):
    """One user's running total (what the changelog stores)."""

    minor: int  # the total in minor units
    transactions: int  # how many transactions it sums
    offset: int = -1  # source offset of the last one (its partition = the changelog's)
    time: str | None = None  # time of the last one


@dataclass(frozen=True)
class Transaction:
    user: str
    amount: Decimal
    time: str

    def as_value(self) -> dict[str, str]:
        """The message value of the `transactions` contract."""
        return {"user": self.user, "amount": format(self.amount, "f"), "time": self.time}


# --- exact decimals -----------------------------------------------------------------------


def to_minor(text: str, scale: int) -> int:
    """An amount as integer minor units; InvalidRecord if not a plain decimal at `scale`."""
    return minor_units(text, scale, "amount", AMOUNT_REASONS)


def format_minor(minor: int, scale: int) -> str:
    """Integer minor units as a decimal string with exactly `scale` places (`"-1250.00"`)."""
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**scale)
    return f"{sign}{whole}.{frac:0{scale}d}" if scale else f"{sign}{whole}"


# --- validation ---------------------------------------------------------------------------


def validate(key: bytes | None, value: bytes | None, rules: Rules) -> tuple[str, int, str]:
    """`(user, amount in minor units, time)` of a raw message, or InvalidRecord with the reason."""
    try:
        return _validate(key, value, rules)
    except InvalidRecord:
        raise
    except (ValueError, ArithmeticError, RecursionError, UnicodeError) as error:
        # Whatever a bad message trips on, it is a reason for the DLQ, never a crash.
        raise InvalidRecord(f"invalid message: {type(error).__name__}: {error}") from None


def _validate(key: bytes | None, value: bytes | None, rules: Rules) -> tuple[str, int, str]:
    if value is None:
        raise InvalidRecord("empty message (null value)")
    try:
        data = decode_json(value)
    except (UnicodeError, ValueError, RecursionError) as error:  # RecursionError: deep nesting
        raise InvalidRecord(f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidRecord(f"not a JSON object but {type(data).__name__}")
    user = data.get("user")
    if user is None or user == "":
        raise InvalidRecord("missing user")
    if not isinstance(user, str):
        raise InvalidRecord(f"user must be a string, got {type(user).__name__}")
    if not user.strip():
        raise InvalidRecord("blank user")
    if len(user) > MAX_USER_LENGTH:
        raise InvalidRecord(f"user longer than {MAX_USER_LENGTH} characters")
    try:
        user_key = user.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") cannot be a Kafka key
        raise InvalidRecord(f"user {user[:40]!r} is not valid Unicode text") from None
    amount = data.get("amount")
    if amount is None:
        raise InvalidRecord("missing amount")
    if not isinstance(amount, str):
        # JSON numbers may have passed through binary floats: only strings are exact.
        raise InvalidRecord(f"amount must be a decimal string, got {type(amount).__name__}")
    # Not to_minor: one call less per record.
    minor = minor_units(amount, rules.scale, "amount", AMOUNT_REASONS)
    if abs(minor) > rules.max_abs_minor:
        raise InvalidRecord(f"absurd amount {amount}: beyond the bound of ±{rules.max_abs_amount}")
    at = data.get("time")
    if not isinstance(at, str):
        raise InvalidRecord("missing time" if at is None else "time must be an ISO-8601 string")
    parsed = aware_time(at, "time", TIME_REASONS)
    if parsed.utcoffset():  # another offset (+05:00): the outputs' times are ISO-8601 UTC
        at = parsed.astimezone(UTC).isoformat()
    if key is None:
        raise InvalidRecord("missing key (the key must be the user)")
    if key != user_key:
        raise InvalidRecord("key does not match user")
    return user, minor, at


def parse_records(
    records: Sequence[Record], rules: Rules, partitions: int | None = None
) -> tuple[pl.DataFrame, Rejects]:
    """Valid records as a batch frame (BATCH_SCHEMA) in record order, and the rejects.

    With `partitions` (the topic's partition count) a record on another partition than its
    user's key hashes to is rejected: a user's total must live in exactly one partition.
    """
    parts, offsets, users, amounts, times = [], [], [], [], []
    rejects: Rejects = []
    for record in records:
        try:
            user, minor, at = validate(record.key, record.value, rules)
            if partitions is not None:
                home = key_partition(record.key, partitions)
                if home != record.partition:
                    raise InvalidRecord(
                        f"on partition {record.partition} but its key hashes to {home}: "
                        "produce with the user as key and the default partitioner"
                    )
        except InvalidRecord as error:
            rejects.append((record, str(error)))
            continue
        parts.append(record.partition)
        offsets.append(record.offset)
        users.append(user)
        amounts.append(minor)
        times.append(at)
    frame = pl.DataFrame(
        {"partition": parts, "offset": offsets, "user": users, "amount": amounts, "time": times},
        schema=BATCH_SCHEMA,
    )
    return frame, rejects


def frame_of(transactions: Iterable[Transaction], rules: Rules) -> pl.DataFrame:
    """A batch frame from Transaction objects (offsets = their order, partition 0)."""
    rows = [(t.user, to_minor(format(t.amount, "f"), rules.scale), t.time) for t in transactions]
    return pl.DataFrame(
        {
            "partition": [0] * len(rows),
            "offset": list(range(len(rows))),
            "user": [r[0] for r in rows],
            "amount": [r[1] for r in rows],
            "time": [r[2] for r in rows],
        },
        schema=BATCH_SCHEMA,
    )


# --- the rule -----------------------------------------------------------------------------


def apply_batch(
    totals: Mapping[str, UserTotal],
    transactions: pl.DataFrame | Iterable[Transaction],
    rules: Rules,
) -> tuple[dict[str, UserTotal], pl.DataFrame]:
    """Apply a batch in order to the running totals, vectorised.

    Returns the new totals of the users in the batch (the others are unchanged) and the
    alerts (ALERT_SCHEMA) in batch order. `totals` is not modified, so a caller can drop
    the result when its Kafka transaction aborts.
    """
    frame = (
        transactions if isinstance(transactions, pl.DataFrame) else frame_of(transactions, rules)
    )
    if frame.is_empty():
        return {}, pl.DataFrame(schema=ALERT_SCHEMA)
    users = frame["user"].unique(maintain_order=True).to_list()
    before = [totals.get(user) for user in users]
    start = pl.DataFrame(
        {
            "user": users,
            "start": [t.minor if t else 0 for t in before],
            "start_n": [t.transactions if t else 0 for t in before],
        },
        schema={"user": pl.String, "start": pl.Int128, "start_n": pl.Int64},
    )
    total = pl.col("start") + pl.col("amount").cum_sum().over("user")
    computed = frame.join(start, on="user", how="left", maintain_order="left").with_columns(
        total=total,
        transactions=pl.col("start_n") + pl.col("user").cum_count().over("user").cast(pl.Int64),
    )
    alerts = (
        computed.with_columns(
            kind=pl.when(pl.col("total") > rules.deposit_above)
            .then(pl.lit("deposit"))
            .when(pl.col("total") < rules.withdrawal_below)
            .then(pl.lit("withdrawal"))
        )
        .filter(pl.col("kind").is_not_null())
        .select(list(ALERT_SCHEMA))
    )
    last = computed.group_by("user", maintain_order=True).agg(
        pl.col("total", "transactions", "offset", "time").last()
    )
    new_totals = {
        user: UserTotal(total, n, offset, at)
        for user, total, n, offset, at in last.select(
            "user", "total", "transactions", "offset", "time"
        ).iter_rows()
    }
    return new_totals, alerts


def alert_values(alerts: pl.DataFrame, scale: int) -> list[dict[str, str]]:
    """Alert frame rows as `transaction-alerts` message values."""
    return [
        {"kind": kind, "user": user, "total": format_minor(total, scale), "time": at}
        for kind, user, total, at in alerts.select("kind", "user", "total", "time").iter_rows()
    ]


def _decimal_text(column: str, scale: int) -> pl.Expr:
    """Integer minor units as decimal text, vectorised (same output as format_minor)."""
    unit = 10**scale
    magnitude = pl.col(column).abs()
    parts = [
        pl.when(pl.col(column) < 0).then(pl.lit("-")).otherwise(pl.lit("")),
        (magnitude // unit).cast(pl.String),
    ]
    if scale:
        parts += [pl.lit("."), (magnitude % unit).cast(pl.String).str.zfill(scale)]
    return pl.concat_str(parts)


def encode_alerts(alerts: pl.DataFrame, scale: int) -> list[tuple[bytes, bytes, int]]:
    """(key, JSON value, source partition) per alert, encoded in one vectorised pass
    (the hot path: json.dumps per message costs more than the rule itself)."""
    encoded = alerts.select(
        pl.col("user"),
        pl.struct(
            pl.col("kind"), pl.col("user"), _decimal_text("total", scale).alias("total"),
            pl.col("time"),
        ).struct.json_encode().alias("value"),
        pl.col("partition"),
    )  # fmt: skip
    return [(u.encode(), v.encode(), p) for u, v, p in encoded.iter_rows()]


def encode_changelog(totals: Mapping[str, UserTotal], scale: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) per user for the changelog, vectorised like encode_alerts."""
    if not totals:
        return []
    users = list(totals)
    minor, n, offset, at = zip(*totals.values(), strict=True)
    frame = pl.DataFrame(
        {"user": users, "total": list(minor), "transactions": list(n), "offset": list(offset),
         "time": list(at)},
        schema={"user": pl.String, "total": pl.Int128, "transactions": pl.Int64,
                "offset": pl.Int64, "time": pl.String},
    )  # fmt: skip
    values = frame.select(
        pl.struct(
            pl.col("user"), _decimal_text("total", scale).alias("total"),
            pl.col("transactions"), pl.col("offset"), pl.col("time"),
        ).struct.json_encode()
    ).to_series()  # fmt: skip
    return [(u.encode(), v.encode()) for u, v in zip(users, values, strict=True)]


def changelog_value(user: str, total: UserTotal, scale: int) -> dict[str, Any]:
    """The compacted changelog's value for `user` (key = user, partition = the source's)."""
    return {
        "user": user,
        "total": format_minor(total.minor, scale),
        "transactions": total.transactions,
        "offset": total.offset,
        "time": total.time,
    }


def parse_changelog_value(user: str, value: dict[str, Any], scale: int) -> UserTotal:
    if not isinstance(value, dict) or value.get("user") != user:
        raise ValueError(f"changelog value for key {user!r} is malformed: {value!r}")
    return UserTotal(
        to_minor(value["total"], scale), int(value["transactions"]), int(value["offset"]),
        value.get("time"),
    )  # fmt: skip


# --- the changelog ------------------------------------------------------------------------


def fold_changelog(
    records: Iterable[Any], partitions: Iterable[int], scale: int
) -> tuple[dict[int, dict[str, UserTotal]], Rejects]:
    """The latest total per user of each changelog partition, from its records in order.

    A malformed record (a poison pill) does not stop the restore: the user keeps the last
    good total before it, and the record is returned with its reason, unless a later record
    of the same key supersedes it (then it no longer matters to anyone's total).
    """
    state: dict[int, dict[str, UserTotal]] = {p: {} for p in partitions}
    poison: dict[tuple[int, bytes | None], tuple[Any, str]] = {}
    for record in records:
        totals = state.setdefault(record.partition, {})
        try:
            user = record.key.decode()
            value = decode_json(record.value)
            if value is None:
                totals.pop(user, None)  # a tombstone
            else:
                totals[user] = parse_changelog_value(user, value, scale)
            poison.pop((record.partition, record.key), None)
        except (AttributeError, ValueError, TypeError, KeyError, ArithmeticError) as error:
            reason = f"bad changelog record: {type(error).__name__}: {error}"
            poison[(record.partition, record.key)] = (record, reason)
    return state, list(poison.values())
