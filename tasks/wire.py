"""The wire rules every domain shares: what makes a record invalid, aware ISO-8601 times,
exact decimal strings as integer units, and the partition Kafka gives a key.

A domain refuses a record by raising `InvalidRecord`; its message is the dead-letter
reason. Users and tests match on those reasons, and each domain has always worded them its
own way, so the rules that refuse take the domain's wording (`TimeReasons`,
`DecimalReasons`: `str.format` templates over `name`, the field; `value`, the text as
given; `short`, its first 40 characters; `scale`) and only format it on refusal.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple, Protocol, TypeVar

from kafka.partitioner.default import murmur2


class InvalidRecord(ValueError):
    """A record that breaks a contract; its message is the dead-letter reason."""


class Record(Protocol):
    """What the domains read of a consumed record (kafka-python's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


# Rejects go back to the caller as the very records it passed (to be dead-lettered).
RecordT = TypeVar("RecordT", bound=Record)


def _refusal(template: str, name: str, value: str, scale: int = 0) -> InvalidRecord:
    return InvalidRecord(template.format(name=name, value=value, short=value[:40], scale=scale))


# --- times --------------------------------------------------------------------------------


class TimeReasons(NamedTuple):
    """A domain's wording of a refused time (templates: see the module docstring)."""

    not_iso: str  # not ISO-8601 at all
    naive: str  # ISO-8601 without a time zone


def aware_time(text: str, name: str, reasons: TimeReasons) -> datetime:
    """`text` as an aware datetime: ISO-8601 with a time zone ("...Z", "...+02:00")."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _refusal(reasons.not_iso, name, text) from None
    # A naive time means some local time: the contract wants the zone said.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _refusal(reasons.naive, name, text)
    return moment


# --- exact decimals -----------------------------------------------------------------------

# ASCII digits only (no exponent, "_" or other scripts' digits), at most 40 on each side: a
# longer number is bad input, and int() of a huge digit string is slow. The sign stays with
# the whole part: int() reads it, so one int() of whole + fraction gives the signed units.
_DECIMAL = re.compile(r"([+-]?[0-9]{1,40})(?:\.([0-9]{1,40}))?")
_TENS = tuple(10**n for n in range(41))  # by index: faster than 10**n per record; scale <= 40


class DecimalReasons(NamedTuple):
    """A domain's wording of a refused decimal (templates: see the module docstring)."""

    not_decimal: str  # not a plain decimal string
    too_precise: str  # more significant decimal places than `scale`


def try_minor_units(text: str, scale: int) -> int | None:
    """`text` ("-12.50") as exact integer units of 10**-scale; None if not plain or too precise."""
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return None
    whole, fraction = match.groups()
    if fraction is None:
        return int(whole) * _TENS[scale]
    places = len(fraction)
    if places > scale:
        fraction = fraction.rstrip("0")  # "1.500" at scale 2 is exact: 150
        places = len(fraction)
        if places > scale:
            return None
    return int(whole + fraction) * _TENS[scale - places]


def minor_units(text: str, scale: int, name: str, reasons: DecimalReasons) -> int:
    """`try_minor_units`, or InvalidRecord with the domain's reason."""
    units = try_minor_units(text, scale)
    if units is None:
        shapeless = _DECIMAL.fullmatch(text) is None
        raise _refusal(reasons.not_decimal if shapeless else reasons.too_precise, name, text, scale)
    return units


# --- partitions ---------------------------------------------------------------------------


@lru_cache(maxsize=65_536)  # murmur2 is pure Python; a batch meets the same keys again
def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2, as Java's client does)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
