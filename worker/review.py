"""Make clawback debt discoverable for a person: the account's recorded debt, the event's note, a log line,
and a review item when the reconciliation package offers a hook for one."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from ledger.models import Grant
    from worker.handlers.base import EventContext

log = structlog.get_logger("worker.review")

# reconciliation may define `flag_clawback_debt(session, *, customer_id, grant_id, units, evidence)`; the worker
# must not import it at module level (it sits below us), so it is looked up when needed.
_HOOK = ("reconciliation.hooks", "flag_clawback_debt")


def flag_debt(ctx: EventContext, grant: Grant, *, units: int, what: str) -> None:
    """Record that a clawback found the credits already spent (the ledger has booked it as account debt)."""
    evidence = {
        "event_id": ctx.event_id,
        "event_type": ctx.row.type,
        "grant_id": grant.id,
        "stripe_object_id": grant.stripe_object_id,
        "what": what,
    }
    log.warning("clawback_debt", customer_id=ctx.row.customer_id, units=units, **evidence)
    try:
        module = importlib.import_module(_HOOK[0])
    except ModuleNotFoundError:
        return
    hook = getattr(module, _HOOK[1], None)
    if callable(hook):
        hook(ctx.session, customer_id=None, grant_id=grant.id, units=units, evidence=evidence)
