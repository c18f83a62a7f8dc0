"""What the emulator remembers of each Stripe object: small slotted records, rendered to Stripe's JSON on demand.

Records hold only the fields that vary; ``render.py`` fills the rest of each object's shape. Fields hold
immutable values (tuples, and dicts that are replaced rather than mutated), so a shallow copy is a snapshot
for an event's ``data.object``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

# Metadata is replaced, never mutated in place, so records without any can share one empty mapping.
Metadata = Mapping[str, str]
NO_METADATA: Metadata = MappingProxyType({})


def metadata_of(value: Mapping[str, str] | None) -> Metadata:
    """A record's own copy of metadata (the shared empty one when there is none)."""
    return dict(value) if value else NO_METADATA


@dataclass(slots=True)
class Record:
    id: str
    created: int
    seq: int

    object_name = "object"


@dataclass(slots=True)
class Product(Record):
    name: str = ""
    description: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    active: bool = True

    object_name = "product"


@dataclass(slots=True)
class Price(Record):
    product: str = ""
    unit_amount: int = 0
    currency: str = "usd"
    interval: str | None = None  # None: one_time
    interval_count: int = 1
    lookup_key: str | None = None
    nickname: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    active: bool = True

    object_name = "price"


@dataclass(slots=True)
class Customer(Record):
    email: str | None = None
    name: str | None = None
    description: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    deleted: bool = False

    object_name = "customer"


@dataclass(frozen=True, slots=True)
class LineItem:
    """A checkout session's line item (object ``item``)."""

    id: str
    price: str
    quantity: int
    amount_subtotal: int
    amount_total: int
    currency: str
    description: str


@dataclass(slots=True)
class CheckoutSession(Record):
    customer: str | None = None
    mode: str = "payment"
    status: str = "open"
    payment_status: str = "unpaid"
    currency: str = "usd"
    amount_subtotal: int = 0
    amount_total: int = 0
    line_items: tuple[LineItem, ...] = ()
    payment_intent: str | None = None
    subscription: str | None = None
    invoice: str | None = None
    client_reference_id: str | None = None
    customer_email: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    expires_at: int = 0
    success_url: str | None = "https://example.com/success"

    object_name = "checkout.session"


@dataclass(slots=True)
class PaymentIntent(Record):
    customer: str | None = None
    amount: int = 0
    amount_received: int = 0
    currency: str = "usd"
    status: str = "requires_payment_method"
    latest_charge: str | None = None
    invoice: str | None = None
    description: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    last_payment_error: dict[str, Any] | None = None
    payment_method: str | None = None

    object_name = "payment_intent"


@dataclass(slots=True)
class Charge(Record):
    customer: str | None = None
    amount: int = 0
    amount_captured: int = 0
    amount_refunded: int = 0
    currency: str = "usd"
    status: str = "succeeded"
    paid: bool = True
    refunded: bool = False
    disputed: bool = False
    payment_intent: str | None = None
    invoice: str | None = None
    balance_transaction: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    refund_ids: tuple[str, ...] = ()
    dispute: str | None = None
    description: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    payment_method: str | None = None

    object_name = "charge"


@dataclass(slots=True)
class BalanceTransaction(Record):
    amount: int = 0
    fee: int = 0
    currency: str = "usd"
    type: str = "charge"
    reporting_category: str = "charge"
    source: str | None = None
    description: str | None = None
    available_on: int = 0
    # Major units of the settlement currency per major unit of the presentment currency (Stripe's field).
    exchange_rate: Decimal | None = None
    # The payout that paid it out (not rendered: Stripe lists a payout's transactions with ``?payout=``).
    payout: str | None = None

    object_name = "balance_transaction"


@dataclass(slots=True)
class Payout(Record):
    amount: int = 0
    currency: str = "usd"
    status: str = "paid"
    arrival_date: int = 0
    balance_transaction: str | None = None
    automatic: bool = True
    description: str | None = "STRIPE PAYOUT"

    object_name = "payout"


@dataclass(slots=True)
class Refund(Record):
    charge: str = ""
    payment_intent: str | None = None
    amount: int = 0
    currency: str = "usd"
    status: str = "succeeded"
    reason: str | None = None
    balance_transaction: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)

    object_name = "refund"


@dataclass(slots=True)
class Subscription(Record):
    customer: str = ""
    status: str = "active"
    price: str = ""
    quantity: int = 1
    item_id: str = ""
    current_period_start: int = 0
    current_period_end: int = 0
    billing_cycle_anchor: int = 0
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    canceled_at: int | None = None
    ended_at: int | None = None
    cancellation_reason: str | None = None
    trial_start: int | None = None
    trial_end: int | None = None
    latest_invoice: str | None = None
    currency: str = "usd"
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    # pause_collection.behavior (keep_as_draft, mark_uncollectible, void) while collection is paused.
    pause_collection: str | None = None

    object_name = "subscription"


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    id: str
    amount: int
    currency: str
    description: str
    price: str
    quantity: int
    period_start: int
    period_end: int
    subscription: str | None
    subscription_item: str | None
    # A proration of a change in the middle of a period ("Unused time on ..." / "Remaining time on ...").
    proration: bool = False


@dataclass(slots=True)
class Invoice(Record):
    customer: str = ""
    subscription: str | None = None
    status: str = "draft"
    billing_reason: str = "manual"
    amount_due: int = 0
    amount_paid: int = 0
    amount_remaining: int = 0
    currency: str = "usd"
    total: int = 0
    lines: tuple[InvoiceLine, ...] = ()
    period_start: int = 0
    period_end: int = 0
    attempt_count: int = 0
    attempted: bool = False
    next_payment_attempt: int | None = None
    charge: str | None = None
    payment_intent: str | None = None
    number: str | None = None
    finalized_at: int | None = None
    paid_at: int | None = None
    voided_at: int | None = None
    post_payment_credit_notes_amount: int = 0
    pre_payment_credit_notes_amount: int = 0
    customer_email: str | None = None
    customer_name: str | None = None
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)

    object_name = "invoice"


@dataclass(slots=True)
class InvoicePayment(Record):
    invoice: str = ""
    payment_intent: str | None = None
    charge: str | None = None
    amount_paid: int | None = None
    amount_requested: int = 0
    currency: str = "usd"
    status: str = "open"
    paid_at: int | None = None

    object_name = "invoice_payment"


@dataclass(slots=True)
class Dispute(Record):
    charge: str = ""
    payment_intent: str | None = None
    amount: int = 0
    currency: str = "usd"
    status: str = "needs_response"
    reason: str = "fraudulent"
    balance_transactions: tuple[str, ...] = ()
    evidence_due_by: int = 0
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)

    object_name = "dispute"


@dataclass(frozen=True, slots=True)
class CreditNoteLine:
    id: str
    amount: int
    description: str
    invoice_line_item: str | None


@dataclass(slots=True)
class CreditNote(Record):
    customer: str = ""
    invoice: str = ""
    amount: int = 0
    currency: str = "usd"
    status: str = "issued"
    type: str = "post_payment"
    reason: str | None = None
    number: str = ""
    memo: str | None = None
    refund: str | None = None
    out_of_band_amount: int | None = None
    lines: tuple[CreditNoteLine, ...] = ()
    metadata: Metadata = field(default_factory=lambda: NO_METADATA)
    voided_at: int | None = None

    object_name = "credit_note"


@dataclass(slots=True)
class Event(Record):
    type: str = ""
    api_version: str = ""
    obj: Record | None = None
    prev: Record | None = None
    request_id: str | None = None
    idempotency_key: str | None = None

    object_name = "event"


RECORD_TYPES: dict[str, type[Record]] = {
    cls.object_name: cls
    for cls in (
        Product,
        Price,
        Customer,
        CheckoutSession,
        PaymentIntent,
        Charge,
        BalanceTransaction,
        Refund,
        Subscription,
        Invoice,
        InvoicePayment,
        Dispute,
        CreditNote,
        Event,
    )
}
