"""Make clawback debt discoverable for a person.

The ledger books credits a refund or lost dispute found already spent as account debt, in the same transaction
as the clawback. Here the worker says so in the event's note and a log line; the nightly reconciliation turns each
such clawback entry into a ``clawback_debt`` review item with its evidence (reconciliation.checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from worker.handlers.base import EventContext
    from worker.payments import FundedGrant

log = structlog.get_logger("worker.review")


def flag_debt(ctx: EventContext, grant: FundedGrant, *, units: int, what: str) -> None:
    """Log that a clawback found ``units`` credits already spent (the ledger has booked them as account debt)."""
    log.warning(
        "clawback_debt",
        customer_id=ctx.row.customer_id,
        units=units,
        event_id=ctx.event_id,
        event_type=ctx.row.type,
        grant_id=grant.id,
        stripe_object_id=grant.stripe_object_id,
        what=what,
    )
