"""Handlers for mismatches (list, detail, actions, CSV) and runs (list with counts, daily chart)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ledger.db import session_factory, unit_of_work
from ledger.errors import InvalidRequest
from ledger.logs import get_logger
from reconciliation import services
from reconciliation.models import MismatchStatus
from webhooks.review import cases, charts
from webhooks.review.params import parse_day, parse_id
from webhooks.review.security import current_user
from webhooks.review.templating import flash, render
from webhooks.review.views import bad_request, not_found

NOTE_MAX_CHARS = 4000
log = get_logger(__name__)
ACTIONS = {"resolve": services.resolve, "ignore": services.ignore, "reopen": services.reopen}
# Which actions each status offers (the services enforce the same rules).
OFFERED = {
    MismatchStatus.OPEN: ("resolve", "ignore"),
    MismatchStatus.RESOLVED: ("reopen", "ignore"),
    MismatchStatus.IGNORED: ("reopen", "resolve"),
    MismatchStatus.CLOSED: ("reopen",),
}


# --- list ----------------------------------------------------------------------------------------------------


def _list_context(f: cases.MismatchFilter, after: str | None, before: str | None) -> dict[str, Any]:
    with session_factory()() as session:
        page = cases.list_mismatches(session, f, after=after, before=before)
        notes = cases.latest_notes(session, [r.mismatch.id for r in page.rows])
        runs, _ = cases.list_runs(session, limit=30)
    return {"page": page, "notes": notes, "runs": runs}


async def mismatch_list(request: Request) -> Response:
    """The mismatch list: filters, sorting by amount and age, keyset pages."""
    try:
        f = cases.parse_filter(request.query_params)
        after = request.query_params.get("after") or None
        before = request.query_params.get("before") or None
        if after:
            cases.decode_cursor(f.sort, after)
        if before:
            cases.decode_cursor(f.sort, before)
    except ValueError as exc:
        return bad_request(request, str(exc))
    context = await run_in_threadpool(_list_context, f, after, before)
    context.update(
        section="mismatches",
        f=f,
        filter_params=f.params(),
        kinds=cases.kinds(),
        statuses=cases.statuses(),
        sorts=cases.SORT_LABELS,
        mismatches=context["page"].rows,
    )
    return render(request, "review/mismatches.html", context)


# --- CSV -----------------------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    # A text cell that a spreadsheet would run as a formula gets a leading quote (CSV injection).
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _number(value: Decimal | None) -> str:
    if value is None:
        return ""
    return format(value.normalize(), "f") if value else "0"


def _time(value: datetime | None) -> str:
    if value is None:
        return ""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _csv_record(row: Sequence[Any]) -> list[object]:
    (mid, kind, status, customer, currency, unit, expected, actual, gap, summary, occurred, first_seen,
     last_seen, first_run, last_run, action, actor, note, fingerprint, evidence) = row  # fmt: skip
    return [
        mid,
        getattr(kind, "value", kind),
        getattr(status, "value", status),
        _cell(customer),
        currency or "",
        unit,
        _number(expected),
        _number(actual),
        "" if expected is None and actual is None else _number(gap),
        _cell(summary),
        _time(occurred),
        _time(first_seen),
        _time(last_seen),
        first_run,
        last_run,
        getattr(action, "value", action) or "",
        _cell(actor),
        _cell(note),
        fingerprint,
        _cell(evidence),
    ]


def _csv_chunks(f: cases.MismatchFilter, rows_per_chunk: int = 1000) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(cases.EXPORT_COLUMNS)
    with session_factory()() as session:
        for n, row in enumerate(cases.iter_export_rows(session, f), start=1):
            writer.writerow(_csv_record(row))
            if n % rows_per_chunk == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


async def mismatch_csv(request: Request) -> Response:
    """Every mismatch the list's filters match, as CSV, streamed in keyset batches."""
    try:
        f = cases.parse_filter(request.query_params)
    except ValueError as exc:
        return bad_request(request, str(exc))

    async def body() -> AsyncIterator[str]:
        async for chunk in iterate_in_threadpool(_csv_chunks(f)):
            yield chunk

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="mismatches-{stamp}.csv"'},
    )


# --- one mismatch --------------------------------------------------------------------------------------------


def _detail(mismatch_id: int) -> cases.MismatchDetail | None:
    with session_factory()() as session:
        return cases.mismatch_detail(session, mismatch_id)


async def _render_detail(
    request: Request, mismatch_id: int, *, error: str | None = None, note: str = "", status_code: int = 200
) -> Response:
    detail = await run_in_threadpool(_detail, mismatch_id)
    if detail is None:
        return not_found(request, f"No mismatch #{mismatch_id}.")
    context = {
        "section": "mismatches",
        "d": detail,
        "m": detail.mismatch,
        "offered": OFFERED.get(detail.mismatch.status, ()),
        "error": error,
        "note": note,
        "back": request.query_params.get("back", ""),
    }
    return render(request, "review/mismatch.html", context, status_code=status_code)


async def mismatch_page(request: Request) -> Response:
    """One mismatch: both sides' evidence side by side, the actions, the audit history."""
    return await _render_detail(request, request.path_params["mismatch_id"])


def _act(action: str, mismatch_id: int, actor: str, note: str) -> None:
    service = ACTIONS[action]
    with unit_of_work() as session:
        service(session, mismatch_id, actor=actor, note=note)


async def mismatch_action(request: Request, form: FormData) -> Response:
    """Resolve, ignore or reopen a mismatch with a required note; the signed-in user is the audit row's actor."""
    mismatch_id: int = request.path_params["mismatch_id"]
    action: str = request.path_params["action"]
    if action not in ACTIONS:
        return not_found(request, f"No action {action!r}: resolve, ignore or reopen.")
    note = str(form.get("note", "")).strip()
    if not note:
        return await _render_detail(request, mismatch_id, error="A note is required: say why.", status_code=400)
    if len(note) > NOTE_MAX_CHARS:
        return await _render_detail(
            request,
            mismatch_id,
            error=f"The note is longer than {NOTE_MAX_CHARS} characters.",
            note=note[:NOTE_MAX_CHARS],
            status_code=400,
        )
    user = current_user(request)
    try:
        await run_in_threadpool(_act, action, mismatch_id, user.name, note)
    except services.UnknownMismatch:
        return not_found(request, f"No mismatch #{mismatch_id}.")
    except InvalidRequest as exc:  # e.g. resolving what is already resolved: nothing changed
        return await _render_detail(request, mismatch_id, error=str(exc), note=note, status_code=409)
    log.info("review.mismatch_action", mismatch_id=mismatch_id, action=action, actor=user.name)
    past = {"resolve": "resolved", "ignore": "ignored", "reopen": "reopened"}[action]
    flash(request, f"Mismatch #{mismatch_id} {past}.")
    return RedirectResponse(f"{request.scope.get('root_path', '')}/mismatches/{mismatch_id}", status_code=303)


# --- runs ----------------------------------------------------------------------------------------------------

CHART_DEFAULT_DAYS = 30
CHART_MAX_DAYS = 366


def _runs_context(before_id: int | None, run_id: int | None, since: date | None, until: date | None) -> dict[str, Any]:
    with session_factory()() as session:
        runs, older = cases.list_runs(session, before_id=before_id)
        selected = cases.get_run(session, run_id) if run_id is not None else None
        if since is None or until is None:
            if selected is not None:
                start = selected.since if selected.since.tzinfo else selected.since.replace(tzinfo=UTC)
                end = selected.until if selected.until.tzinfo else selected.until.replace(tzinfo=UTC)
                since = start.date()
                until = (end - timedelta(microseconds=1)).date()
            else:  # no window asked for: the last 30 days, today included
                until = datetime.now(UTC).date()
                since = until - timedelta(days=CHART_DEFAULT_DAYS - 1)
        if (until - since).days >= CHART_MAX_DAYS:
            since = until - timedelta(days=CHART_MAX_DAYS - 1)
        start_dt = datetime.combine(since, time(0), tzinfo=UTC)
        end_dt = datetime.combine(until + timedelta(days=1), time(0), tzinfo=UTC)
        series = charts.daily_series(session, start_dt, end_dt)
    return {
        "runs": runs,
        "older": older,
        "selected": selected,
        "since": since,
        "until": until,
        "series": series,
        "chart": charts.render_svg(series),
    }


async def run_list(request: Request) -> Response:
    """Runs with counts per kind, and the daily chart of credits granted, Stripe payments and provider cost."""
    params = request.query_params
    try:
        before_id = parse_id(params["before"], "before") if params.get("before") else None
        run_id = parse_id(params["run"], "run") if params.get("run") else None
        since = parse_day(params["from"], "from") if params.get("from") else None
        until = parse_day(params["to"], "to") if params.get("to") else None
    except ValueError:
        return bad_request(request, "before and run must be ids; from and to dates (YYYY-MM-DD).")
    if (since is None) != (until is None) or (since and until and since > until):
        return bad_request(request, "Give both from and to, with from on or before to.")
    context = await run_in_threadpool(_runs_context, before_id, run_id, since, until)
    if run_id is not None and context["selected"] is None:
        return not_found(request, f"No run #{run_id}.")
    kinds = cases.kinds()
    used = [k for k in kinds if any(k in (r.counts or {}) for r in context["runs"])]
    context.update(section="runs", kinds=used or kinds[:0])
    return render(request, "review/runs.html", context)
