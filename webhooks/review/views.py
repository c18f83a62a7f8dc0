"""Handlers for login, customers and stored events: parse the request, run one read in a thread, render."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ledger.config import BillingConfig, get_billing_config
from ledger.db import session_factory
from ledger.inbox import StripeEvent, get_event
from ledger.logs import get_logger
from ledger.models import Account, EntryKind
from ledger.money import format_money, format_usd, to_minor
from webhooks.review import cases, customers
from webhooks.review.auth import authenticate, log_in, log_out
from webhooks.review.params import has_control_characters, parse_day, parse_id
from webhooks.review.security import safe_next
from webhooks.review.sessions import LoginThrottle
from webhooks.review.state import review_users
from webhooks.review.templating import render

USAGE_WINDOW_DAYS = 30
# A working day: after that, sign in again (the cookie's max age, webhooks.review.app, is the same).
SESSION_MAX_AGE_SECONDS = 12 * 3600

log = get_logger(__name__)
throttle = LoginThrottle()


def not_found(request: Request, what: str) -> Response:
    """A 404 page that says what was not found."""
    return render(request, "review/message.html", {"heading": "Not found", "message": what, "back": None}, 404)


def bad_request(request: Request, what: str) -> Response:
    """A 400 page that says what was wrong with the request."""
    return render(request, "review/message.html", {"heading": "Bad request", "message": what, "back": None}, 400)


# --- login ---------------------------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    """The sign-in form."""
    context = {
        "error": None,
        "next": safe_next(request.scope, request.query_params.get("next")),
        "username": "",
        "users_configured": bool(review_users()),
    }
    return render(request, "review/login.html", context)


async def login(request: Request, form: FormData) -> Response:
    """Check the name and password; on success start a fresh session and go where the user was headed."""
    name = str(form.get("username", "")).strip()[:255]
    password = str(form.get("password", ""))
    users = review_users()
    context = {
        "error": "That name and password do not match.",
        "next": safe_next(request.scope, str(form.get("next", ""))),
        "username": name,
        "users_configured": bool(users),
    }
    address = request.client.host if request.client else "unknown"
    if has_control_characters(name):
        # No reviewer's name has them (and the database could not count them): a plain refusal.
        return render(request, "review/login.html", context, status_code=401)
    if await run_in_threadpool(throttle.blocked, name, address):
        log.warning("review.login_throttled", username=name, client=address)
        context["error"] = "Too many failed sign-ins from here. Wait 15 minutes and try again."
        return render(request, "review/login.html", context, status_code=429)
    user = await run_in_threadpool(authenticate, users, name, password) if name and password else None
    if user is None:
        await run_in_threadpool(throttle.failed, name, address)
        log.info("review.login_failed", username=name, client=address)
        return render(request, "review/login.html", context, status_code=401)
    await run_in_threadpool(throttle.succeeded, name, address)
    await run_in_threadpool(partial(log_in, lifetime_seconds=SESSION_MAX_AGE_SECONDS), request, user)
    log.info("review.login", username=user.name)
    return RedirectResponse(safe_next(request.scope, str(form.get("next", ""))), status_code=303)


async def logout(request: Request, form: FormData) -> Response:
    """End the session, on the server too."""
    await run_in_threadpool(log_out, request)
    return RedirectResponse(f"{request.scope.get('root_path', '')}/login", status_code=303)


async def home(request: Request) -> Response:
    """The review app's front page is the mismatch list."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}/mismatches", status_code=303)


# --- customers -----------------------------------------------------------------------------------------------


def _recent_accounts(limit: int = 25) -> list[Account]:
    with session_factory()() as session:
        return list(session.scalars(select(Account).order_by(Account.id.desc()).limit(limit)))


def _find_account(q: str) -> Account | None:
    with session_factory()() as session:
        return customers.find_account(session, q)


async def customer_search(request: Request) -> Response:
    """Find a customer by Stripe or external id; without a query, list the newest accounts (by primary key)."""
    q = request.query_params.get("q", "").strip()
    if q:
        account = await run_in_threadpool(_find_account, q)
        if account is not None:
            url = f"{request.scope.get('root_path', '')}/customers/{account.customer_id}"
            return RedirectResponse(url, status_code=303)
    recent = await run_in_threadpool(_recent_accounts)
    return render(request, "review/customers.html", {"section": "customers", "q": q, "recent": recent})


def _parse_day(raw: str | None, default: datetime, name: str) -> datetime:
    if not raw:
        return default
    return datetime.combine(parse_day(raw, name), time(0), tzinfo=UTC)


def _margin_summary(
    session: Session, customer_id: str, since: datetime, until: datetime, config: BillingConfig
) -> dict[str, Any] | None:
    """The customer's margin over the window as reconciliation counts it: revenue at each grant's own price in the
    settlement currency, gross and net of Stripe's fees and refunds, against provider cost."""
    from reconciliation.margin import margin_rows

    rows = list(margin_rows(session, since=since, until=until, customer_id=customer_id, config=config))
    if not rows:
        return None
    revenue = sum((r.revenue for r in rows), Decimal(0))
    net = sum((r.revenue_net for r in rows), Decimal(0))
    cost = sum((r.cost_usd for r in rows), Decimal(0))
    comparable = all(r.comparable and not r.unpriced for r in rows)
    currency = rows[0].currency

    def shown(value: Decimal) -> str:
        return format_usd(value) if currency == "usd" else format_money(to_minor(value, currency), currency)

    return {
        "currency": currency,
        "revenue_shown": shown(revenue),
        "revenue_net_shown": shown(net),
        "revenue": revenue,
        "revenue_net": net,
        "cost_usd": cost,
        "margin_usd": revenue - cost if comparable else None,
        "net_margin_usd": net - cost if comparable else None,
        "notes": sorted({r.note for r in rows if r.note}),
    }


def _customer_context(
    customer_id: str,
    *,
    before_id: int | None,
    kind: EntryKind | None,
    find: str | None,
    since: datetime,
    until: datetime,
) -> dict[str, Any] | None:
    config = get_billing_config()
    credit_value = customers.credit_value_usd(config)
    with session_factory()() as session:
        account = customers.find_account(session, customer_id)
        if account is None:
            # No ledger account (a payment that never became a grant, say): what Stripe and reconciliation
            # know about the customer is still the answer.
            mismatches, more, notes = cases.for_customer(session, customer_id)
            events = customers.customer_events(session, customer_id)
            if not mismatches and not events:
                return None
            return {
                "customer_id": customer_id,
                "events": events,
                "mismatches": mismatches,
                "mismatches_more": more,
                "notes": notes,
            }
        overview = customers.customer_overview(session, account)
        page = customers.ledger_page(session, account, before_id=before_id, kind=kind, search=find)
        breakdown = customers.usage_breakdown(session, account, since=since, until=until, credit_value=credit_value)
        usage = list(breakdown.items())
        margin = _margin_summary(session, account.customer_id, since, until, config)
        mismatches, more, notes = cases.for_customer(session, account.customer_id)
    return {
        "overview": overview,
        "page": page,
        "usage": usage,
        "margin": margin,
        "credit_value": credit_value,
        "mismatches": mismatches,
        "mismatches_more": more,
        "notes": notes,
    }


async def customer_page(request: Request) -> Response:
    """Everything about one customer: the page that answers "why was I charged?"."""
    customer_id = request.path_params["customer_id"]
    params = request.query_params
    try:
        before_id = parse_id(params["before"], "before") if params.get("before") else None
        kind = EntryKind(params["kind"]) if params.get("kind") else None
        now = datetime.now(UTC)
        until = _parse_day(params.get("until"), now, "until")
        since = _parse_day(params.get("since"), until - timedelta(days=USAGE_WINDOW_DAYS), "since")
    except ValueError:
        return bad_request(request, "before must be an entry id, kind an entry kind, since/until dates (YYYY-MM-DD).")
    if since >= until:
        return bad_request(request, "The usage window's start must be before its end.")
    find = params.get("find", "").strip() or None
    context = await run_in_threadpool(
        _customer_context, customer_id, before_id=before_id, kind=kind, find=find, since=since, until=until
    )
    if context is None:
        return not_found(request, f"No account for customer {customer_id!r}.")
    if "overview" not in context:
        return render(request, "review/customer_unknown.html", {**context, "section": "customers"})
    context.update(
        section="customers",
        kind=kind.value if kind else "",
        find=find or "",
        entry_kinds=[k.value for k in EntryKind],
        usage_since=since,
        usage_until=until,
        usage_since_raw=params.get("since", "") or since.date().isoformat(),
        usage_until_raw=params.get("until", ""),
    )
    return render(request, "review/customer.html", context)


def _load_event(event_id: str) -> StripeEvent | None:
    with session_factory()() as session:
        return get_event(session, event_id)


async def event_page(request: Request) -> Response:
    """One stored Stripe event with its raw payload, exactly as it was received."""
    event = await run_in_threadpool(_load_event, request.path_params["event_id"])
    if event is None:
        return not_found(request, "No stored Stripe event has that id.")
    return render(request, "review/event.html", {"event": event, "section": ""})
