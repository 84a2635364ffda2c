"""The example processor `payments`: a `payment-submit` handler over a simulated upstream.

The upstream stands for a payment provider: it charges once per idempotency key (the job
id) and keeps its own ledger (a small SQLite file, so a charge made by a process that then
crashed is still seen by the next one). Calls go out at a controlled rate (a token bucket).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tasks.jobs import Handler, Job
from tasks.settings import Settings, get_settings

MINOR_UNITS = 2  # cents: amounts with more decimal places are refused, never rounded
_CREATE = """
CREATE TABLE IF NOT EXISTS charges (
    idempotency_key TEXT PRIMARY KEY,
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    reference TEXT,
    charged_at TEXT NOT NULL,
    calls INTEGER NOT NULL
)
"""


_SELECT = (
    "SELECT idempotency_key, amount_minor, currency, reference, charged_at, calls FROM charges"
)
_UPSERT = (
    "INSERT INTO charges VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 1) "
    "ON CONFLICT (idempotency_key) DO UPDATE SET calls = calls + 1"
)


def _chunks(items: list, size: int = 500):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of up to `burst`."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst = rate, burst
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> float:
        """Take `n` tokens, sleeping until they are there; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            self._sleep(wait)
        return wait


class UpstreamError(RuntimeError):
    pass


class PaymentsUpstream:
    """The simulated payment provider, idempotent by key, with its own SQLite ledger."""

    def __init__(self, path: Path, rate_per_s: float, burst: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.bucket = TokenBucket(rate_per_s, burst)
        # One connection guarded by a lock; WAL lets the daemon and a flow share the file.
        self._con = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute(_CREATE)
        self._lock = threading.Lock()

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The charge made under `key`, if any (a read: not a call that charges)."""
        return self.lookup_many([key]).get(key)

    def lookup_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The charges made under any of `keys`, by key."""
        with self._lock:
            return self._select(keys)

    def _select(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(keys):
            # Only the placeholders are formatted in; the keys are bound parameters.
            marks = ",".join("?" * len(chunk))
            rows = self._con.execute(f"{_SELECT} WHERE idempotency_key IN ({marks})", chunk)
            found.update((row[0], _charge(row)) for row in rows)
        return found

    def charge(
        self, key: str, amount_minor: int, currency: str, reference: str | None
    ) -> dict[str, Any]:
        """Charge once per key: a repeated key returns the first charge (and is counted)."""
        charge = self.charge_many([(key, amount_minor, currency, reference)])[key]
        if (charge["amount_minor"], charge["currency"]) != (amount_minor, currency):
            raise UpstreamError(f"idempotency key {key} was used for a different payment")
        return charge

    def charge_many(
        self, requests: list[tuple[str, int, str, str | None]]
    ) -> dict[str, dict[str, Any]]:
        """One upstream request charging (key, amount_minor, currency, reference) each.

        Returns the charge recorded under each key: for a repeated key, the first one."""
        self.bucket.acquire(len(requests))
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.executemany(_UPSERT, requests)
                charges = self._select([request[0] for request in requests])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return charges

    def calls(self, key: str) -> int:
        """How many charge calls the upstream received under `key` (0 if none)."""
        found = self.lookup(key)
        return found["calls"] if found else 0

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _charge(row: tuple) -> dict[str, Any]:
    key, amount_minor, currency, reference, charged_at, calls = row
    return {
        "idempotency_key": key,
        "amount_minor": amount_minor,
        "currency": currency,
        "reference": reference,
        "charged_at": charged_at,
        "calls": calls,
    }


def parse_amount(value: Any) -> int:
    """A positive decimal string with at most two decimal places, as integer minor units."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"amount must be a decimal string, got {value!r}")
    try:
        amount = Decimal(value)
    except InvalidOperation as error:
        raise ValueError(f"amount {value!r} is not a decimal number") from error
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"amount must be positive, got {value!r}")
    minor = amount.scaleb(MINOR_UNITS)
    if minor != minor.to_integral_value():
        raise ValueError(f"amount {value!r} has more than {MINOR_UNITS} decimal places")
    return int(minor)


def format_minor(amount_minor: int) -> str:
    return str(Decimal(amount_minor).scaleb(-MINOR_UNITS))


class PaymentSubmit:
    """The `payment-submit` handler: data `{"amount": "12.34", "currency": "EUR", "reference"?}`.

    The job id is the idempotency key. Delivery is at least once, so the handler first
    asks the upstream what it already did under the key and only charges the others: a
    redelivered job neither charges twice nor even calls again. `batch` does this for many
    jobs with one lookup and one charge request.
    """

    def __init__(self, upstream: PaymentsUpstream) -> None:
        self.upstream = upstream

    def __call__(self, job: Job) -> dict[str, Any]:
        outcome = self.batch([job])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def batch(self, jobs: list[Job]) -> list[dict[str, Any] | Exception]:
        outcomes: list[dict[str, Any] | Exception] = [{} for _ in jobs]
        requests: dict[int, tuple[str, int, str, str | None]] = {}
        for i, job in enumerate(jobs):
            try:
                requests[i] = _request(job)
            except ValueError as error:
                outcomes[i] = error
        keys = [request[0] for request in requests.values()]
        charges = self.upstream.lookup_many(keys)
        new = {request[0]: request for request in requests.values() if request[0] not in charges}
        if new:
            charges |= self.upstream.charge_many(list(new.values()))
        for i, (key, amount_minor, currency, _) in requests.items():
            charge = charges[key]
            if (charge["amount_minor"], charge["currency"]) != (amount_minor, currency):
                outcomes[i] = UpstreamError(f"idempotency key {key} was used for a different payment")  # fmt: skip
            else:
                outcomes[i] = {
                    "payment_id": f"pay_{key.replace('-', '')}",
                    "amount": format_minor(charge["amount_minor"]),
                    "currency": charge["currency"],
                    "charged_at": charge["charged_at"],
                }
        return outcomes


def _request(job: Job) -> tuple[str, int, str, str | None]:
    amount_minor = parse_amount(job.data.get("amount"))
    currency = job.data.get("currency", "EUR")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
        raise ValueError(f"currency must be a three-letter code, got {currency!r}")
    reference = job.data.get("reference")
    return (
        str(job.id),
        amount_minor,
        currency.upper(),
        None if reference is None else str(reference),
    )


def payment_submit(upstream: PaymentsUpstream) -> Handler:
    return PaymentSubmit(upstream)


def open_upstream(settings: Settings | None = None) -> PaymentsUpstream:
    s = settings or get_settings()
    return PaymentsUpstream(
        s.payments_upstream_ledger(), s.payments_upstream_rate_per_s, s.payments_upstream_burst
    )


def registry(settings: Settings | None = None) -> dict[str, Handler]:
    """The `payments` processor's handlers by job group."""
    return {"payment-submit": payment_submit(open_upstream(settings))}
