"""The usage API (/v1): the product's backend meters and charges AI usage through the ledger.

Handlers are thin: parse, open one unit of work, call one ledger function, translate its errors. Every write
takes an idempotency key (the ``Idempotency-Key`` header or the body's ``request_id``): a retry with the same body
gets the original response with 200 (and ``Idempotent-Replayed: true``), a reuse with another body gets 409.
Units are integers; money (provider cost, margin) is a decimal string, never a float.
"""

from __future__ import annotations

import dataclasses
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from starlette.exceptions import HTTPException

from ledger.consume import ConsumeInput, ConsumeResult
from ledger.db import unit_of_work
from ledger.errors import InvalidRequest, LedgerError
from ledger.holds import (
    CaptureResult,
    HoldResult,
    ReleaseNote,
    Statement,
    capture_hold_standalone,
    capture_statement,
    hold_statement,
    place_hold_standalone,
    release_hold_standalone,
)
from ledger.models import AccessState, EntryKind, GrantSource, HoldStatus, UsageEnvironment
from ledger.pricing import UsageInput
from ledger.queries import balance_summary, list_entries, usage_summary
from ledger.settings import get_settings
from webhooks.responses import error_body, ledger_error, validation_details
from webhooks.usage_writer import UsageWriter

ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,255}$"
CustomerId = Annotated[str, Path(pattern=ID_PATTERN, description="The customer's id in the ledger")]
HoldId = Annotated[str, Path(pattern=ID_PATTERN, description="The hold's request id")]
Key = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
# No control characters: PostgreSQL text cannot hold NUL, and none belongs in a name.
Name = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


def _plausible_time(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("the time is out of range") from exc
    if not 1970 <= utc.year <= 9000:
        raise ValueError("the time must be between 1970 and 9000")
    return utc


Timestamp = Annotated[AwareDatetime, AfterValidator(_plausible_time)]
Tokens = Annotated[int, Field(strict=True, ge=0, le=10**12)]
MAX_PROVIDER_COST_USD = Decimal(10_000)
Units = Annotated[int, Field(strict=True, ge=0, le=10**15)]

bearer = HTTPBearer(auto_error=False, description="An API token from API_TOKENS")


async def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """Accept a request only with one of the configured bearer tokens."""
    # async: a plain check, run on the event loop instead of costing every request a thread hand-off.
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    if not token_is_valid(credentials.credentials.encode()):
        raise HTTPException(401, "the bearer token is not valid", headers={"WWW-Authenticate": "Bearer"})
    return "api"


def token_is_valid(given: bytes) -> bool:
    """Whether ``given`` is one of the configured API tokens (compared in constant time, every token tried)."""
    valid = False
    for token in get_settings().api_tokens:
        valid |= hmac.compare_digest(given, token.get_secret_value().encode())
    return valid


router = APIRouter(prefix="/v1", tags=["usage"], dependencies=[Depends(require_token)])


# --- request bodies ----------------------------------------------------------------------------------------------


class UsageFields(BaseModel):
    """What an AI call did: attribution, tokens and the provider's cost (as in ledger.pricing.UsageInput)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Name | None = None
    workspace: Name | None = None
    feature: Name | None = None
    provider: Name | None = None
    model: Name | None = None
    operation: Name | None = None
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_tokens: Tokens = 0
    # At most $10,000 a call: no AI call costs more, and the daily roll-up (BIGINT 10^-10 USD, ~$922M a row) then
    # takes ~92,000 of the largest calls on one day and key before it is full (then 422, value_out_of_range).
    provider_cost_usd: Decimal | None = Field(
        default=None,
        ge=0,
        le=MAX_PROVIDER_COST_USD,
        max_digits=20,
        decimal_places=10,
        description='A decimal string, e.g. "0.0042"; at most 10000',
    )
    billable: bool = True
    environment: UsageEnvironment = UsageEnvironment.PRODUCTION
    occurred_at: Timestamp | None = None

    @field_validator("provider_cost_usd", mode="before")
    @classmethod
    def _no_float_money(cls, value: object) -> object:
        if isinstance(value, float):
            raise ValueError('give money as a decimal string ("0.0042"), never a JSON float')
        return value

    def usage_input(self) -> UsageInput | None:
        """The ledger's usage input, or None when no usage field was given (a plain charge in units)."""
        if self.model_fields_set.isdisjoint(_USAGE_NAMES):
            return None
        return UsageInput(**{name: getattr(self, name) for name in _USAGE_NAMES})


# Read once: the model_fields descriptor builds its answer on every access.
_USAGE_NAMES = tuple(UsageFields.model_fields)


class ConsumeRequest(UsageFields):
    """Charge a customer for one AI call (a usage record), once per request id."""

    customer_id: Name
    request_id: Key | None = Field(default=None, description="Idempotency key (or the Idempotency-Key header)")
    units: Units | None = Field(default=None, description="Credits to charge; omitted: priced from the usage")
    reason: Annotated[str, Field(max_length=1000, pattern=r"^[^\x00]*$")] = ""

    def consume_input(self, request_id: str) -> ConsumeInput:
        """The ledger's consumption input for this body under ``request_id``."""
        return ConsumeInput(self.customer_id, request_id, self.units, self.usage_input(), "api", self.reason)


class UsageBatchRequest(BaseModel):
    """Usage metered after the fact: each event a usage body with its own request_id, each its own unit."""

    model_config = ConfigDict(extra="forbid")

    events: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=1000,
        description="1 to 1,000 bodies of POST /v1/usage, each with its own request_id; each checked on its own",
        json_schema_extra={"items": {"$ref": "#/components/schemas/ConsumeRequest"}},
    )


class HoldRequest(UsageFields):
    """Reserve credits for a call that has not finished (it may time out)."""

    customer_id: Name
    request_id: Key | None = Field(default=None, description="Idempotency key (or the Idempotency-Key header)")
    units: Units | None = Field(default=None, description="Credits to hold; omitted: priced from the usage")
    ttl_seconds: Annotated[int, Field(strict=True, gt=0, le=7 * 24 * 3600)] = 600


class CaptureRequest(UsageFields):
    """Charge what the call used: fewer units than held gives the rest back."""

    units: Units | None = Field(default=None, description="Credits used; omitted: priced from the usage, or all held")
    note: Annotated[str, Field(max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")] = Field(
        default="", description="Added to the capture entry's reason, e.g. that the usage was estimated"
    )


class ReleaseRequest(BaseModel):
    """Why a hold is released, and the provider call it stood for (all optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_]+$")] = Field(
        default="released",
        description="e.g. provider_error, provider_timeout (the call may have been served: kept for reconciliation)",
    )
    provider: Name | None = None
    model: Name | None = None
    provider_request_id: Name | None = Field(default=None, description="The id the provider knows the call by")

    def note(self) -> ReleaseNote:
        """The ledger's release note."""
        return ReleaseNote(self.reason, self.provider, self.model, self.provider_request_id)


# --- responses ---------------------------------------------------------------------------------------------------


class Funding(BaseModel):
    grant_id: int
    units: int


class ConsumeResponse(BaseModel):
    request_id: str
    customer_id: str
    units: int
    balance_after: int
    entry_id: int | None
    usage_id: int | None
    funded_by: list[Funding]


class HoldResponse(BaseModel):
    request_id: str
    customer_id: str
    units: int
    status: HoldStatus
    expires_at: datetime
    balance_after: int


class CaptureResponse(BaseModel):
    request_id: str
    customer_id: str
    held: int
    captured: int
    released: int
    shortfall: int
    balance_after: int


class GrantOut(BaseModel):
    grant_id: int
    source: GrantSource
    units: int
    remaining: int
    frozen: int
    clawed_back: int
    priority: int
    expires_at: datetime | None
    stripe_object_id: str | None


class SubscriptionOut(BaseModel):
    subscription_id: str
    status: str | None
    price: str | None
    plan: str | None
    quantity: int
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    cancel_at: datetime | None
    pause_collection: str | None
    trial_end: datetime | None
    access_state: AccessState
    grace_until: datetime | None


class BalanceResponse(BaseModel):
    customer_id: str
    external_id: str | None
    balance: int
    held: int
    debt: int
    overdraft_limit: int
    available: int
    access_state: AccessState
    grace_until: datetime | None
    usage_allowed: bool
    grants: list[GrantOut]
    subscriptions: list[SubscriptionOut] = []


class EntryOut(BaseModel):
    id: int
    kind: EntryKind
    units: int
    balance_after: int
    debt_delta: int
    frozen_delta: int
    grant_id: int | None
    hold_id: int | None
    usage_id: int | None
    stripe_object_id: str | None
    actor: str
    reason: str
    created_at: datetime


class EntriesPage(BaseModel):
    data: list[EntryOut]
    has_more: bool
    next_cursor: int | None = Field(description="Pass as ?before= for the next (older) page")


class UsageRowOut(BaseModel):
    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    credits: int
    provider_cost_usd: Decimal
    margin: Decimal | None


class UsageReport(BaseModel):
    customer_id: str
    group_by: str
    since: datetime | None
    until: datetime | None
    rows: list[UsageRowOut]


class ErrorDetail(BaseModel):
    # Refusals carry their own fields beside code and message (available, requested, access_state, details).
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchResult(BaseModel):
    status: int = Field(description="The status the single call (POST /v1/usage) would have answered")
    body: ConsumeResponse | ErrorBody = Field(description="The body the single call would have answered")


class UsageBatchResponse(BaseModel):
    results: list[BatchResult] = Field(description="One result per event, in the order sent")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        401: "No valid bearer token",
        402: "Insufficient credits (the error carries `available`)",
        403: "The customer's access state refuses usage, or its plans do not include the call (`not_entitled`)",
        404: "Unknown customer or hold",
        409: "The idempotency key was used with another body, or the hold is not open",
        422: "Invalid body",
        429: "A limit refuses the call (`limit_exceeded`: the limit, what was used, the maximum, its reset time)",
    }.items()
}


# --- handlers ----------------------------------------------------------------------------------------------------


def request_id_of(body_value: str | None, header_value: str | None) -> str:
    if header_value is not None and body_value is not None and header_value != body_value:
        raise InvalidRequest("the Idempotency-Key header and the body's request_id differ")
    key = header_value if header_value is not None else body_value
    if not key:
        raise InvalidRequest("give an Idempotency-Key header or a request_id")
    if len(key) > 200 or not key.isascii() or not key.isprintable() or " " in key:
        raise InvalidRequest("the idempotency key must be 1-200 printable ASCII characters without spaces")
    return key


def replayed_status(replayed: bool, created: int = 201) -> int:
    """A write's status: ``created`` when applied now, 200 for a replay of an earlier request."""
    return 200 if replayed else created


def _replayed(response: Response, replayed: bool, created: int = 201) -> None:
    response.status_code = replayed_status(replayed, created)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def consume_response(result: ConsumeResult) -> ConsumeResponse:
    # Built from the ledger's own typed result, so not validated again (a batch answers up to 1,000 of them).
    return ConsumeResponse.model_construct(
        request_id=result.request_id,
        customer_id=result.customer_id,
        units=result.units,
        balance_after=result.balance_after,
        entry_id=result.entry_id,
        usage_id=result.usage_id,
        funded_by=[Funding.model_construct(grant_id=g, units=u) for g, u in result.funded_by],
    )


def hold_response(result: HoldResult) -> HoldResponse:
    return HoldResponse(
        request_id=result.request_id,
        customer_id=result.customer_id,
        units=result.units,
        status=result.status,
        expires_at=result.expires_at,
        balance_after=result.balance_after,
    )


def capture_response(result: CaptureResult) -> CaptureResponse:
    return CaptureResponse(
        request_id=result.request_id,
        customer_id=result.customer_id,
        held=result.held,
        captured=result.captured,
        released=result.released,
        shortfall=result.shortfall,
        balance_after=result.balance_after,
    )


async def usage_writer(request: Request) -> UsageWriter:
    """The server process's group-committer of consumptions."""
    writer: UsageWriter = request.app.state.usage_writer
    return writer


Writer = Annotated[UsageWriter, Depends(usage_writer)]


@router.post(
    "/usage",
    status_code=201,
    response_model=ConsumeResponse,
    responses={200: {"description": "Replay of an earlier request: the original response"}, **ERRORS},
    summary="Record usage and charge credits for it, once per request id",
)
async def record_usage(
    body: ConsumeRequest, response: Response, writer: Writer, idempotency_key: IdempotencyKey = None
) -> ConsumeResponse:
    request_id = request_id_of(body.request_id, idempotency_key)
    # Applied with the other calls in flight, in one transaction, and answered once that committed.
    outcome = await writer.submit(body.consume_input(request_id))
    if isinstance(outcome, LedgerError):
        raise outcome
    _replayed(response, outcome.replayed)
    return consume_response(outcome)


_BATCH_ITEM = TypeAdapter(ConsumeRequest)


@router.post(
    "/usage/batch",
    response_model=UsageBatchResponse,
    responses={401: ERRORS[401], 422: ERRORS[422]},
    summary="Record many usage events, each its own idempotent unit; one result per event",
)
async def record_usage_batch(body: UsageBatchRequest, writer: Writer) -> Response:
    return Response(await apply_usage_batch(body, writer), media_type="application/json")


async def apply_usage_batch(body: UsageBatchRequest, writer: UsageWriter) -> bytes:
    """Check each event on its own, apply the valid ones as one batch, and answer one result per event in order.

    The answer is UsageBatchResponse's JSON, built from plain dicts: a batch answers up to 1,000 results, and
    constructing a model per result cost more than the rest of the answer (tests check the bytes against the
    models' own serialization).
    """
    results: list[dict[str, Any] | None] = [None] * len(body.events)
    items: list[tuple[int, ConsumeInput]] = []
    for index, event in enumerate(body.events):
        try:
            parsed = _BATCH_ITEM.validate_python(event)
            if parsed.request_id is None:
                raise InvalidRequest("each event needs its own request_id")
        except ValidationError as exc:
            details = validation_details(exc.errors())
            results[index] = _batch_error(422, "invalid_request", "the request is invalid", details=details)
            continue
        except LedgerError as exc:
            results[index] = _batch_refusal(exc)
            continue
        items.append((index, parsed.consume_input(parsed.request_id)))
    if items:
        outcomes = await writer.apply_batch([item for _, item in items])
        for (index, _), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, LedgerError):
                results[index] = _batch_refusal(outcome)
            else:
                results[index] = {"status": replayed_status(outcome.replayed), "body": consume_body(outcome)}
    return pydantic_core.to_json({"results": results})


def consume_body(result: ConsumeResult) -> dict[str, Any]:
    """ConsumeResponse as a plain dict, in its fields' order (what the model would serialize)."""
    return {
        "request_id": result.request_id,
        "customer_id": result.customer_id,
        "units": result.units,
        "balance_after": result.balance_after,
        "entry_id": result.entry_id,
        "usage_id": result.usage_id,
        "funded_by": [{"grant_id": g, "units": u} for g, u in result.funded_by],
    }


def _batch_refusal(exc: LedgerError) -> dict[str, Any]:
    status, body = ledger_error(exc)
    return {"status": status, "body": ErrorBody.model_validate(body).model_dump(mode="json")}


def _batch_error(status: int, code: str, message: str, **details: Any) -> dict[str, Any]:
    body = ErrorBody.model_validate(error_body(code, message, **details))
    return {"status": status, "body": body.model_dump(mode="json")}


def apply_hold(body: HoldRequest, request_id: str) -> HoldResult:
    """Place the hold a body asks for, as a unit of work of its own."""
    usage = body.usage_input()
    return place_hold_standalone(
        body.customer_id, request_id=request_id, units=body.units, ttl_seconds=body.ttl_seconds, usage=usage
    )


def apply_capture(hold_id: str, body: CaptureRequest) -> CaptureResult:
    """Capture a hold as a body asks, as a unit of work of its own."""
    return capture_hold_standalone(hold_id, units=body.units, usage=body.usage_input(), note=body.note)


def hold_as_statement(body: HoldRequest, request_id: str) -> Statement[HoldResult] | None:
    """:func:`apply_hold` as one statement to send from the event loop, when it is one (None: apply_hold)."""
    usage = body.usage_input()
    return hold_statement(
        body.customer_id, request_id=request_id, units=body.units, ttl_seconds=body.ttl_seconds, usage=usage
    )


def capture_as_statement(hold_id: str, body: CaptureRequest) -> Statement[CaptureResult] | None:
    """:func:`apply_capture` as one statement to send from the event loop, when it is one (None: apply_capture)."""
    return capture_statement(hold_id, units=body.units, usage=body.usage_input(), note=body.note)


def apply_release(hold_id: str, body: ReleaseRequest | None = None) -> HoldResult:
    """Release a hold (saying why, when the body does), as a unit of work of its own."""
    return release_hold_standalone(hold_id, note=body.note() if body is not None else None)


@router.post(
    "/holds",
    status_code=201,
    response_model=HoldResponse,
    responses={200: {"description": "Replay of an earlier request: the original hold"}, **ERRORS},
    summary="Hold credits for a call in progress",
)
async def create_hold(
    body: HoldRequest, response: Response, writer: Writer, idempotency_key: IdempotencyKey = None
) -> HoldResponse:
    result = await writer.run(apply_hold, body, request_id_of(body.request_id, idempotency_key))
    _replayed(response, result.replayed)
    return hold_response(result)


@router.post(
    "/holds/{hold_id}/capture",
    response_model=CaptureResponse,
    responses=ERRORS,
    summary="Capture a hold: charge what the call used, give back the rest",
)
async def capture(
    hold_id: HoldId, response: Response, writer: Writer, body: CaptureRequest | None = None
) -> CaptureResponse:
    result = await writer.run(apply_capture, hold_id, body or CaptureRequest())
    _replayed(response, result.replayed, created=200)
    return capture_response(result)


@router.post(
    "/holds/{hold_id}/release",
    response_model=HoldResponse,
    responses=ERRORS,
    summary="Release a hold: the call did not happen, give the credits back",
)
async def release(
    hold_id: HoldId, response: Response, writer: Writer, body: ReleaseRequest | None = None
) -> HoldResponse:
    result = await writer.run(apply_release, hold_id, body)
    _replayed(response, result.replayed, created=200)
    return hold_response(result)


@router.get(
    "/customers/{customer_id}/balance", response_model=BalanceResponse, responses=ERRORS, summary="Balance and grants"
)
def get_balance(customer_id: CustomerId) -> BalanceResponse:
    with unit_of_work() as session:
        summary = balance_summary(session, customer_id)
    return BalanceResponse(
        customer_id=summary.customer_id,
        external_id=summary.external_id,
        balance=summary.balance,
        held=summary.held,
        debt=summary.debt,
        overdraft_limit=summary.overdraft_limit,
        available=summary.available,
        access_state=summary.access_state,
        grace_until=summary.grace_until,
        usage_allowed=summary.usage_allowed,
        grants=[GrantOut(**vars(g)) for g in summary.grants],
        subscriptions=[SubscriptionOut(**dataclasses.asdict(s)) for s in summary.subscriptions],
    )


@router.get(
    "/customers/{customer_id}/entries",
    response_model=EntriesPage,
    responses=ERRORS,
    summary="Ledger entries, newest first (cursor pagination)",
)
def get_entries(
    customer_id: CustomerId,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="next_cursor of the previous page")] = None,
) -> EntriesPage:
    with unit_of_work() as session:
        entries = list_entries(session, customer_id, limit=limit + 1, before_id=before)
        data = [EntryOut.model_validate(e, from_attributes=True) for e in entries[:limit]]
    has_more = len(entries) > limit
    return EntriesPage(data=data, has_more=has_more, next_cursor=data[-1].id if has_more else None)


@router.get(
    "/customers/{customer_id}/usage",
    response_model=UsageReport,
    responses=ERRORS,
    summary="Usage grouped by day, feature, model or user: tokens, credits, provider cost and margin",
)
def get_usage(
    customer_id: CustomerId,
    group_by: Literal["day", "feature", "model", "user"] = "day",
    since: Annotated[Timestamp | None, Query()] = None,
    until: Annotated[Timestamp | None, Query()] = None,
) -> UsageReport:
    if since is not None and until is not None and until < since:
        raise InvalidRequest("until is before since")
    with unit_of_work() as session:
        rows = usage_summary(session, customer_id, since=since, until=until, group_by=group_by)
    return UsageReport(
        customer_id=customer_id,
        group_by=group_by,
        since=since,
        until=until,
        rows=[UsageRowOut(**vars(r)) for r in rows],
    )
