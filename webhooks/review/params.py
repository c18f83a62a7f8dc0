"""Reading ids, days and cursors from review URLs: anything a database column or Python cannot hold is refused.

Every handler reads its path and query values through these, so a hostile value (an id past BIGINT, a date at the
edge of time, a NUL byte) is a 400 or 404 page, never an error deep in a query.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.convertors import Convertor

# Ids are BIGINT on PostgreSQL and 64-bit INTEGER on SQLite.
MAX_ID = 2**63 - 1
# Days a billing system can mean; far enough from Python's and PostgreSQL's limits that a window or a day
# added or taken away never leaves them.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9000, 12, 31)
# A cursor's amount: the widest a mismatch amount or gap column holds (NUMERIC(30, 10)).
MAX_AMOUNT_DIGITS = 30


def parse_id(raw: str, name: str) -> int:
    """A positive row id; ValueError naming ``name`` otherwise."""
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not 0 < int(text) <= MAX_ID:
        raise ValueError(f"{name}: not an id: {raw[:40]!r}")
    return int(text)


def parse_day(raw: str, name: str) -> date:
    """A calendar day (YYYY-MM-DD) between 1970 and 9000; ValueError naming ``name`` otherwise."""
    try:
        day = date.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(f"{name}: not a date (YYYY-MM-DD): {raw[:40]!r}") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ValueError(f"{name}: {day.isoformat()} is outside {FIRST_DAY.isoformat()}..{LAST_DAY.isoformat()}")
    return day


def parse_time(raw: str, name: str) -> datetime:
    """An ISO 8601 time (UTC if no offset) on a day :func:`parse_day` accepts, as UTC."""
    try:
        parsed = datetime.fromisoformat(raw)
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{name}: not a time: {raw[:40]!r}") from None
    parse_day(parsed.date().isoformat(), name)
    return parsed


def parse_amount(raw: str, name: str) -> Decimal:
    """A finite decimal that fits the amount columns."""
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"{name}: not an amount: {raw[:40]!r}") from None
    if not value.is_finite() or value.adjusted() >= MAX_AMOUNT_DIGITS - 10:
        raise ValueError(f"{name}: not an amount: {raw[:40]!r}")
    return value


def has_control_characters(text: str) -> bool:
    """True for NUL and the other C0 controls (tab excepted): no id, name, date or search contains them."""
    return any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in text)


class IdConvertor(Convertor[int]):
    """``{name:id}`` in a route: a row id that fits BIGINT; anything else does not match (404)."""

    regex = "[1-9][0-9]{0,18}"

    def convert(self, value: str) -> int:
        number = int(value)
        if number > MAX_ID:
            # Starlette has matched already; a ValueError here would be a 500. The largest id stands in: no row has
            # it, so the page answers 404 like any unknown id.
            return MAX_ID
        return number

    def to_string(self, value: Any) -> str:
        return str(int(value))
