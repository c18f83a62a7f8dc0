"""The emulator's state and the Python API that creates activity the way Stripe would.

Every creation records the events Stripe would send, with ``created`` from the store's clock (or ``at=``).
Objects live in one dict by id plus per-type key lists sorted by ``(created, seq)`` and a few secondary
indexes (customer, charge, subscription, event type, ...), so a list page costs O(log n + page).
"""

from __future__ import annotations

import bisect
import calendar
import fnmatch
import heapq
import json
import random
import string
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, TypeVar, overload

from .clock import Clock, Instant, to_timestamp
from .faults import Faults
from .records import (
    BalanceTransaction,
    Charge,
    CheckoutSession,
    CreditNote,
    CreditNoteLine,
    Customer,
    Dispute,
    Event,
    Invoice,
    InvoiceLine,
    InvoicePayment,
    LineItem,
    PaymentIntent,
    Payout,
    Price,
    Product,
    Record,
    Refund,
    Subscription,
    metadata_of,
)
from .render import Renderer

DEFAULT_API_VERSION = "2026-04-22.dahlia"
PRE_BASIL_API_VERSION = "2024-06-20"

R = TypeVar("R", bound=Record)
Key = tuple[int, int, str]

# Fields with a secondary index. Only fields that never change after creation are indexed.
INDEXED_FIELDS: dict[str, tuple[str, ...]] = {
    "product": (),
    "price": ("product",),
    "customer": (),
    "checkout.session": ("customer", "payment_intent", "subscription"),
    "payment_intent": ("customer",),
    "charge": ("customer", "payment_intent"),
    "balance_transaction": ("source", "type"),
    "refund": ("charge", "payment_intent"),
    "subscription": ("customer", "price"),
    "invoice": ("customer", "subscription"),
    "invoice_payment": ("invoice", "payment_intent"),
    "dispute": ("charge", "payment_intent"),
    "credit_note": ("customer", "invoice"),
    "event": ("type",),
    "payout": (),
}

# The catalogue that matches ledger/billing.example.toml, so the demo's prices exist out of the box.
DEFAULT_CATALOG: tuple[dict[str, Any], ...] = (
    {"id": "price_credits_small", "product": "prod_credits", "unit_amount": 1000, "nickname": "1,000 credits"},
    {"id": "price_credits_large", "product": "prod_credits", "unit_amount": 10000, "nickname": "12,000 credits"},
    {"id": "price_pro_monthly", "product": "prod_pro", "unit_amount": 2000, "interval": "month", "nickname": "Pro"},
    {"id": "price_team_monthly", "product": "prod_team", "unit_amount": 9900, "interval": "month", "nickname": "Team"},
)
_PRODUCT_NAMES = {"prod_credits": "AI credits", "prod_pro": "Pro plan", "prod_team": "Team plan"}

_ALPHABET = string.digits + string.ascii_letters
# Maps every byte to an id character, so random bytes become an id tail in one C call.
_ID_CHARS = bytes((_ALPHABET * 5)[:256], "ascii")
_ENDED = ("canceled", "incomplete_expired", "incomplete")


class EmulatorError(Exception):
    """A request Stripe would refuse; the server turns it into Stripe's error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param


class NotFound(EmulatorError):
    """No such object."""

    def __init__(self, kind: str, object_id: str, *, param: str = "id") -> None:
        super().__init__(f"No such {kind}: '{object_id}'", status=404, code="resource_missing", param=param)


# Stripe's zero- and three-decimal currencies (https://docs.stripe.com/currencies), for converted amounts.
_ZERO_DECIMAL = frozenset(
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"]
)
_THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


def _exponent(currency: str) -> int:
    code = currency.lower()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def add_months(ts: int, months: int, anchor_day: int | None = None) -> int:
    """``ts`` plus whole calendar months, keeping the billing anchor's day (clamped to the month's end)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(anchor_day or moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


class Store:
    """All emulated Stripe state, safe to use from the server's threads and the test's thread at once."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        api_version: str = DEFAULT_API_VERSION,
        seed: int | None = None,
        catalog: Iterable[Mapping[str, Any]] | None = DEFAULT_CATALOG,
        record_events: bool = True,
        events_retention_days: int | None = 30,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock or Clock()
        self.api_version = api_version
        # Answer API calls at the request's Stripe-Version (as Stripe does) or always at ``api_version``.
        self.honour_request_version = True
        self.record_events = record_events
        self.events_retention_days = events_retention_days
        self.faults = Faults(seed)
        self._rng = random.Random(seed)
        self._seq = 0
        self._objects: dict[str, Record] = {}
        self._keys: dict[str, list[Key]] = {name: [] for name in INDEXED_FIELDS}
        self._index: dict[tuple[str, str, Any], list[Key]] = {}
        self._invoice_numbers: dict[str, int] = {}
        # Customers whose card declines every charge (like attaching Stripe's test card 4000000000000341).
        self._declining: set[str] = set()
        # The account's settlement currency, and the rates (settlement major units per presentment major unit)
        # at which charges in other currencies are converted into it, as Stripe does on the balance transaction.
        # https://docs.stripe.com/currencies/conversions
        self.settlement_currency = "usd"
        self.exchange_rates: dict[str, Decimal] = {}
        self._renderers: dict[str, Renderer] = {}
        self.event_listeners: list[Callable[[Event], None]] = []
        # The API request being served (its id and idempotency key), named by the events it causes.
        self.current_request: tuple[str, str | None] | None = None
        for entry in catalog or ():
            self._seed_price(entry)

    # --- ids, time, bookkeeping --------------------------------------------------------------------------

    def new_id(self, prefix: str, length: int = 24) -> str:
        """A fresh Stripe-looking id (``ch_1...``), unique in this store and reproducible from the seed."""
        self._seq += 1
        n, counter = self._seq, ""
        while n:
            n, digit = divmod(n, 62)
            counter = _ALPHABET[digit] + counter
        tail = self._rng.randbytes(max(length - max(len(counter), 6) - 1, 6)).translate(_ID_CHARS).decode()
        return f"{prefix}_1{counter.rjust(6, '0')}{tail}"

    def _at(self, at: Instant | None) -> int:
        return self.clock.now() if at is None else to_timestamp(at)

    def _add(self, record: R) -> R:
        name = record.object_name
        if record.id in self._objects:
            raise EmulatorError(f"An object with id '{record.id}' already exists", code="resource_already_exists")
        self._seq += 1
        record.seq = self._seq
        self._objects[record.id] = record
        key: Key = (record.created, record.seq, record.id)
        _insert(self._keys[name], key)
        for field in INDEXED_FIELDS[name]:
            value = getattr(record, field)
            if value is not None:
                _insert(self._index.setdefault((name, field, value), []), key)
        return record

    def _emit(self, type_: str, obj: Record, at: int, prev: Record | None = None) -> None:
        if not self.record_events:
            return
        event = Event(
            id=self.new_id("evt"),
            created=at,
            seq=0,
            type=type_,
            api_version=self.api_version,
            obj=snapshot(obj),
            prev=prev,
            request_id=self.current_request[0] if self.current_request else None,
            idempotency_key=self.current_request[1] if self.current_request else None,
        )
        self._add(event)
        for listener in self.event_listeners:
            listener(event)

    def _set_indexed(self, record: Record, field: str, value: Any) -> None:
        """Set a field that list filters index (a session's payment intent, say), keeping the index in step."""
        key: Key = (record.created, record.seq, record.id)
        old = getattr(record, field)
        if old is not None:
            _remove(self._index[(record.object_name, field, old)], key)
        setattr(record, field, value)
        if value is not None:
            _insert(self._index.setdefault((record.object_name, field, value), []), key)

    def renderer(self, api_version: str | None = None) -> Renderer:
        """The renderer for ``api_version`` (default: the store's)."""
        version = api_version or self.api_version
        renderer = self._renderers.get(version)
        if renderer is None:
            renderer = self._renderers[version] = Renderer(self, version)
        return renderer

    # --- reading -----------------------------------------------------------------------------------------

    def peek(self, object_id: str | None) -> Record | None:
        """The record with this id, or None."""
        return self._objects.get(object_id) if object_id else None

    def get(self, object_id: str, kind: type[R] | None = None) -> Any:
        """The record with this id (of type ``kind`` if given); raise NotFound."""
        record = self._objects.get(object_id)
        if record is None or (kind is not None and not isinstance(record, kind)):
            name = kind.object_name if kind is not None else "object"
            raise NotFound(name.replace("_", " ").replace(".", " "), object_id)
        return record

    def render(self, obj: Record | str, api_version: str | None = None) -> dict[str, Any]:
        """The Stripe JSON of an object (or id) at ``api_version`` (default: the store's)."""
        with self.lock:
            record = self.get(obj) if isinstance(obj, str) else obj
            return self.renderer(api_version).render(record)

    def count(self, object_name: str) -> int:
        """How many objects of a type (``charge``, ``event``, ...) the store holds."""
        return len(self._keys[object_name])

    def iter_records(self, object_name: str) -> Iterator[Record]:
        """Records of one type, oldest first (a snapshot of the keys, safe while others write)."""
        with self.lock:
            keys = list(self._keys[object_name])
        for _, _, object_id in keys:
            record = self._objects.get(object_id)
            if record is not None:
                yield record

    def charges_of_payment_intent(self, payment_intent_id: str) -> list[Charge]:
        """A payment intent's charges, newest first."""
        keys = self._index.get(("charge", "payment_intent", payment_intent_id), [])
        return [c for k in reversed(keys) if isinstance(c := self._objects.get(k[2]), Charge)]

    def invoice_payments_of(self, invoice_id: str) -> list[InvoicePayment]:
        keys = self._index.get(("invoice_payment", "invoice", invoice_id), [])
        return [p for k in reversed(keys) if isinstance(p := self._objects.get(k[2]), InvoicePayment)]

    def list_page(
        self,
        object_name: str,
        *,
        limit: int = 10,
        starting_after: str | None = None,
        ending_before: str | None = None,
        created: Mapping[str, int] | int | None = None,
        filters: Mapping[str, Any] | None = None,
        any_of: tuple[str, Iterable[Any]] | None = None,
        predicate: Callable[[Record], bool] | None = None,
    ) -> tuple[list[Record], bool]:
        """One page of a list, newest first, and whether there is more in the paging direction.

        ``filters`` are equality filters (indexed ones narrow the scan); ``any_of=(field, values)`` matches
        any of several values of an indexed field (events' ``types[]``); ``created`` takes Stripe's
        ``gt/gte/lt/lte`` operators or an exact timestamp.
        """
        with self.lock:
            indexed = INDEXED_FIELDS[object_name]
            filters = dict(filters or {})
            sources: list[list[Key]] = []
            if any_of is not None:
                field, values = any_of
                sources = [self._index.get((object_name, field, v), []) for v in dict.fromkeys(values)]
            else:
                chosen = next((f for f in filters if f in indexed), None)
                if chosen is not None:
                    sources = [self._index.get((object_name, chosen, filters.pop(chosen)), [])]
                else:
                    sources = [self._keys[object_name]]
            lo: tuple[int, int] = (-(2**62), -1)
            hi: tuple[int, int] = (2**62, -1)  # exclusive
            if isinstance(created, int):
                lo, hi = (created, -1), (created + 1, -1)
            elif created:
                for op, value in created.items():
                    bound = int(value)
                    if op == "gte":
                        lo = max(lo, (bound, -1))
                    elif op == "gt":
                        lo = max(lo, (bound + 1, -1))
                    elif op == "lte":
                        hi = min(hi, (bound + 1, -1))
                    elif op == "lt":
                        hi = min(hi, (bound, -1))
                    else:
                        raise EmulatorError(f"Invalid created filter: created[{op}]", param=f"created[{op}]")
            if object_name == "event" and self.events_retention_days is not None:
                lo = max(lo, (self.clock.now() - self.events_retention_days * 86400, -1))
            forward = ending_before is not None and starting_after is None
            if starting_after is not None:
                cursor = self._cursor(object_name, starting_after, "starting_after")
                hi = min(hi, (cursor.created, cursor.seq))
            elif ending_before is not None:
                cursor = self._cursor(object_name, ending_before, "ending_before")
                lo = max(lo, (cursor.created, cursor.seq + 1))

            def matches(record: Record) -> bool:
                for field, value in filters.items():
                    if getattr(record, field, None) != value:
                        return False
                return predicate is None or predicate(record)

            iterators = [_scan(keys, lo, hi, forward) for keys in sources]
            merged: Iterable[Key] = (
                iterators[0] if len(iterators) == 1 else heapq.merge(*iterators, reverse=not forward)
            )
            page: list[Record] = []
            for key in merged:
                record = self._objects.get(key[2])
                if record is None or not matches(record):
                    continue
                if len(page) == limit:
                    return (list(reversed(page)) if forward else page), True
                page.append(record)
            return (list(reversed(page)) if forward else page), False

    def _cursor(self, object_name: str, object_id: str, param: str) -> Record:
        record = self._objects.get(object_id)
        if record is None or record.object_name != object_name:
            raise NotFound(object_name.replace("_", " "), object_id, param=param)
        return record

    # --- catalogue ---------------------------------------------------------------------------------------

    def _seed_price(self, entry: Mapping[str, Any]) -> None:
        product_id = entry.get("product") or self.new_id("prod", 14)
        if product_id not in self._objects:
            self.create_product(_PRODUCT_NAMES.get(product_id, product_id), id=product_id, at=entry.get("at"))
        self.create_price(
            unit_amount=int(entry["unit_amount"]),
            currency=entry.get("currency", "usd"),
            interval=entry.get("interval"),
            product=product_id,
            id=entry.get("id"),
            lookup_key=entry.get("lookup_key", entry.get("id")),
            nickname=entry.get("nickname"),
            at=entry.get("at"),
        )

    def create_product(self, name: str, *, id: str | None = None, at: Instant | None = None) -> Product:
        """Create a product (no event recorded for catalogue objects)."""
        with self.lock:
            return self._add(Product(id or self.new_id("prod", 14), self._at(at), 0, name=name))

    def create_price(
        self,
        *,
        unit_amount: int,
        currency: str = "usd",
        interval: str | None = None,
        product: str | None = None,
        id: str | None = None,
        lookup_key: str | None = None,
        nickname: str | None = None,
        at: Instant | None = None,
    ) -> Price:
        """Create a price (one-time unless ``interval`` is ``month``/``year``)."""
        with self.lock:
            if product is None:
                product = self.create_product(nickname or "Product", at=at).id
            price = Price(
                id or self.new_id("price"),
                self._at(at),
                0,
                product=product,
                unit_amount=unit_amount,
                currency=currency,
                interval=interval,
                lookup_key=lookup_key,
                nickname=nickname,
            )
            return self._add(price)

    def resolve_price(self, price: str) -> Price:
        """A price by id or lookup key."""
        record = self._objects.get(price)
        if isinstance(record, Price):
            return record
        for key in self._keys["price"]:
            candidate = self._objects[key[2]]
            if isinstance(candidate, Price) and candidate.lookup_key == price:
                return candidate
        raise NotFound("price", price, param="price")

    # --- customers ---------------------------------------------------------------------------------------

    def create_customer(
        self,
        *,
        email: str | None = None,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        id: str | None = None,
        at: Instant | None = None,
    ) -> Customer:
        """Create a customer; records ``customer.created``."""
        with self.lock:
            ts = self._at(at)
            customer = self._add(
                Customer(
                    id or self.new_id("cus", 14),
                    ts,
                    0,
                    email=email,
                    name=name,
                    description=description,
                    metadata=metadata_of(metadata),
                )
            )
            self._emit("customer.created", customer, ts)
            return customer

    def set_card_declines(self, customer: Customer | str, declines: bool = True) -> None:
        """From now on every charge to this customer's card is declined (or succeeds again)."""
        with self.lock:
            customer_id = self._customer(customer).id
            if declines:
                self._declining.add(customer_id)
            else:
                self._declining.discard(customer_id)

    def _customer(self, customer: Customer | str) -> Customer:
        record: Customer = self.get(customer if isinstance(customer, str) else customer.id, Customer)
        return record

    # --- payments ----------------------------------------------------------------------------------------

    def _pay(
        self,
        customer: str | None,
        amount: int,
        currency: str,
        at: int,
        *,
        description: str | None,
        invoice: str | None = None,
        metadata: Mapping[str, str] | None = None,
        fail: bool = False,
        pending: bool = False,
        payment_intent: PaymentIntent | None = None,
    ) -> tuple[PaymentIntent, Charge]:
        """One payment attempt: payment intent (new or retried), charge, and balance transaction. It fails when
        asked to or when the customer's card declines (``set_card_declines``).

        ``pending=True`` is a delayed-notification method (bank debit): the charge stays ``pending`` until
        ``_settle`` decides it.
        """
        fail = fail or (customer is not None and customer in self._declining)
        if payment_intent is None:
            payment_intent = self._add(
                PaymentIntent(
                    self.new_id("pi"),
                    at,
                    0,
                    customer=customer,
                    amount=amount,
                    currency=currency,
                    invoice=invoice,
                    description=description,
                    metadata=metadata_of(metadata),
                    payment_method="pm_usBankAccount_success" if pending else "pm_card_visa",
                )
            )
            self._emit("payment_intent.created", payment_intent, at)
        charge = self._add(
            Charge(
                self.new_id("py" if pending else "ch"),
                at,
                0,
                customer=customer,
                amount=amount,
                currency=currency,
                payment_intent=payment_intent.id,
                invoice=invoice,
                description=description,
                metadata=metadata_of(metadata),
                payment_method=payment_intent.payment_method,
            )
        )
        payment_intent.latest_charge = charge.id
        if pending and not fail:
            charge.status, charge.paid = "pending", False
            payment_intent.status = "processing"
            self._emit("payment_intent.processing", payment_intent, at)
            self._emit("charge.pending", charge, at)
            return payment_intent, charge
        self._settle(payment_intent, charge, at, succeeded=not fail)
        return payment_intent, charge

    def set_exchange_rate(self, currency: str, rate: Decimal | str) -> None:
        """Charges in ``currency`` settle in the account's settlement currency at ``rate`` (major per major)."""
        self.exchange_rates[currency.lower()] = Decimal(rate)

    def _converted(self, amount: int, currency: str) -> tuple[int, str, Decimal | None]:
        """(amount, currency, exchange_rate) of the balance transaction for ``amount`` charged in ``currency``.

        Stripe's rule: amount in currency A times exchange_rate is the amount in currency B, in major units;
        the result is rounded to B's minor unit. A currency without a set rate settles as itself.
        """
        rate = self.exchange_rates.get(currency.lower())
        if rate is None or currency.lower() == self.settlement_currency:
            return amount, currency, None
        major = Decimal(amount).scaleb(-_exponent(currency)) * rate
        settled = int(major.scaleb(_exponent(self.settlement_currency)).to_integral_value(rounding=ROUND_HALF_EVEN))
        return settled, self.settlement_currency, rate

    def _settle(self, payment_intent: PaymentIntent, charge: Charge, at: int, *, succeeded: bool) -> None:
        if not succeeded:
            charge.status, charge.paid = "failed", False
            charge.failure_code, charge.failure_message = "card_declined", "Your card was declined."
            payment_intent.status = "requires_payment_method"
            payment_intent.last_payment_error = {
                "charge": charge.id,
                "code": "card_declined",
                "decline_code": "generic_decline",
                "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                "message": "Your card was declined.",
                "type": "card_error",
            }
            self._emit("charge.failed", charge, at)
            self._emit("payment_intent.payment_failed", payment_intent, at)
            return
        settled, settlement_currency, rate = self._converted(charge.amount, charge.currency)
        txn = self._add(
            BalanceTransaction(
                self.new_id("txn"),
                at,
                0,
                amount=settled,
                fee=round(settled * 0.029) + 30 if settled else 0,
                currency=settlement_currency,
                exchange_rate=rate,
                type="charge",
                reporting_category="charge",
                source=charge.id,
                description=charge.description,
                available_on=at + 2 * 86400,
            )
        )
        charge.status, charge.paid = "succeeded", True
        charge.amount_captured = charge.amount
        charge.balance_transaction = txn.id
        payment_intent.status = "succeeded"
        payment_intent.amount_received = charge.amount
        payment_intent.last_payment_error = None
        self._emit("charge.succeeded", charge, at)
        self._emit("payment_intent.succeeded", payment_intent, at)

    def create_checkout_session(
        self,
        customer: Customer | str | None,
        price: str = "price_credits_small",
        *,
        quantity: int = 1,
        mode: str | None = None,
        metadata: Mapping[str, str] | None = None,
        client_reference_id: str | None = None,
        customer_email: str | None = None,
        success_url: str | None = "https://example.com/success",
        at: Instant | None = None,
    ) -> CheckoutSession:
        """Create an open checkout session for one price (no event: Stripe sends none until it completes)."""
        with self.lock:
            ts = self._at(at)
            price_record = self.resolve_price(price)
            if quantity < 1:
                raise EmulatorError("Quantity must be at least 1", param="line_items[0][quantity]")
            mode = mode or ("subscription" if price_record.interval else "payment")
            amount = price_record.unit_amount * quantity
            product = self.peek(price_record.product)
            line = LineItem(
                self.new_id("li"),
                price_record.id,
                quantity,
                amount,
                amount,
                price_record.currency,
                product.name if isinstance(product, Product) else (price_record.nickname or ""),
            )
            customer_id = self._customer(customer).id if customer is not None else None
            session = CheckoutSession(
                "cs_test_a" + self.new_id("a1", 58)[3:],
                ts,
                0,
                customer=customer_id,
                mode=mode,
                currency=price_record.currency,
                amount_subtotal=amount,
                amount_total=amount,
                line_items=(line,),
                client_reference_id=client_reference_id,
                customer_email=customer_email,
                metadata=metadata_of(metadata),
                expires_at=ts + 86400,
                success_url=success_url,
            )
            return self._add(session)

    def complete_checkout_session(
        self,
        session: CheckoutSession | str,
        *,
        fail: bool = False,
        async_payment: bool = False,
        at: Instant | None = None,
    ) -> CheckoutSession:
        """Pay an open checkout session: payment intent, charge, balance transaction (and for
        ``mode=subscription`` the subscription and its first invoice); records the events, ending with
        ``checkout.session.completed``. With ``fail=True`` the card is declined and the session stays open.
        With ``async_payment=True`` (a bank debit, mode=payment) the session completes ``unpaid`` and
        ``settle_async_payment`` later decides it."""
        with self.lock:
            record: CheckoutSession = self.get(session if isinstance(session, str) else session.id, CheckoutSession)
            if record.status != "open":
                raise EmulatorError(f"This Checkout Session is {record.status}.", code="checkout_session_not_open")
            ts = self._at(at)
            if record.customer is None:
                self._set_indexed(record, "customer", self.create_customer(email=record.customer_email, at=ts).id)
            line = record.line_items[0]
            if record.mode == "subscription":
                subscription = self._start_subscription(
                    record.customer, line.price, line.quantity, ts, metadata=record.metadata, fail=fail
                )
                if subscription.status == "incomplete":
                    return record
                self._set_indexed(record, "subscription", subscription.id)
                record.invoice = subscription.latest_invoice
            else:
                pi, charge = self._pay(
                    record.customer,
                    record.amount_total,
                    record.currency,
                    ts,
                    description=line.description,
                    metadata=record.metadata,
                    fail=fail,
                    pending=async_payment,
                )
                self._set_indexed(record, "payment_intent", pi.id)
                if charge.status == "failed":
                    return record
            record.status, record.payment_status = "complete", "unpaid" if async_payment else "paid"
            self._emit("checkout.session.completed", record, ts)
            return record

    def settle_async_payment(
        self, session: CheckoutSession | str, *, succeeded: bool = True, at: Instant | None = None
    ) -> CheckoutSession:
        """Decide a delayed payment: records ``charge.succeeded``/``payment_intent.succeeded`` and
        ``checkout.session.async_payment_succeeded``, or the failures and ``..._async_payment_failed``."""
        with self.lock:
            record: CheckoutSession = self.get(session if isinstance(session, str) else session.id, CheckoutSession)
            pi = self.peek(record.payment_intent)
            charge = self.peek(pi.latest_charge) if isinstance(pi, PaymentIntent) else None
            if not isinstance(pi, PaymentIntent) or not isinstance(charge, Charge) or charge.status != "pending":
                raise EmulatorError(f"Checkout Session {record.id} has no pending payment.")
            ts = self._at(at)
            self._settle(pi, charge, ts, succeeded=succeeded)
            if succeeded:
                record.payment_status = "paid"
                self._emit("checkout.session.async_payment_succeeded", record, ts)
            else:
                self._emit("checkout.session.async_payment_failed", record, ts)
            return record

    def expire_checkout_session(self, session: CheckoutSession | str, *, at: Instant | None = None) -> CheckoutSession:
        """Expire an open session; records ``checkout.session.expired``."""
        with self.lock:
            record: CheckoutSession = self.get(session if isinstance(session, str) else session.id, CheckoutSession)
            if record.status != "open":
                raise EmulatorError(f"This Checkout Session is {record.status}.", code="checkout_session_not_open")
            record.status = "expired"
            self._emit("checkout.session.expired", record, self._at(at))
            return record

    def topup(
        self,
        customer: Customer | str,
        price: str = "price_credits_small",
        *,
        quantity: int = 1,
        metadata: Mapping[str, str] | None = None,
        client_reference_id: str | None = None,
        async_payment: bool = False,
        at: Instant | None = None,
    ) -> CheckoutSession:
        """A paid one-off checkout (mode=payment) for ``price``: session, payment intent, charge, balance
        transaction, and the events ``payment_intent.created``, ``charge.succeeded``,
        ``payment_intent.succeeded``, ``checkout.session.completed``."""
        with self.lock:
            session = self.create_checkout_session(
                customer,
                price,
                quantity=quantity,
                mode="payment",
                metadata=metadata,
                client_reference_id=client_reference_id,
                at=at,
            )
            return self.complete_checkout_session(session, async_payment=async_payment, at=at)

    def create_payment(
        self,
        customer: Customer | str | None,
        amount: int,
        *,
        currency: str = "usd",
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        fail: bool = False,
        at: Instant | None = None,
    ) -> Charge:
        """A direct payment (payment intent + charge), outside checkout; ``fail=True`` declines the card."""
        with self.lock:
            customer_id = self._customer(customer).id if customer is not None else None
            _, charge = self._pay(
                customer_id, amount, currency, self._at(at), description=description, metadata=metadata, fail=fail
            )
            return charge

    def create_charge(
        self,
        customer: Customer | str | None,
        amount: int,
        *,
        currency: str = "usd",
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        at: Instant | None = None,
    ) -> Charge:
        """A charge made with the older Charges API (``POST /v1/charges`` with a card source): no payment intent.
        Records ``charge.succeeded`` and its balance transaction."""
        with self.lock:
            customer_id = self._customer(customer).id if customer is not None else None
            ts = self._at(at)
            charge = self._add(
                Charge(
                    self.new_id("ch"),
                    ts,
                    0,
                    customer=customer_id,
                    amount=amount,
                    amount_captured=amount,
                    currency=currency,
                    description=description,
                    metadata=metadata_of(metadata),
                    payment_method="card_visa",
                )
            )
            settled, settlement_currency, rate = self._converted(amount, currency)
            txn = self._add(
                BalanceTransaction(
                    self.new_id("txn"),
                    ts,
                    0,
                    amount=settled,
                    fee=round(settled * 0.029) + 30 if settled else 0,
                    currency=settlement_currency,
                    exchange_rate=rate,
                    source=charge.id,
                    description=description,
                    available_on=ts + 2 * 86400,
                )
            )
            charge.balance_transaction = txn.id
            self._emit("charge.succeeded", charge, ts)
            return charge

    # --- payouts -----------------------------------------------------------------------------------------

    def create_payout(self, *, at: Instant | None = None) -> Payout:
        """Pay out every balance transaction not yet paid out (an automatic payout): the payout's amount is the
        sum of their nets, and ``GET /v1/balance_transactions?payout=`` lists them. Records ``payout.created``
        and ``payout.paid``."""
        with self.lock:
            ts = self._at(at)
            pending = [
                t
                for t in (self._objects[k[2]] for k in self._keys["balance_transaction"])
                if isinstance(t, BalanceTransaction) and t.payout is None and t.type != "payout"
            ]
            net = sum(t.amount - t.fee for t in pending)
            payout_id = self.new_id("po")
            txn = self._add(
                BalanceTransaction(
                    self.new_id("txn"),
                    ts,
                    0,
                    amount=-net,
                    currency=self.settlement_currency,
                    type="payout",
                    reporting_category="payout",
                    source=payout_id,
                    description="STRIPE PAYOUT",
                    available_on=ts,
                    payout=payout_id,
                )
            )
            payout = self._add(
                Payout(
                    payout_id,
                    ts,
                    0,
                    amount=net,
                    currency=self.settlement_currency,
                    arrival_date=ts + 86400,
                    balance_transaction=txn.id,
                )
            )
            for t in pending:
                t.payout = payout.id
            self._emit("payout.created", payout, ts)
            self._emit("payout.paid", payout, ts)
            return payout

    # --- subscriptions -----------------------------------------------------------------------------------

    def create_subscription(
        self,
        customer: Customer | str,
        price: str = "price_pro_monthly",
        *,
        quantity: int = 1,
        metadata: Mapping[str, str] | None = None,
        via_checkout: bool = False,
        trial_days: int | None = None,
        at: Instant | None = None,
    ) -> Subscription:
        """Start a subscription whose first invoice is paid at once (``billing_reason=subscription_create``).

        Records ``customer.subscription.created``, ``invoice.created``, ``invoice.finalized``, the payment's
        events, ``invoice.paid`` and ``invoice.payment_succeeded`` (and ``checkout.session.completed`` first
        through checkout with ``via_checkout=True``).
        """
        with self.lock:
            if via_checkout:
                session = self.create_checkout_session(
                    customer, price, quantity=quantity, mode="subscription", metadata=metadata, at=at
                )
                session = self.complete_checkout_session(session, at=at)
                return self.get(session.subscription or "", Subscription)
            return self._start_subscription(
                self._customer(customer).id, price, quantity, self._at(at), metadata, trial_days=trial_days
            )

    def _start_subscription(
        self,
        customer_id: str,
        price: str,
        quantity: int,
        ts: int,
        metadata: Mapping[str, str] | None = None,
        *,
        fail: bool = False,
        trial_days: int | None = None,
    ) -> Subscription:
        fail = fail or customer_id in self._declining
        price_record = self.resolve_price(price)
        if not price_record.interval:
            raise EmulatorError(
                "The price specified is set to `type=one_time` but this field only accepts prices with "
                "`type=recurring`.",
                param="items[0][price]",
            )
        sub = Subscription(
            self.new_id("sub"),
            ts,
            0,
            customer=customer_id,
            status="trialing" if trial_days else "incomplete" if fail else "active",
            price=price_record.id,
            quantity=quantity,
            item_id=self.new_id("si", 14),
            current_period_start=ts,
            # A trial is the first period; the billing anchor moves to its end (as Stripe does).
            current_period_end=ts + trial_days * 86400 if trial_days else self._period_end(price_record, ts, ts),
            billing_cycle_anchor=ts + trial_days * 86400 if trial_days else ts,
            trial_start=ts if trial_days else None,
            trial_end=ts + trial_days * 86400 if trial_days else None,
            currency=price_record.currency,
            metadata=metadata_of(metadata),
        )
        self._add(sub)
        invoice = self._new_invoice(
            sub, "subscription_create", ts, sub.current_period_start, sub.current_period_end, free=bool(trial_days)
        )
        sub.latest_invoice = invoice.id
        self._emit("customer.subscription.created", sub, ts)
        self._emit("invoice.created", invoice, ts)
        self._attempt_invoice(invoice, ts, fail=fail and not trial_days, first=True)
        return sub

    def _period_end(self, price: Price, start: int, anchor: int) -> int:
        anchor_day = datetime.fromtimestamp(anchor, tz=UTC).day
        if price.interval == "year":
            return add_months(start, 12 * price.interval_count, anchor_day)
        if price.interval == "week":
            return start + 7 * 86400 * price.interval_count
        if price.interval == "day":
            return start + 86400 * price.interval_count
        return add_months(start, price.interval_count, anchor_day)

    def _new_invoice(
        self, sub: Subscription, reason: str, ts: int, period_start: int, period_end: int, *, free: bool = False
    ) -> Invoice:
        price = self.resolve_price(sub.price)
        customer = self._customer(sub.customer)
        amount = 0 if free else price.unit_amount * sub.quantity
        invoice_id = self.new_id("in")
        product = self.peek(price.product)
        label = product.name if isinstance(product, Product) else price.id
        line = InvoiceLine(
            self.new_id("il"),
            amount,
            price.currency,
            f"Trial period for {label}"
            if free
            else f"{sub.quantity} × {label} (at ${price.unit_amount / 100:.2f} / {price.interval})",
            price.id,
            sub.quantity,
            period_start,
            period_end,
            sub.id,
            sub.item_id,
        )
        # An invoice's own period is the one just ended (for a renewal, the previous one), as Stripe shows it.
        invoice = Invoice(
            invoice_id,
            ts,
            0,
            customer=sub.customer,
            subscription=sub.id,
            status="draft",
            billing_reason=reason,
            amount_due=amount,
            amount_remaining=amount,
            currency=price.currency,
            total=amount,
            lines=(line,),
            period_start=ts if reason == "subscription_create" else sub.current_period_start,
            period_end=ts if reason == "subscription_create" else sub.current_period_end,
            customer_email=customer.email,
            customer_name=customer.name,
        )
        return self._add(invoice)

    def _attempt_invoice(self, invoice: Invoice, ts: int, *, fail: bool, first: bool) -> None:
        """Finalize (on the first attempt) and try to pay an invoice, recording what Stripe records."""
        if first:
            prefix = invoice.customer[-8:].upper()
            number = self._invoice_numbers.get(invoice.customer, 0) + 1
            self._invoice_numbers[invoice.customer] = number
            invoice.number = f"{prefix}-{number:04d}"
            invoice.status, invoice.finalized_at = "open", ts
            self._emit("invoice.finalized", invoice, ts)
        if invoice.amount_remaining == 0:
            # Nothing to collect (a trial's invoice): paid at once, with no payment.
            invoice.status, invoice.paid_at = "paid", ts
            self._emit("invoice.paid", invoice, ts)
            self._emit("invoice.payment_succeeded", invoice, ts)
            return
        existing = self.peek(invoice.payment_intent)
        pi, charge = self._pay(
            invoice.customer,
            invoice.amount_remaining,
            invoice.currency,
            ts,
            description="Subscription creation"
            if invoice.billing_reason == "subscription_create"
            else "Subscription update",
            invoice=invoice.id,
            fail=fail,
            payment_intent=existing if isinstance(existing, PaymentIntent) else None,
        )
        invoice.payment_intent, invoice.charge = pi.id, charge.id
        fail = charge.status == "failed"
        invoice.attempt_count += 1
        invoice.attempted = True
        payment = next((p for p in self.invoice_payments_of(invoice.id) if p.payment_intent == pi.id), None)
        if payment is None:
            payment = self._add(
                InvoicePayment(
                    self.new_id("inpay"),
                    ts,
                    0,
                    invoice=invoice.id,
                    payment_intent=pi.id,
                    amount_requested=invoice.amount_remaining,
                    currency=invoice.currency,
                )
            )
        sub = self.peek(invoice.subscription)
        if fail:
            invoice.next_payment_attempt = ts + 3 * 86400 if invoice.attempt_count < 4 else None
            self._emit("invoice.payment_failed", invoice, ts)
            if isinstance(sub, Subscription) and sub.status == "active":
                before = snapshot(sub)
                sub.status = "past_due"
                self._emit("customer.subscription.updated", sub, ts, prev=before)
            return
        payment.status, payment.amount_paid, payment.paid_at = "paid", invoice.amount_remaining, ts
        self._emit("invoice_payment.paid", payment, ts)
        invoice.amount_paid += invoice.amount_remaining
        invoice.amount_remaining = 0
        invoice.status, invoice.paid_at, invoice.next_payment_attempt = "paid", ts, None
        self._emit("invoice.paid", invoice, ts)
        self._emit("invoice.payment_succeeded", invoice, ts)
        if isinstance(sub, Subscription) and sub.status in ("past_due", "unpaid", "incomplete"):
            before = snapshot(sub)
            sub.status = "active"
            self._emit("customer.subscription.updated", sub, ts, prev=before)

    def _subscription(self, subscription: Subscription | str) -> Subscription:
        record: Subscription = self.get(
            subscription if isinstance(subscription, str) else subscription.id, Subscription
        )
        return record

    def renew_subscription(
        self, subscription: Subscription | str, *, fail: bool = False, at: Instant | None = None
    ) -> Invoice | None:
        """Bill the next period (``billing_reason=subscription_cycle``) at the period's end (or ``at``).

        Success records ``invoice.created``, ``customer.subscription.updated`` (new period), ``invoice.finalized``,
        the payment's events, ``invoice.paid``, ``invoice.payment_succeeded``. ``fail=True`` records
        ``charge.failed``, ``payment_intent.payment_failed``, ``invoice.payment_failed`` and the subscription
        turning ``past_due``. A subscription set to cancel at period end ends instead (returns None).
        """
        with self.lock:
            sub = self._subscription(subscription)
            if sub.status in ("canceled", "incomplete_expired"):
                raise EmulatorError("This subscription is canceled.", code="subscription_canceled")
            if at is None:
                # Stripe bills a renewal when the period ends: the clock jumps there if it is behind.
                if self.clock.now() < sub.current_period_end:
                    self.clock.set(sub.current_period_end)
                ts = self.clock.now()
            else:
                ts = to_timestamp(at)
            if sub.cancel_at_period_end:
                self._end_subscription(sub, ts, reason="cancellation_requested")
                return None
            before = snapshot(sub)
            price = self.resolve_price(sub.price)
            if sub.status == "trialing":
                sub.status = "active"  # the trial ends with this renewal, in the same update
            sub.current_period_start = sub.current_period_end
            sub.current_period_end = self._period_end(price, sub.current_period_start, sub.billing_cycle_anchor)
            invoice = self._new_invoice(sub, "subscription_cycle", ts, sub.current_period_start, sub.current_period_end)
            invoice.period_start, invoice.period_end = before.current_period_start, before.current_period_end
            sub.latest_invoice = invoice.id
            self._emit("invoice.created", invoice, ts)
            self._emit("customer.subscription.updated", sub, ts, prev=before)
            self._attempt_invoice(invoice, ts, fail=fail, first=True)
            return invoice

    def advance(
        self,
        seconds: float = 0,
        *,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
        fail: Callable[[Subscription], bool] | Collection[str] | None = None,
    ) -> list[Invoice]:
        """Move the clock forward like a Stripe test clock: every subscription whose period ends on the way is
        renewed at its period end, in time order (or ends, if set to cancel at period end).

        ``fail`` picks the renewals whose payment fails: a predicate, or subscription/customer ids.
        Returns the renewal invoices made.
        """
        with self.lock:
            target = self.clock.now() + int(seconds + minutes * 60 + hours * 3600 + days * 86400)
            failing: set[str] = set()
            if isinstance(fail, str):
                failing = {fail}
            elif isinstance(fail, Collection):
                failing = set(fail)
            predicate = fail if callable(fail) else None

            def fails(sub: Subscription) -> bool:
                if predicate is not None:
                    return predicate(sub)
                return sub.id in failing or sub.customer in failing

            # (when, seq, subscription id, what): renewals, and trial_will_end three days before a trial ends.
            due: list[tuple[int, int, str, str]] = []
            now = self.clock.now()
            for record in self.iter_records("subscription"):
                if isinstance(record, Subscription) and record.status not in _ENDED:
                    due.append((record.current_period_end, record.seq, record.id, "renew"))
                    if record.status == "trialing" and record.trial_end and record.trial_end - 3 * 86400 > now:
                        due.append((record.trial_end - 3 * 86400, record.seq, record.id, "trial_will_end"))
            heapq.heapify(due)
            invoices: list[Invoice] = []
            while due and due[0][0] <= target:
                when, _, sub_id, what = heapq.heappop(due)
                sub = self.peek(sub_id)
                if not isinstance(sub, Subscription) or sub.status in _ENDED:
                    continue
                if what == "trial_will_end":
                    if sub.status == "trialing":
                        self.clock.set(max(when, self.clock.now()))
                        self._emit("customer.subscription.trial_will_end", sub, self.clock.now())
                    continue
                if sub.current_period_end != when:
                    continue
                if self.clock.now() < when:
                    self.clock.set(when)
                invoice = self.renew_subscription(sub, fail=fails(sub))
                if invoice is not None:
                    invoices.append(invoice)
                    heapq.heappush(due, (sub.current_period_end, sub.seq, sub.id, "renew"))
            self.clock.set(max(target, self.clock.now()))
            return invoices

    def retry_invoice(self, invoice: Invoice | str, *, fail: bool = False, at: Instant | None = None) -> Invoice:
        """Retry an open invoice's payment (Smart Retries): success pays it and reactivates the subscription."""
        with self.lock:
            record: Invoice = self.get(invoice if isinstance(invoice, str) else invoice.id, Invoice)
            if record.status != "open":
                raise EmulatorError(f"Invoice is already {record.status}.", code="invoice_not_open")
            self._attempt_invoice(record, self._at(at), fail=fail, first=False)
            return record

    def recover_subscription(self, subscription: Subscription | str, *, at: Instant | None = None) -> Invoice:
        """Pay the subscription's open latest invoice (past_due -> active)."""
        with self.lock:
            sub = self._subscription(subscription)
            return self.retry_invoice(sub.latest_invoice or "", at=at)

    def mark_subscription_unpaid(self, subscription: Subscription | str, *, at: Instant | None = None) -> Subscription:
        """Retries exhausted: past_due -> unpaid; records ``customer.subscription.updated``."""
        with self.lock:
            sub = self._subscription(subscription)
            before = snapshot(sub)
            sub.status = "unpaid"
            self._emit("customer.subscription.updated", sub, self._at(at), prev=before)
            return sub

    def cancel_subscription(
        self,
        subscription: Subscription | str,
        *,
        at_period_end: bool = False,
        reason: str = "cancellation_requested",
        at: Instant | None = None,
    ) -> Subscription:
        """Cancel now (``customer.subscription.deleted``) or at period end (``customer.subscription.updated``)."""
        with self.lock:
            sub = self._subscription(subscription)
            if sub.status == "canceled":
                raise EmulatorError("This subscription is already canceled.", code="subscription_canceled")
            ts = self._at(at)
            if at_period_end:
                before = snapshot(sub)
                sub.cancel_at_period_end, sub.cancel_at, sub.canceled_at = True, sub.current_period_end, ts
                sub.cancellation_reason = reason
                self._emit("customer.subscription.updated", sub, ts, prev=before)
                return sub
            self._end_subscription(sub, ts, reason=reason)
            return sub

    def change_subscription(
        self,
        subscription: Subscription | str,
        *,
        price: str | None = None,
        quantity: int | None = None,
        proration_behavior: str = "always_invoice",
        fail: bool = False,
        at: Instant | None = None,
    ) -> Invoice | None:
        """Change the item's price or quantity in the middle of the period, as Stripe prorates it.

        Records ``customer.subscription.updated`` (``previous_attributes`` with the old ``items``, and
        ``latest_invoice`` when invoiced). ``always_invoice`` bills the proration at once: an invoice with
        ``billing_reason=subscription_update`` and two proration lines, "Unused time on" the old item (negative)
        and "Remaining time on" the new one, each ``unit_amount x quantity x seconds left / period seconds``
        (https://docs.stripe.com/billing/subscriptions/prorations), then its payment's events. With
        ``create_prorations`` or ``none`` nothing is invoiced now (pending proration items are not modelled).
        """
        with self.lock:
            sub = self._subscription(subscription)
            if sub.status in _ENDED:
                raise EmulatorError("This subscription is canceled.", code="subscription_canceled")
            if proration_behavior not in ("always_invoice", "create_prorations", "none"):
                raise EmulatorError(f"Invalid proration_behavior: {proration_behavior}", param="proration_behavior")
            ts = self._at(at)
            before = snapshot(sub)
            old_price = self.resolve_price(sub.price)
            new_price = self.resolve_price(price) if price is not None else old_price
            new_quantity = quantity if quantity is not None else sub.quantity
            sub.price, sub.quantity = new_price.id, new_quantity
            invoice: Invoice | None = None
            if proration_behavior == "always_invoice":
                span = sub.current_period_end - sub.current_period_start
                left = max(0, sub.current_period_end - ts)
                unused = -round(old_price.unit_amount * before.quantity * left / span)
                remaining = round(new_price.unit_amount * new_quantity * left / span)
                day = datetime.fromtimestamp(ts, tz=UTC).strftime("%d %b %Y")
                lines = tuple(
                    InvoiceLine(
                        self.new_id("il"),
                        amount,
                        sub.currency,
                        f"{text} after {day}",
                        p.id,
                        q,
                        ts,
                        sub.current_period_end,
                        sub.id,
                        sub.item_id,
                        proration=True,
                    )
                    for amount, text, p, q in (
                        (unused, f"Unused time on {before.quantity} × {old_price.id}", old_price, before.quantity),
                        (remaining, f"Remaining time on {new_quantity} × {new_price.id}", new_price, new_quantity),
                    )
                )
                total = unused + remaining
                customer = self._customer(sub.customer)
                invoice = self._add(
                    Invoice(
                        self.new_id("in"),
                        ts,
                        0,
                        customer=sub.customer,
                        subscription=sub.id,
                        status="draft",
                        billing_reason="subscription_update",
                        # A negative total is credited to the customer's balance: nothing is due now.
                        amount_due=max(0, total),
                        amount_remaining=max(0, total),
                        currency=sub.currency,
                        total=total,
                        lines=lines,
                        period_start=ts,
                        period_end=ts,
                        customer_email=customer.email,
                        customer_name=customer.name,
                    )
                )
                sub.latest_invoice = invoice.id
            self._emit("customer.subscription.updated", sub, ts, prev=before)
            if invoice is not None:
                self._emit("invoice.created", invoice, ts)
                self._attempt_invoice(invoice, ts, fail=fail, first=True)
            return invoice

    def pause_subscription(self, subscription: Subscription | str, *, at: Instant | None = None) -> Subscription:
        """Pause: status ``paused``, recorded as ``customer.subscription.paused``."""
        with self.lock:
            sub = self._subscription(subscription)
            if sub.status in _ENDED or sub.status == "paused":
                raise EmulatorError(f"A {sub.status} subscription cannot be paused.", code="subscription_not_pausable")
            before = snapshot(sub)
            sub.status = "paused"
            self._emit("customer.subscription.paused", sub, self._at(at), prev=before)
            return sub

    def resume_subscription(self, subscription: Subscription | str, *, at: Instant | None = None) -> Subscription:
        """Resume a paused subscription: status ``active``, recorded as ``customer.subscription.resumed``."""
        with self.lock:
            sub = self._subscription(subscription)
            if sub.status != "paused":
                raise EmulatorError("Only a paused subscription can be resumed.", code="subscription_not_paused")
            before = snapshot(sub)
            sub.status = "active"
            self._emit("customer.subscription.resumed", sub, self._at(at), prev=before)
            return sub

    def pause_collection(
        self, subscription: Subscription | str, behavior: str | None, *, at: Instant | None = None
    ) -> Subscription:
        """Set (or clear, with None) ``pause_collection``; recorded as ``customer.subscription.updated``."""
        with self.lock:
            sub = self._subscription(subscription)
            if behavior not in (None, "keep_as_draft", "mark_uncollectible", "void"):
                raise EmulatorError(f"Invalid pause_collection[behavior]: {behavior}", param="pause_collection")
            before = snapshot(sub)
            sub.pause_collection = behavior
            self._emit("customer.subscription.updated", sub, self._at(at), prev=before)
            return sub

    def _end_subscription(self, sub: Subscription, ts: int, *, reason: str) -> None:
        sub.status = "canceled"
        sub.canceled_at = sub.canceled_at or ts
        sub.ended_at = ts
        sub.cancellation_reason = reason
        self._emit("customer.subscription.deleted", sub, ts)

    # --- refunds, disputes, credit notes -----------------------------------------------------------------

    def _charge_of(self, payment: Charge | PaymentIntent | CheckoutSession | Invoice | str) -> Charge:
        record = self.get(payment) if isinstance(payment, str) else payment
        if isinstance(record, CheckoutSession):
            record = self.get(record.payment_intent or "", PaymentIntent)
        if isinstance(record, Invoice):
            record = self.get(record.charge or "", Charge)
        if isinstance(record, PaymentIntent):
            record = self.get(record.latest_charge or "", Charge)
        if not isinstance(record, Charge):
            raise EmulatorError(f"'{record.id}' is not a charge, payment intent, checkout session or invoice")
        return record

    def refund(
        self,
        payment: Charge | PaymentIntent | CheckoutSession | Invoice | str,
        amount: int | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        at: Instant | None = None,
    ) -> Refund:
        """Refund a charge (or the charge behind a payment intent, session or invoice), in full by default.

        Records ``charge.refunded`` (cumulative ``amount_refunded``, ``previous_attributes``) and
        ``refund.created``.
        """
        with self.lock:
            charge = self._charge_of(payment)
            ts = self._at(at)
            remaining = charge.amount - charge.amount_refunded
            if not charge.paid:
                raise EmulatorError("This charge has not been paid.", code="charge_not_paid", param="charge")
            if remaining <= 0:
                raise EmulatorError(
                    f"Charge {charge.id} has already been refunded.", code="charge_already_refunded", param="charge"
                )
            amount = remaining if amount is None else int(amount)
            if amount <= 0:
                raise EmulatorError("Refund amount must be positive.", code="parameter_invalid_integer", param="amount")
            if amount > remaining:
                raise EmulatorError(
                    f"Refund amount (${amount / 100:.2f}) is greater than unrefunded amount on charge "
                    f"(${remaining / 100:.2f})",
                    code="amount_too_large",
                    param="amount",
                )
            refund_id = self.new_id("re")
            settled, settlement_currency, rate = self._converted(amount, charge.currency)
            txn = self._add(
                BalanceTransaction(
                    self.new_id("txn"),
                    ts,
                    0,
                    amount=-settled,
                    currency=settlement_currency,
                    exchange_rate=rate,
                    type="refund",
                    reporting_category="refund",
                    source=refund_id,
                    description="REFUND FOR CHARGE",
                    available_on=ts,
                )
            )
            refund = self._add(
                Refund(
                    refund_id,
                    ts,
                    0,
                    charge=charge.id,
                    payment_intent=charge.payment_intent,
                    amount=amount,
                    currency=charge.currency,
                    reason=reason,
                    balance_transaction=txn.id,
                    metadata=metadata_of(metadata),
                )
            )
            before = snapshot(charge)
            charge.amount_refunded += amount
            charge.refunded = charge.amount_refunded >= charge.amount
            charge.refund_ids = (*charge.refund_ids, refund.id)
            self._emit("charge.refunded", charge, ts, prev=before)
            self._emit("refund.created", refund, ts)
            return refund

    def create_dispute(
        self,
        payment: Charge | PaymentIntent | CheckoutSession | Invoice | str,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
        at: Instant | None = None,
    ) -> Dispute:
        """Open a dispute on a charge; records ``charge.dispute.created`` and ``charge.dispute.funds_withdrawn``."""
        with self.lock:
            charge = self._charge_of(payment)
            if charge.dispute:
                raise EmulatorError(f"Charge {charge.id} is already disputed.", code="charge_disputed")
            ts = self._at(at)
            amount = charge.amount - charge.amount_refunded if amount is None else int(amount)
            dispute_id = self.new_id("du")
            txn = self._add(
                BalanceTransaction(
                    self.new_id("txn"),
                    ts,
                    0,
                    amount=-amount,
                    fee=1500,
                    currency=charge.currency,
                    type="adjustment",
                    reporting_category="dispute",
                    source=dispute_id,
                    description=f"Chargeback withdrawal for {charge.id}",
                    available_on=ts,
                )
            )
            dispute = self._add(
                Dispute(
                    dispute_id,
                    ts,
                    0,
                    charge=charge.id,
                    payment_intent=charge.payment_intent,
                    amount=amount,
                    currency=charge.currency,
                    reason=reason,
                    balance_transactions=(txn.id,),
                    evidence_due_by=ts + 7 * 86400,
                )
            )
            charge.disputed, charge.dispute = True, dispute.id
            self._emit("charge.dispute.created", dispute, ts)
            self._emit("charge.dispute.funds_withdrawn", dispute, ts)
            return dispute

    def close_dispute(self, dispute: Dispute | str, *, won: bool, at: Instant | None = None) -> Dispute:
        """Close a dispute won (funds reinstated) or lost; records ``charge.dispute.closed`` (with
        ``previous_attributes.status``) and, when won, ``charge.dispute.funds_reinstated``."""
        with self.lock:
            record: Dispute = self.get(dispute if isinstance(dispute, str) else dispute.id, Dispute)
            if record.status in ("won", "lost"):
                raise EmulatorError(f"This dispute is already {record.status}.", code="dispute_already_closed")
            ts = self._at(at)
            before = snapshot(record)
            record.status = "won" if won else "lost"
            self._emit("charge.dispute.closed", record, ts, prev=before)
            if won:
                # The reinstatement lands after the closing, as its own balance movement and event.
                txn = self._add(
                    BalanceTransaction(
                        self.new_id("txn"),
                        ts,
                        0,
                        amount=record.amount,
                        currency=record.currency,
                        type="adjustment",
                        reporting_category="dispute_reversal",
                        source=record.id,
                        description=f"Chargeback reversal for {record.charge}",
                        available_on=ts,
                    )
                )
                record.balance_transactions = (*record.balance_transactions, txn.id)
                self._emit("charge.dispute.funds_reinstated", record, ts)
            return record

    def create_credit_note(
        self,
        invoice: Invoice | str,
        *,
        amount: int | None = None,
        reason: str | None = None,
        refund: bool = False,
        memo: str | None = None,
        at: Instant | None = None,
    ) -> CreditNote:
        """Issue a credit note on a finalized invoice (pre_payment if open, post_payment if paid).

        ``refund=True`` also refunds that amount on the invoice's charge. Records ``credit_note.created``
        (plus the refund's events) and ``invoice.updated``.
        """
        with self.lock:
            record: Invoice = self.get(invoice if isinstance(invoice, str) else invoice.id, Invoice)
            if record.status not in ("open", "paid"):
                raise EmulatorError(
                    "You can only create a credit note on an open or paid invoice.", code="invoice_not_editable"
                )
            ts = self._at(at)
            credited = record.pre_payment_credit_notes_amount + record.post_payment_credit_notes_amount
            available = record.total - credited
            amount = available if amount is None else int(amount)
            if amount <= 0 or amount > available:
                raise EmulatorError(f"The credit note amount must be between 1 and {available}.", param="amount")
            post = record.status == "paid"
            refund_record = (
                self.refund(record, amount, reason="requested_by_customer", at=ts) if post and refund else None
            )
            count = len(self._index.get(("credit_note", "invoice", record.id), [])) + 1
            line = record.lines[0] if record.lines else None
            note = self._add(
                CreditNote(
                    self.new_id("cn"),
                    ts,
                    0,
                    customer=record.customer,
                    invoice=record.id,
                    amount=amount,
                    currency=record.currency,
                    type="post_payment" if post else "pre_payment",
                    reason=reason,
                    number=f"{record.number or record.id}-CN-{count:02d}",
                    memo=memo,
                    refund=refund_record.id if refund_record else None,
                    out_of_band_amount=amount if post and not refund else None,
                    lines=(
                        CreditNoteLine(
                            self.new_id("cnli"),
                            amount,
                            line.description if line else "Credit",
                            line.id if line else None,
                        ),
                    ),
                )
            )
            before = snapshot(record)
            if post:
                record.post_payment_credit_notes_amount += amount
            else:
                record.pre_payment_credit_notes_amount += amount
                record.amount_due -= amount
                record.amount_remaining -= amount
            self._emit("credit_note.created", note, ts)
            self._emit("invoice.updated", record, ts, prev=before)
            return note

    # --- fault seeding for reconciliation tests ----------------------------------------------------------

    def update(self, object_id: str, **fields: Any) -> Record:
        """Change fields of an object silently (no event), to seed a discrepancy."""
        with self.lock:
            record = self.get(object_id)
            for name, value in fields.items():
                if name in ("id", "created", "seq") or name in INDEXED_FIELDS[record.object_name]:
                    raise EmulatorError(f"{name} cannot be changed on {record.object_name}")
                if not hasattr(record, name):
                    raise EmulatorError(f"{record.object_name} has no field {name}")
                setattr(record, name, value)
            return record

    def delete(self, object_id: str) -> None:
        """Make an object vanish (retrieving it gives 404); its events stay."""
        with self.lock:
            record = self.get(object_id)
            del self._objects[object_id]
            key: Key = (record.created, record.seq, record.id)
            _remove(self._keys[record.object_name], key)
            for field in INDEXED_FIELDS[record.object_name]:
                value = getattr(record, field)
                if value is not None:
                    _remove(self._index.get((record.object_name, field, value), []), key)

    # --- events and webhooks -----------------------------------------------------------------------------

    def event_records(
        self,
        *,
        types: Iterable[str] | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        object_id: str | None = None,
        after: str | None = None,
    ) -> list[Event]:
        """Recorded events, oldest first, optionally by type pattern (``charge.*``), time window, object, or
        only those recorded after the event ``after`` (to deliver what is new since the last delivery)."""
        wanted = list(types) if types is not None else None
        with self.lock:
            keys = self._keys["event"]
            lo: tuple[int, int] = (to_timestamp(since), -1) if since is not None else (-(2**62), -1)
            if after is not None:
                cursor: Event = self.get(after, Event)
                lo = max(lo, (cursor.created, cursor.seq + 1))
            hi: tuple[int, int] = (to_timestamp(until), -1) if until is not None else (2**62, -1)
            out: list[Event] = []
            for key in _scan(keys, lo, hi, forward=True):
                record = self._objects.get(key[2])
                if not isinstance(record, Event):
                    continue
                if wanted is not None and not any(fnmatch.fnmatchcase(record.type, p) for p in wanted):
                    continue
                if object_id is not None and (record.obj is None or record.obj.id != object_id):
                    continue
                out.append(record)
            return out

    def events(self, **filters: Any) -> EventList:
        """Recorded events as Stripe JSON, oldest first (filters as ``event_records``).

        A sequence that renders each event when it is read, so iterating over a million events keeps memory
        flat; index, slice, ``len`` and unpack it like a list.
        """
        return EventList(self, self.event_records(**filters))

    def add_webhook_endpoint(
        self, url: str, secret: str, *, enabled_events: Iterable[str] = ("*",), **options: Any
    ) -> Any:
        """Register an endpoint that gets every new matching event delivered in the background, like Stripe's
        configured endpoints; returns the ``WebhookEndpoint`` (``flush()``, ``close()``, ``report``)."""
        from .webhooks import WebhookEndpoint

        endpoint = WebhookEndpoint(url, secret, enabled_events=enabled_events, **options)

        def deliver(event: Event) -> None:
            if endpoint.wants(event.type):
                endpoint.enqueue(json.dumps(self.render(event), indent=2).encode())

        self.event_listeners.append(deliver)
        return endpoint

    def deliver_webhooks(
        self,
        url: str,
        secret: str,
        events: Iterable[Event | str | Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> Any:
        """Deliver recorded events (default: all, oldest first) to ``url``; options as ``deliver_webhooks``."""
        from .webhooks import deliver_webhooks

        bodies: list[Mapping[str, Any]] = []
        with self.lock:
            for event in self.event_records() if events is None else events:
                if isinstance(event, Mapping):
                    bodies.append(event)
                else:
                    bodies.append(self.render(self.get(event, Event) if isinstance(event, str) else event))
        return deliver_webhooks(url, secret, bodies, **options)


_SLOTS: dict[type, tuple[str, ...]] = {}


def snapshot(record: R) -> R:
    """A shallow copy of a record (its fields hold immutable values, so this is a snapshot)."""
    cls = type(record)
    names = _SLOTS.get(cls)
    if names is None:
        names = _SLOTS[cls] = tuple(n for klass in cls.__mro__ for n in getattr(klass, "__slots__", ()))
    copied = object.__new__(cls)
    for name in names:
        object.__setattr__(copied, name, getattr(record, name))
    return copied


class EventList(Sequence[dict[str, Any]]):
    """Events rendered on access (see ``Store.events``)."""

    def __init__(self, store: Store, records: list[Event]) -> None:
        self._store = store
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self._store.render(e) for e in self._records[index]]
        return self._store.render(self._records[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self._records:
            yield self._store.render(record)

    @property
    def records(self) -> list[Event]:
        """The event records behind the rendered events."""
        return self._records


def _insert(keys: list[Key], key: Key) -> None:
    if not keys or keys[-1] < key:
        keys.append(key)
    else:
        bisect.insort(keys, key)


def _remove(keys: list[Key], key: Key) -> None:
    index = bisect.bisect_left(keys, key)
    if index < len(keys) and keys[index] == key:
        del keys[index]


def _scan(keys: list[Key], lo: tuple[int, int], hi: tuple[int, int], forward: bool) -> Iterator[Key]:
    start = bisect.bisect_left(keys, lo)
    stop = bisect.bisect_left(keys, hi)
    if forward:
        for index in range(start, stop):
            yield keys[index]
    else:
        for index in range(stop - 1, start - 1, -1):
            yield keys[index]
