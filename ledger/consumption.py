"""What a consumption is: the checked, priced request every backend applies, and the result it gives back.

The bottom of the consume path. :mod:`ledger.consume` (the entry point) validates and prices a request into a
:class:`Consumption`; one backend applies it: the PostgreSQL functions (:mod:`ledger.pgfast`) or the portable
path (:mod:`ledger.portable`), and each returns a :class:`ConsumeResult` or raises the ledger's error. Both
backends read the request's rows from here, so they cannot disagree on what is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ledger.config import get_billing_config
from ledger.errors import IdempotencyConflict, LedgerError
from ledger.posting import as_utc
from ledger.pricing import UsageInput, provider_cost


@dataclass(frozen=True)
class ConsumeResult:
    request_id: str
    customer_id: str
    units: int
    balance_after: int
    entry_id: int | None
    usage_id: int | None
    replayed: bool
    funded_by: tuple[tuple[int, int], ...]  # (grant_id, units drawn), in draw order


# One item of a batch: its result, or the ledger's refusal of it (the other items are not affected).
ConsumeOutcome = ConsumeResult | LedgerError


@dataclass(frozen=True, slots=True)
class Consumption:
    """A consumption request, checked and priced: what each way of applying it (Python, the function) takes."""

    customer_id: str
    request_id: str
    charge: int
    digest: str
    usage: UsageInput | None
    actor: str
    reason: str
    now: datetime

    @property
    def key(self) -> str:
        """The entry's idempotency key."""
        return consume_key(self.request_id)


def key_taken(error: BaseException, request_id: str) -> IdempotencyConflict | None:
    """The conflict a unique-key violation on a keyed write's request id means, on either backend, or None.

    Another customer's request with the same id committed first (an entry's ``idempotency_key``, or a usage
    record's or hold's ``request_id``): the id is taken. The database's message names the constraint or column.
    """
    text = str(error)
    if "idempotency_key" in text or "request_id" in text:
        return IdempotencyConflict(f"request id {request_id!r} was used with other parameters")
    return None


def consume_key(request_id: str) -> str:
    """The entry idempotency key of a consumption."""
    return f"consume:{request_id}"


def usage_row(account_id: int, request_id: str, usage: UsageInput, units: int, now: datetime) -> dict[str, object]:
    """The usage_records row for ``usage`` charged ``units``."""
    return {
        "account_id": account_id,
        "request_id": request_id,
        "user_id": usage.user_id,
        "workspace": usage.workspace,
        "feature": usage.feature,
        "provider": usage.provider,
        "model": usage.model,
        "operation": usage.operation,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "provider_cost_usd": provider_cost(usage, get_billing_config()),
        "units": units,
        "billable": usage.billable,
        "environment": usage.environment,
        "occurred_at": as_utc(usage.occurred_at) or now,
    }
