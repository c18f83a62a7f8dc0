"""The HTTP side: Stripe's REST wire format over a stdlib threading server.

Form-encoded bodies, bearer (or basic) API keys, Stripe's error bodies, ``Request-Id``, idempotency keys on
POST, ``expand[]``, list paging, and the fault plan of ``store.faults`` applied before anything else.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .forms import FormError, decode_form
from .records import (
    BalanceTransaction,
    Charge,
    CheckoutSession,
    CreditNote,
    Customer,
    Dispute,
    Event,
    Invoice,
    InvoicePayment,
    PaymentIntent,
    Payout,
    Price,
    Product,
    Record,
    Refund,
    Subscription,
)
from .render import Renderer, list_object
from .store import EmulatorError, NotFound, Store

try:  # orjson is a project dependency and several times faster on big list pages
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - the stdlib fallback

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


JSON = dict[str, Any]

_NO_KEY_MESSAGE = (
    "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer "
    "auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for "
    "details, or we can help at https://support.stripe.com/."
)
_IN_PROGRESS_MESSAGE = (
    "There is currently another in-progress request using this Idempotent Key (that probably means you submitted "
    "twice, and the other request is still going through): {key}. Please try again later."
)
_REUSED_KEY_MESSAGE = (
    "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using "
    "a key other than '{key}' if you meant to execute a different request."
)

_ERROR_MESSAGES = {
    429: (
        "rate_limit",
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
    ),
    500: (None, "An unknown error occurred"),
    502: (None, "Bad gateway"),
    503: (None, "The service is temporarily unavailable"),
}


def stripe_error(
    status: int, message: str, *, type: str | None = None, code: str | None = None, param: str | None = None
) -> JSON:
    """Stripe's error body."""
    error_type = type or ("api_error" if status >= 500 else "invalid_request_error")
    body: JSON = {"message": message, "type": error_type}
    if code:
        body["code"] = code
        body["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param:
        body["param"] = param
    body["request_log_url"] = "https://dashboard.stripe.com/test/logs"
    return {"error": body}


@dataclass
class Request:
    """One parsed API request as the route handlers see it."""

    method: str
    path: str
    params: JSON
    api_version: str
    renderer: Renderer
    request_id: str
    idempotency_key: str | None
    expand: list[str] = field(default_factory=list)


Handler = Callable[["Api", Request, tuple[str, ...]], tuple[int, Any]]

# Parameters each list endpoint accepts besides limit/starting_after/ending_before/created/expand.
_LIST_PARAMS: dict[str, set[str]] = {
    "customer": {"email", "test_clock"},
    "checkout.session": {"customer", "payment_intent", "subscription", "status", "payment_link", "customer_details"},
    "payment_intent": {"customer"},
    "charge": {"customer", "payment_intent", "transfer_group"},
    "refund": {"charge", "payment_intent"},
    "subscription": {
        "customer",
        "price",
        "status",
        "collection_method",
        "test_clock",
        "current_period_end",
        "current_period_start",
    },
    "invoice": {"customer", "subscription", "status", "collection_method", "due_date"},
    "invoice_payment": {"invoice", "payment", "status"},
    "dispute": {"charge", "payment_intent"},
    "credit_note": {"customer", "invoice"},
    "balance_transaction": {"source", "type", "currency", "payout"},
    "payout": {"status", "arrival_date", "destination"},
    "event": {"type", "types", "delivery_success"},
    "price": {"product", "active", "type", "currency", "lookup_keys", "recurring"},
    "product": {"active", "ids", "shippable", "url"},
}

_KIND_BY_PREFIX: dict[str, type[Record]] = {
    "customers": Customer,
    "payment_intents": PaymentIntent,
    "charges": Charge,
    "refunds": Refund,
    "subscriptions": Subscription,
    "invoices": Invoice,
    "invoice_payments": InvoicePayment,
    "disputes": Dispute,
    "credit_notes": CreditNote,
    "balance_transactions": BalanceTransaction,
    "payouts": Payout,
    "events": Event,
    "prices": Price,
    "products": Product,
}


class Api:
    """Routes and handlers; stateless apart from the store and the idempotency cache."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._idempotency: dict[tuple[str, str], tuple[str, int, bytes]] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._idem_lock = threading.Lock()
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        for method, pattern, handler in _ROUTES:
            self.routes.append((method, re.compile(f"^{pattern}$"), handler))

    # --- dispatch ----------------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes | None]:
        """Answer one HTTP request: (status, headers, body); body None means drop the connection."""
        request_id = "req_" + secrets.token_urlsafe(10).replace("-", "x").replace("_", "y")[:14]
        out_headers = {"Request-Id": request_id, "Content-Type": "application/json"}
        split = urlsplit(raw_path)
        path = split.path.rstrip("/") or "/"
        if not path.startswith("/_emulator"):
            fault = self.store.faults.take(method, path)
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            if fault.disconnect:
                return 0, out_headers, None
            if fault.status is not None:
                code, message = _ERROR_MESSAGES.get(fault.status, (None, "Injected failure"))
                if fault.status == 429:
                    out_headers["Stripe-Should-Retry"] = "false"
                elif fault.status in (500, 503):
                    out_headers["Stripe-Should-Retry"] = "true"
                return fault.status, out_headers, _dumps(stripe_error(fault.status, message, code=code))
            api_key = _api_key(headers.get("authorization", ""))
            if api_key is None:
                return 401, out_headers, _dumps(stripe_error(401, _NO_KEY_MESSAGE))
            if not api_key.startswith(("sk_test_", "rk_test_")):
                shown = api_key[:8] + "*" * max(len(api_key) - 12, 0) + api_key[-4:]
                return (
                    401,
                    out_headers,
                    _dumps(stripe_error(401, f"Invalid API Key provided: {shown}", code=None)),
                )
        else:
            api_key = "emulator"
        try:
            query = decode_form(split.query)
            content_type = headers.get("content-type", "")
            form: JSON = {}
            if body:
                form = json.loads(body) if "json" in content_type else decode_form(body.decode())
        except (FormError, UnicodeDecodeError, ValueError) as exc:
            return 400, out_headers, _dumps(stripe_error(400, str(exc)))
        params = {**query, **form}
        version = headers.get("stripe-version") or self.store.api_version
        if not self.store.honour_request_version:
            version = self.store.api_version
        out_headers["Stripe-Version"] = version
        idem_key = headers.get("idempotency-key")
        if method in ("POST", "DELETE") and idem_key:
            out_headers["Idempotency-Key"] = idem_key
            fingerprint = hashlib.sha256(f"{method} {path} ".encode() + _dumps(params)).hexdigest()
            cache_key = (api_key, idem_key)
            with self._idem_lock:
                cached = self._idempotency.get(cache_key)
                if cached is None and cache_key in self._in_flight:
                    return (
                        409,
                        out_headers,
                        _dumps(
                            stripe_error(
                                409,
                                _IN_PROGRESS_MESSAGE.format(key=idem_key),
                                type="idempotency_error",
                            )
                        ),
                    )
                if cached is None:
                    self._in_flight.add(cache_key)
            if cached is not None:
                first_fingerprint, status, payload = cached
                if first_fingerprint != fingerprint:
                    return (
                        400,
                        out_headers,
                        _dumps(
                            stripe_error(
                                400,
                                _REUSED_KEY_MESSAGE.format(key=idem_key),
                                type="idempotency_error",
                            )
                        ),
                    )
                out_headers["Idempotent-Replayed"] = "true"
                out_headers["Original-Request"] = request_id
                return status, out_headers, payload
            try:
                status, payload = self._dispatch(method, path, params, version, request_id, idem_key)
                if status < 500 and status != 429:
                    with self._idem_lock:
                        self._idempotency[cache_key] = (fingerprint, status, payload)
            finally:
                with self._idem_lock:
                    self._in_flight.discard(cache_key)
            return status, out_headers, payload
        status, payload = self._dispatch(method, path, params, version, request_id, idem_key)
        return status, out_headers, payload

    def _dispatch(
        self, method: str, path: str, params: JSON, version: str, request_id: str, idem_key: str | None
    ) -> tuple[int, bytes]:
        allowed_methods = []
        for route_method, pattern, handler in self.routes:
            match = pattern.match(path)
            if match is None:
                continue
            if route_method != method:
                allowed_methods.append(route_method)
                continue
            expand = params.pop("expand", [])
            if isinstance(expand, str):
                expand = [expand]
            request = Request(
                method, path, params, version, self.store.renderer(version), request_id, idem_key, list(expand)
            )
            try:
                with self.store.lock:
                    self.store.current_request = (request_id, idem_key) if method != "GET" else None
                    try:
                        status, result = handler(self, request, match.groups())
                    finally:
                        self.store.current_request = None
                    if isinstance(result, dict) and request.expand:
                        for item in request.expand:
                            self._expand(result, item.split("."), request.renderer, 0)
                    return status, _dumps(result)
            except EmulatorError as exc:
                return exc.status, _dumps(
                    stripe_error(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param)
                )
        if allowed_methods:
            return 405, _dumps(stripe_error(405, f"Unrecognized request URL ({method}: {path})."))
        return 404, _dumps(
            stripe_error(
                404,
                f"Unrecognized request URL ({method}: {path}). Please see "
                "https://stripe.com/docs or we can help at https://support.stripe.com/.",
            )
        )

    # --- expansion ---------------------------------------------------------------------------------------

    def _expand(self, obj: JSON, parts: list[str], renderer: Renderer, depth: int) -> None:
        if depth >= 4:
            raise EmulatorError("You cannot expand more than 4 levels of a property.", param="expand")
        head, rest = parts[0], parts[1:]
        if obj.get("object") == "list" and head == "data":
            for item in obj["data"]:
                if rest and isinstance(item, dict):
                    self._expand(item, rest, renderer, depth)
            return
        record = self.store.peek(obj.get("id")) if isinstance(obj.get("id"), str) else None
        includable = _includable(renderer, record, head)
        if includable is not None:
            obj[head] = includable
        elif head not in obj:
            raise EmulatorError(f"This property cannot be expanded ({head}).", param="expand")
        value = obj[head]
        if isinstance(value, str):
            target = self.store.peek(value)
            if target is None:
                raise EmulatorError(f"This property cannot be expanded ({head}).", param="expand")
            obj[head] = value = renderer.render(target)
        if rest and isinstance(value, dict):
            self._expand(value, rest, renderer, depth + 1)

    # --- list helpers ------------------------------------------------------------------------------------

    def list_objects(
        self,
        request: Request,
        object_name: str,
        url: str,
        *,
        filters: JSON | None = None,
        any_of: tuple[str, list[str]] | None = None,
        predicate: Callable[[Record], bool] | None = None,
    ) -> tuple[int, JSON]:
        params = dict(request.params)
        limit = _limit(params.pop("limit", None))
        starting_after = params.pop("starting_after", None) or None
        ending_before = params.pop("ending_before", None) or None
        created_param = params.pop("created", None)
        created: dict[str, int] | int | None = None
        if isinstance(created_param, dict):
            created = {op: _int(v, f"created[{op}]") for op, v in created_param.items()}
        elif created_param not in (None, ""):
            created = _int(created_param, "created")
        allowed = _LIST_PARAMS.get(object_name, set())
        for name in params:
            if name not in allowed:
                raise EmulatorError(f"Received unknown parameter: {name}", param=name)
        records, has_more = self.store.list_page(
            object_name,
            limit=limit,
            starting_after=starting_after,
            ending_before=ending_before,
            created=created,
            filters=filters,
            any_of=any_of,
            predicate=predicate,
        )
        return 200, list_object([request.renderer.render(r) for r in records], url, has_more=has_more)

    def retrieve(self, request: Request, kind: type[Record], object_id: str) -> tuple[int, JSON]:
        record = self.store.peek(object_id)
        if not isinstance(record, kind):
            raise NotFound(kind.object_name.replace("_", " ").replace(".", " "), object_id)
        retention = self.store.events_retention_days
        if (
            isinstance(record, Event)
            and retention is not None
            and record.created < self.store.clock.now() - retention * 86400
        ):
            raise NotFound("event", object_id)
        return 200, request.renderer.render(record)


def _includable(renderer: Renderer, record: Record | None, name: str) -> JSON | None:
    """Properties Stripe adds only when expanded."""
    if isinstance(record, CheckoutSession) and name == "line_items":
        items = renderer.checkout_line_items(record)
        return list_object(items, f"/v1/checkout/sessions/{record.id}/line_items")
    if isinstance(record, Invoice) and name == "payments":
        return renderer.invoice_payments(record)
    if isinstance(record, Charge) and name == "refunds":
        return renderer.charge_refunds(record)
    return None


def _api_key(authorization: str) -> str | None:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            user = base64.b64decode(value.strip()).decode().split(":", 1)[0]
        except (ValueError, UnicodeDecodeError):
            return None
        return user or None
    return None


def _int(value: Any, param: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EmulatorError(f"Invalid integer: {value}", param=param, code="parameter_invalid_integer") from None


def _limit(value: Any) -> int:
    if value in (None, ""):
        return 10
    limit = _int(value, "limit")
    if limit < 1:
        raise EmulatorError(
            "This value must be greater than or equal to 1.", param="limit", code="parameter_invalid_integer"
        )
    if limit > 100:
        raise EmulatorError(
            "This value must be less than or equal to 100.", param="limit", code="parameter_invalid_integer"
        )
    return limit


def _bool(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def _metadata(params: JSON) -> dict[str, str]:
    metadata = params.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise EmulatorError("Invalid object", param="metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def _require(params: JSON, name: str) -> Any:
    value = params.get(name)
    if value in (None, ""):
        raise EmulatorError(f"Missing required param: {name}.", param=name, code="parameter_missing")
    return value


def _small_page(request: Request, items: list[JSON], url: str) -> tuple[int, JSON]:
    """Paging over a short list that lives inside one object (line items, invoice lines)."""
    limit = _limit(request.params.get("limit"))
    ids = [item["id"] for item in items]
    start = 0
    if request.params.get("starting_after"):
        after = request.params["starting_after"]
        start = ids.index(after) + 1 if after in ids else len(ids)
    elif request.params.get("ending_before"):
        before = request.params["ending_before"]
        end = ids.index(before) if before in ids else 0
        start = max(end - limit, 0)
        return 200, list_object(items[start:end], url, has_more=start > 0)
    page = items[start : start + limit]
    return 200, list_object(page, url, has_more=start + limit < len(items))


# --- handlers --------------------------------------------------------------------------------------------


def _retrieve_by_prefix(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    resource, object_id = groups
    return api.retrieve(request, _KIND_BY_PREFIX[resource], object_id)


def _simple_list(object_name: str, url: str, filter_names: tuple[str, ...] = ()) -> Handler:
    def handler(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
        filters = {name: request.params[name] for name in filter_names if request.params.get(name)}
        return api.list_objects(request, object_name, url, filters=filters)

    return handler


def _list_customers(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    email = request.params.get("email")
    filters = {"email": email} if email else {}
    return api.list_objects(
        request, "customer", "/v1/customers", filters=filters, predicate=lambda r: not getattr(r, "deleted", False)
    )


def _create_customer(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    customer = api.store.create_customer(
        email=p.get("email"), name=p.get("name"), description=p.get("description"), metadata=_metadata(p)
    )
    return 200, request.renderer.render(customer)


def _update_customer(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    customer = api.store.get(groups[0], Customer)
    p = request.params
    for name in ("email", "name", "description"):
        if name in p:
            setattr(customer, name, p[name] or None)
    if "metadata" in p:
        customer.metadata = {**customer.metadata, **_metadata(p)}
        customer.metadata = {k: v for k, v in customer.metadata.items() if v != ""}
    return 200, request.renderer.render(customer)


def _delete_customer(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    customer = api.store.get(groups[0], Customer)
    customer.deleted = True
    api.store._emit("customer.deleted", customer, api.store.clock.now())
    return 200, {"id": customer.id, "object": "customer", "deleted": True}


def _list_checkout_sessions(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    filters = {
        n: request.params[n] for n in ("customer", "payment_intent", "subscription", "status") if request.params.get(n)
    }
    return api.list_objects(request, "checkout.session", "/v1/checkout/sessions", filters=filters)


def _create_checkout_session(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    items = p.get("line_items") or []
    if not isinstance(items, list) or not items:
        raise EmulatorError("Missing required param: line_items.", param="line_items", code="parameter_missing")
    if len(items) > 1:
        raise EmulatorError("The emulator supports one line item per session.", param="line_items")
    item = items[0]
    price = _require(item, "price") if isinstance(item, dict) else None
    session = api.store.create_checkout_session(
        p.get("customer"),
        str(price),
        quantity=_int(item.get("quantity", 1), "line_items[0][quantity]"),
        mode=p.get("mode"),
        metadata=_metadata(p),
        client_reference_id=p.get("client_reference_id"),
        customer_email=p.get("customer_email"),
        success_url=p.get("success_url"),
    )
    return 200, request.renderer.render(session)


def _retrieve_checkout_session(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    return api.retrieve(request, CheckoutSession, groups[0])


def _checkout_line_items(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    session: CheckoutSession = api.store.get(groups[0], CheckoutSession)
    return _small_page(
        request, request.renderer.checkout_line_items(session), f"/v1/checkout/sessions/{session.id}/line_items"
    )


def _expire_checkout_session(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    return 200, request.renderer.render(api.store.expire_checkout_session(groups[0]))


def _complete_checkout_session(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    session = api.store.complete_checkout_session(groups[0], fail=_bool(request.params.get("fail", False)))
    return 200, request.renderer.render(session)


def _create_refund(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    target = p.get("charge") or p.get("payment_intent")
    if not target:
        raise EmulatorError(
            "One of the following params should be provided for this request: payment_intent or charge.",
            code="parameter_missing",
        )
    param = "charge" if p.get("charge") else "payment_intent"
    kind = Charge if param == "charge" else PaymentIntent
    if not isinstance(api.store.peek(target), kind):
        raise NotFound(param.replace("_", " "), target, param=param)
    refund = api.store.refund(
        target,
        _int(p["amount"], "amount") if p.get("amount") not in (None, "") else None,
        reason=p.get("reason"),
        metadata=_metadata(p),
    )
    return 200, request.renderer.render(refund)


def _list_subscriptions(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    params = request.params
    filters = {n: params[n] for n in ("customer", "price") if params.get(n)}
    status = params.get("status")
    predicate: Callable[[Record], bool] | None
    if status in (None, ""):
        # Stripe leaves canceled subscriptions out unless asked for them.
        predicate = lambda r: getattr(r, "status", None) not in ("canceled", "incomplete_expired")  # noqa: E731
    elif status == "all":
        predicate = None
    elif status == "ended":
        predicate = lambda r: getattr(r, "status", None) in ("canceled", "incomplete_expired")  # noqa: E731
    else:
        filters["status"] = status
        predicate = None
    return api.list_objects(request, "subscription", "/v1/subscriptions", filters=filters, predicate=predicate)


def _create_subscription(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    items = p.get("items") or []
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise EmulatorError("Missing required param: items.", param="items", code="parameter_missing")
    sub = api.store.create_subscription(
        _require(p, "customer"),
        str(_require(items[0], "price")),
        quantity=_int(items[0].get("quantity", 1), "items[0][quantity]"),
        metadata=_metadata(p),
    )
    return 200, request.renderer.render(sub)


def _update_subscription(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    sub: Subscription = api.store.get(groups[0], Subscription)
    if _bool(p.get("cancel_at_period_end", False)):
        sub = api.store.cancel_subscription(sub, at_period_end=True)
    if "metadata" in p:
        sub.metadata = {**sub.metadata, **_metadata(p)}
    return 200, request.renderer.render(sub)


def _cancel_subscription(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    return 200, request.renderer.render(api.store.cancel_subscription(groups[0]))


def _list_invoices(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    filters = {n: request.params[n] for n in ("customer", "subscription", "status") if request.params.get(n)}
    return api.list_objects(request, "invoice", "/v1/invoices", filters=filters)


def _invoice_lines(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    invoice: Invoice = api.store.get(groups[0], Invoice)
    return _small_page(request, request.renderer.invoice_lines(invoice), f"/v1/invoices/{invoice.id}/lines")


def _pay_invoice(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    invoice = api.store.retry_invoice(groups[0])
    if invoice.status != "paid":
        # The attempt is recorded (invoice.payment_failed) and the caller gets Stripe's card error.
        raise EmulatorError("Your card was declined.", status=402, type="card_error", code="card_declined")
    return 200, request.renderer.render(invoice)


def _list_invoice_payments(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    filters: JSON = {}
    if p.get("invoice"):
        filters["invoice"] = p["invoice"]
    payment = p.get("payment")
    if isinstance(payment, dict) and payment.get("payment_intent"):
        filters["payment_intent"] = payment["payment_intent"]
    if p.get("status"):
        filters["status"] = p["status"]
    return api.list_objects(request, "invoice_payment", "/v1/invoice_payments", filters=filters)


def _close_dispute(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    return 200, request.renderer.render(api.store.close_dispute(groups[0], won=False))


def _list_credit_notes(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    filters = {n: request.params[n] for n in ("customer", "invoice") if request.params.get(n)}
    return api.list_objects(request, "credit_note", "/v1/credit_notes", filters=filters)


def _create_credit_note(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    amount = _int(p["amount"], "amount") if p.get("amount") not in (None, "") else None
    refund_amount = _int(p.get("refund_amount") or 0, "refund_amount")
    note = api.store.create_credit_note(
        str(_require(p, "invoice")),
        amount=amount or (refund_amount or None),
        reason=p.get("reason"),
        refund=refund_amount > 0,
        memo=p.get("memo"),
    )
    return 200, request.renderer.render(note)


def _credit_note_lines(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    note: CreditNote = api.store.get(groups[0], CreditNote)
    rendered = request.renderer.credit_note(note)["lines"]["data"]
    return _small_page(request, rendered, f"/v1/credit_notes/{note.id}/lines")


def _list_balance_transactions(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    filters = {n: request.params[n] for n in ("source", "type", "currency") if request.params.get(n)}
    payout = request.params.get("payout")
    if payout:
        api.store.get(str(payout), Payout)  # 404 for an unknown payout, as Stripe answers
    return api.list_objects(
        request,
        "balance_transaction",
        "/v1/balance_transactions",
        filters=filters,
        predicate=(lambda r: getattr(r, "payout", None) == payout) if payout else None,
    )


def _list_events(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    types = p.get("types")
    event_type = p.get("type")
    if types and event_type:
        raise EmulatorError("You may only specify one of these parameters: type, types.", param="types")
    if types:
        if not isinstance(types, list):
            types = [types]
        if len(types) > 20:
            raise EmulatorError("You may pass at most 20 types.", param="types")
        return api.list_objects(request, "event", "/v1/events", any_of=("type", [str(t) for t in types]))
    if event_type and "*" in event_type:
        import fnmatch

        return api.list_objects(
            request, "event", "/v1/events", predicate=lambda r: fnmatch.fnmatchcase(getattr(r, "type", ""), event_type)
        )
    if event_type:
        return api.list_objects(request, "event", "/v1/events", filters={"type": event_type})
    return api.list_objects(request, "event", "/v1/events")


def _list_prices(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    filters: JSON = {}
    if p.get("product"):
        filters["product"] = p["product"]
    if p.get("active") not in (None, ""):
        filters["active"] = _bool(p["active"])
    lookup_keys = p.get("lookup_keys")
    predicate = None
    if lookup_keys:
        keys = set(lookup_keys if isinstance(lookup_keys, list) else [lookup_keys])
        predicate = lambda r: getattr(r, "lookup_key", None) in keys  # noqa: E731
    return api.list_objects(request, "price", "/v1/prices", filters=filters, predicate=predicate)


def _create_price(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    recurring = p.get("recurring") or {}
    product = p.get("product")
    if not product and isinstance(p.get("product_data"), dict):
        product = api.store.create_product(str(p["product_data"].get("name", "Product"))).id
    price = api.store.create_price(
        unit_amount=_int(_require(p, "unit_amount"), "unit_amount"),
        currency=str(_require(p, "currency")),
        interval=recurring.get("interval") if isinstance(recurring, dict) else None,
        product=product,
        lookup_key=p.get("lookup_key"),
        nickname=p.get("nickname"),
    )
    return 200, request.renderer.render(price)


def _create_product(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    product = api.store.create_product(str(_require(request.params, "name")), id=request.params.get("id"))
    return 200, request.renderer.render(product)


def _emulator_health(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    return 200, {
        "ok": True,
        "now": api.store.clock.now(),
        "api_version": api.store.api_version,
        "counts": {name: api.store.count(name) for name in ("customer", "charge", "invoice", "event")},
    }


def _emulator_advance(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    seconds = _int(request.params.get("seconds", 0), "seconds") + 86400 * _int(request.params.get("days", 0), "days")
    return 200, {"now": api.store.clock.advance(seconds)}


def _emulator_faults(api: Api, request: Request, groups: tuple[str, ...]) -> tuple[int, JSON]:
    p = request.params
    faults = api.store.faults
    if _bool(p.get("clear", False)):
        faults.clear()
    if p.get("fail_next"):
        faults.fail_next(
            _int(p["fail_next"], "fail_next"),
            status=_int(p.get("status", 429), "status"),
            path_prefix=p.get("path_prefix") or None,
        )
    if p.get("slow_ms") not in (None, ""):
        faults.slow_ms = _int(p["slow_ms"], "slow_ms")
    if p.get("failure_rate") not in (None, ""):
        faults.set_random_failures(float(p["failure_rate"]), status=_int(p.get("status", 500), "status"))
    return 200, {"pending": faults.pending, "slow_ms": faults.slow_ms, "failure_rate": faults.failure_rate}


_ID = r"([A-Za-z0-9_]+)"
_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/v1/customers", _list_customers),
    ("POST", "/v1/customers", _create_customer),
    ("POST", f"/v1/customers/{_ID}", _update_customer),
    ("DELETE", f"/v1/customers/{_ID}", _delete_customer),
    ("GET", "/v1/checkout/sessions", _list_checkout_sessions),
    ("POST", "/v1/checkout/sessions", _create_checkout_session),
    ("GET", f"/v1/checkout/sessions/{_ID}", _retrieve_checkout_session),
    ("GET", f"/v1/checkout/sessions/{_ID}/line_items", _checkout_line_items),
    ("POST", f"/v1/checkout/sessions/{_ID}/expire", _expire_checkout_session),
    ("GET", "/v1/payment_intents", _simple_list("payment_intent", "/v1/payment_intents", ("customer",))),
    ("GET", "/v1/charges", _simple_list("charge", "/v1/charges", ("customer", "payment_intent"))),
    ("GET", "/v1/refunds", _simple_list("refund", "/v1/refunds", ("charge", "payment_intent"))),
    ("POST", "/v1/refunds", _create_refund),
    ("GET", "/v1/subscriptions", _list_subscriptions),
    ("POST", "/v1/subscriptions", _create_subscription),
    ("POST", f"/v1/subscriptions/{_ID}", _update_subscription),
    ("DELETE", f"/v1/subscriptions/{_ID}", _cancel_subscription),
    ("GET", "/v1/invoices", _list_invoices),
    ("GET", f"/v1/invoices/{_ID}/lines", _invoice_lines),
    ("POST", f"/v1/invoices/{_ID}/pay", _pay_invoice),
    ("GET", "/v1/invoice_payments", _list_invoice_payments),
    ("GET", "/v1/disputes", _simple_list("dispute", "/v1/disputes", ("charge", "payment_intent"))),
    ("POST", f"/v1/disputes/{_ID}/close", _close_dispute),
    ("GET", "/v1/credit_notes", _list_credit_notes),
    ("POST", "/v1/credit_notes", _create_credit_note),
    ("GET", f"/v1/credit_notes/{_ID}/lines", _credit_note_lines),
    ("GET", "/v1/balance_transactions", _list_balance_transactions),
    ("GET", "/v1/payouts", _simple_list("payout", "/v1/payouts", ("status",))),
    ("GET", "/v1/events", _list_events),
    ("GET", "/v1/prices", _list_prices),
    ("POST", "/v1/prices", _create_price),
    ("GET", "/v1/products", _simple_list("product", "/v1/products")),
    ("POST", "/v1/products", _create_product),
    (
        "GET",
        r"/v1/(customers|payment_intents|charges|refunds|subscriptions|invoices|invoice_payments|disputes|"
        rf"credit_notes|balance_transactions|payouts|events|prices|products)/{_ID}",
        _retrieve_by_prefix,
    ),
    ("GET", "/_emulator/health", _emulator_health),
    ("POST", "/_emulator/clock/advance", _emulator_advance),
    ("POST", "/_emulator/faults", _emulator_faults),
    ("POST", f"/_emulator/checkout/sessions/{_ID}/complete", _complete_checkout_session),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle and delayed ACKs stall keep-alive clients ~40 ms.
    disable_nagle_algorithm = True
    server_version = "stripe-emulator"
    sys_version = ""
    api: Api

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, payload = self.api.handle(self.command, self.path, headers, body)
        if payload is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        self.send_response(status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and the demo print their own progress
        return


class _Server(ThreadingHTTPServer):
    # Many clients at once (benchmarks, the demo's worker and reconciler) should queue, not be refused.
    request_queue_size = 128


class EmulatorServer:
    """The emulator's HTTP server on ``host:port`` (port 0: a free one), serving from a background thread."""

    def __init__(self, store: Store | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store or Store()
        self.api = Api(self.store)
        handler = type("EmulatorHandler", (_Handler,), {"api": self.api})
        self._server = _Server((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base address to give the stripe package, e.g. ``http://127.0.0.1:54321``."""
        host = self._server.server_address[0]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host}:{self.port}"

    def start(self) -> EmulatorServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            # A short poll interval so that stop() returns quickly (tests start and stop many servers).
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="stripe-emulator", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def client(self, api_key: str = "sk_test_emulator", **options: Any) -> Any:
        """A ``stripe.StripeClient`` pointed at this server."""
        import stripe

        return stripe.StripeClient(api_key, base_addresses={"api": self.url}, **options)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
