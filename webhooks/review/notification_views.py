"""The notifications page: the outbox's delivery log (attempts, status, latency, last error) and endpoint health."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ledger.db import session_factory
from ledger.models import DeliveryStatus
from ledger.outbox import endpoint_states, list_deliveries
from webhooks.review.templating import render
from webhooks.review.views import bad_request

PAGE_SIZE = 200


def _context(status: DeliveryStatus | None, customer: str | None) -> dict[str, Any]:
    with session_factory()() as session:
        return {
            "deliveries": list_deliveries(session, status=status, customer_id=customer, limit=PAGE_SIZE),
            "endpoints": endpoint_states(session),
        }


async def notification_list(request: Request) -> Response:
    """Deliveries newest first, filtered by status and customer; each endpoint's state."""
    params = request.query_params
    raw_status = params.get("status") or None
    try:
        status = DeliveryStatus(raw_status) if raw_status else None
    except ValueError:
        return bad_request(request, f"status must be one of {', '.join(s.value for s in DeliveryStatus)}.")
    customer = (params.get("customer") or "").strip()[:255] or None
    context = await run_in_threadpool(_context, status, customer)
    context.update(
        section="notifications",
        status=raw_status or "",
        customer=customer or "",
        statuses=[s.value for s in DeliveryStatus],
        page_size=PAGE_SIZE,
    )
    return render(request, "review/notifications.html", context)
