"""Render records into Stripe's JSON shapes, for one API version.

Shapes follow stripe/openapi ``fixtures3.json`` and real event captures. Version differences we honour:
- before 2022-11-15 a charge carries its ``refunds`` list;
- before 2025-03-31 (basil) an invoice has top-level ``subscription``, ``charge``, ``payment_intent``, ``paid``,
  and lines with ``price``/``subscription``; charges and payment intents name their ``invoice``; a
  subscription has top-level ``current_period_start``/``current_period_end``.
- from basil on: ``invoice.parent.subscription_details.subscription``, lines with ``parent`` and ``pricing``,
  periods on ``subscription.items.data[].current_period_*``, invoice payments instead of ``invoice.charge``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    LineItem,
    PaymentIntent,
    Payout,
    Price,
    Product,
    Record,
    Refund,
    Subscription,
)

if TYPE_CHECKING:
    from .store import Store

JSON = dict[str, Any]

BASIL = "2025-03-31"
CHARGE_REFUNDS_REMOVED = "2022-11-15"


def version_date(api_version: str) -> str:
    """The date part of an API version (``2025-03-31.basil`` -> ``2025-03-31``)."""
    return api_version.split(".", 1)[0]


def is_basil_or_later(api_version: str) -> bool:
    """True for API versions that use the 2025 invoice and subscription shapes."""
    return version_date(api_version) >= BASIL


def list_object(data: list[JSON], url: str, *, has_more: bool = False, total_count: int | None = None) -> JSON:
    """A Stripe list object."""
    out: JSON = {"object": "list", "data": data, "has_more": has_more, "url": url}
    if total_count is not None:
        out["total_count"] = total_count
    return out


_ADDRESS_NULL = {"city": None, "country": None, "line1": None, "line2": None, "postal_code": None, "state": None}


class Renderer:
    """Renders records of one store for one API version."""

    def __init__(self, store: Store, api_version: str) -> None:
        self.store = store
        self.api_version = api_version
        self.basil = is_basil_or_later(api_version)
        self._by_type: dict[type[Record], Callable[[Any], JSON]] = {
            Product: self.product,
            Price: self.price,
            Customer: self.customer,
            CheckoutSession: self.checkout_session,
            PaymentIntent: self.payment_intent,
            Charge: self.charge,
            BalanceTransaction: self.balance_transaction,
            Payout: self.payout,
            Refund: self.refund,
            Subscription: self.subscription,
            Invoice: self.invoice,
            InvoicePayment: self.invoice_payment,
            Dispute: self.dispute,
            CreditNote: self.credit_note,
            Event: self.event,
        }

    def render(self, record: Record) -> JSON:
        """The object's JSON as this API version shows it."""
        return self._by_type[type(record)](record)

    # --- catalogue -------------------------------------------------------------------------------------

    def product(self, p: Product) -> JSON:
        return {
            "id": p.id,
            "object": "product",
            "active": p.active,
            "created": p.created,
            "default_price": None,
            "description": p.description,
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": dict(p.metadata),
            "name": p.name,
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": p.created,
            "url": None,
        }

    def price(self, p: Price) -> JSON:
        return {
            "id": p.id,
            "object": "price",
            "active": p.active,
            "billing_scheme": "per_unit",
            "created": p.created,
            "currency": p.currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": p.lookup_key,
            "metadata": dict(p.metadata),
            "nickname": p.nickname,
            "product": p.product,
            "recurring": (
                {
                    "interval": p.interval,
                    "interval_count": p.interval_count,
                    "meter": None,
                    "trial_period_days": None,
                    "usage_type": "licensed",
                }
                if p.interval
                else None
            ),
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring" if p.interval else "one_time",
            "unit_amount": p.unit_amount,
            "unit_amount_decimal": str(p.unit_amount),
        }

    def plan(self, p: Price) -> JSON:
        return {
            "id": p.id,
            "object": "plan",
            "active": p.active,
            "amount": p.unit_amount,
            "amount_decimal": str(p.unit_amount),
            "billing_scheme": "per_unit",
            "created": p.created,
            "currency": p.currency,
            "interval": p.interval or "month",
            "interval_count": p.interval_count,
            "livemode": False,
            "metadata": dict(p.metadata),
            "meter": None,
            "nickname": p.nickname,
            "product": p.product,
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }

    def _price_json(self, price_id: str) -> JSON | None:
        price = self.store.peek(price_id)
        return self.price(price) if isinstance(price, Price) else None

    # --- customers ---------------------------------------------------------------------------------------

    def customer(self, c: Customer) -> JSON:
        if c.deleted:
            return {"id": c.id, "object": "customer", "deleted": True}
        return {
            "id": c.id,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": c.created,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": c.description,
            "discount": None,
            "email": c.email,
            "invoice_prefix": c.id[-8:].upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": dict(c.metadata),
            "name": c.name,
            "next_invoice_sequence": 1,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }

    # --- checkout ----------------------------------------------------------------------------------------

    def line_item(self, li: LineItem) -> JSON:
        return {
            "id": li.id,
            "object": "item",
            "adjustable_quantity": None,
            "amount_discount": 0,
            "amount_subtotal": li.amount_subtotal,
            "amount_tax": 0,
            "amount_total": li.amount_total,
            "currency": li.currency,
            "description": li.description,
            "metadata": {},
            "price": self._price_json(li.price),
            "quantity": li.quantity,
        }

    def checkout_line_items(self, s: CheckoutSession) -> list[JSON]:
        return [self.line_item(li) for li in s.line_items]

    def checkout_session(self, s: CheckoutSession) -> JSON:
        customer = self.store.peek(s.customer) if s.customer else None
        email = s.customer_email or (customer.email if isinstance(customer, Customer) else None)
        name = customer.name if isinstance(customer, Customer) else None
        return {
            "id": s.id,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": False},
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": s.amount_subtotal,
            "amount_total": s.amount_total,
            "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": None,
            "client_reference_id": s.client_reference_id,
            "client_secret": None,
            "collected_information": None,
            "consent": None,
            "consent_collection": None,
            "created": s.created,
            "currency": s.currency,
            "currency_conversion": None,
            "custom_fields": [],
            "custom_text": {
                "after_submit": None,
                "shipping_address": None,
                "submit": None,
                "terms_of_service_acceptance": None,
            },
            "customer": s.customer,
            "customer_creation": None if s.customer else "if_required",
            "customer_account": None,
            "customer_details": (
                {
                    "address": dict(_ADDRESS_NULL),
                    "email": email,
                    "name": name,
                    "phone": None,
                    "tax_exempt": "none",
                    "tax_ids": [],
                }
                if s.status == "complete"
                else None
            ),
            "customer_email": s.customer_email,
            "discounts": [],
            "expires_at": s.expires_at,
            "invoice": s.invoice,
            "integration_identifier": None,
            "invoice_creation": ({"enabled": False, "invoice_data": None} if s.mode == "payment" else None),
            "livemode": False,
            "locale": None,
            "managed_payments": {"enabled": False},
            "metadata": dict(s.metadata),
            "mode": s.mode,
            "origin_context": None,
            "payment_intent": s.payment_intent,
            "payment_link": None,
            "payment_method_collection": "if_required" if s.mode == "subscription" else None,
            "payment_method_configuration_details": None,
            "payment_method_options": {},
            "payment_method_types": ["card"],
            "payment_status": s.payment_status,
            "permissions": None,
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_options": [],
            "status": s.status,
            "submit_type": None,
            "subscription": s.subscription,
            "success_url": s.success_url,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{s.id}" if s.status == "open" else None,
            "wallet_options": None,
        }

    # --- payments ----------------------------------------------------------------------------------------

    def payment_intent(self, p: PaymentIntent) -> JSON:
        out: JSON = {
            "id": p.id,
            "object": "payment_intent",
            "amount": p.amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": p.amount_received,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic",
            "client_secret": f"{p.id}_secret_emulator",
            "confirmation_method": "automatic",
            "created": p.created,
            "currency": p.currency,
            "customer": p.customer,
            "customer_account": None,
            "description": p.description,
            "excluded_payment_method_types": None,
            "last_payment_error": p.last_payment_error,
            "latest_charge": p.latest_charge,
            "livemode": False,
            "managed_payments": {"enabled": False},
            "metadata": dict(p.metadata),
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": p.payment_method,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "processing": None,
            "receipt_email": None,
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": p.status,
            "transfer_data": None,
            "transfer_group": None,
        }
        if not self.basil:
            out["invoice"] = p.invoice
        if version_date(self.api_version) < CHARGE_REFUNDS_REMOVED:
            # Before 2022-11-15 a payment intent carried its charges.
            charges = self.store.charges_of_payment_intent(p.id)
            out["charges"] = list_object(
                [self.charge(c) for c in charges], f"/v1/charges?payment_intent={p.id}", total_count=len(charges)
            )
        return out

    def charge(self, c: Charge) -> JSON:
        out: JSON = {
            "id": c.id,
            "object": "charge",
            "amount": c.amount,
            "amount_captured": c.amount_captured,
            "amount_refunded": c.amount_refunded,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": c.balance_transaction,
            "billing_details": {
                "address": dict(_ADDRESS_NULL),
                "email": None,
                "name": None,
                "phone": None,
                "tax_id": None,
            },
            "calculated_statement_descriptor": "EMULATOR",
            "captured": c.status == "succeeded",
            "created": c.created,
            "currency": c.currency,
            "customer": c.customer,
            "description": c.description,
            "destination": None,
            "dispute": c.dispute,
            "disputed": c.disputed,
            "failure_balance_transaction": None,
            "failure_code": c.failure_code,
            "failure_message": c.failure_message,
            "fraud_details": {},
            "livemode": False,
            "metadata": dict(c.metadata),
            "on_behalf_of": None,
            "order": None,
            "outcome": {
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": None,
                "network_status": "approved_by_network" if c.paid else "declined_by_network",
                "reason": None if c.paid else "generic_decline",
                "risk_level": "normal",
                "risk_score": 32,
                "seller_message": "Payment complete." if c.paid else "The bank did not return any further details.",
                "type": "authorized" if c.paid else "issuer_declined",
            },
            "paid": c.paid,
            "payment_intent": c.payment_intent,
            "payment_method": c.payment_method,
            "payment_method_details": {
                "card": {
                    "amount_authorized": c.amount if c.paid else None,
                    "brand": "visa",
                    "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
                    "country": "US",
                    "exp_month": 12,
                    "exp_year": 2034,
                    "fingerprint": "emulatorFngrprnt",
                    "funding": "credit",
                    "last4": "4242" if c.paid else "0002",
                    "network": "visa",
                    "three_d_secure": None,
                    "wallet": None,
                },
                "type": "card",
            },
            "radar_options": {},
            "receipt_email": None,
            "receipt_number": None,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/{c.id}",
            "refunded": c.refunded,
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": c.status,
            "transfer_data": None,
            "transfer_group": None,
        }
        if not self.basil:
            out["invoice"] = c.invoice
        if version_date(self.api_version) < CHARGE_REFUNDS_REMOVED:
            out["refunds"] = self.charge_refunds(c)
        return out

    def charge_refunds(self, c: Charge) -> JSON:
        refunds = [self.store.peek(rid) for rid in reversed(c.refund_ids)]
        return list_object(
            [self.refund(r) for r in refunds if isinstance(r, Refund)],
            f"/v1/charges/{c.id}/refunds",
            total_count=len(c.refund_ids),
        )

    def payout(self, p: Payout) -> JSON:
        return {
            "id": p.id,
            "object": "payout",
            "amount": p.amount,
            "arrival_date": p.arrival_date,
            "automatic": p.automatic,
            "balance_transaction": p.balance_transaction,
            "created": p.created,
            "currency": p.currency,
            "description": p.description,
            "destination": None,
            "failure_balance_transaction": None,
            "failure_code": None,
            "failure_message": None,
            "livemode": False,
            "metadata": {},
            "method": "standard",
            "reconciliation_status": "completed",
            "source_type": "card",
            "statement_descriptor": None,
            "status": p.status,
            "type": "bank_account",
        }

    def balance_transaction(self, t: BalanceTransaction) -> JSON:
        return {
            "id": t.id,
            "object": "balance_transaction",
            "amount": t.amount,
            "available_on": t.available_on,
            "balance_type": "payments",
            "created": t.created,
            "currency": t.currency,
            "description": t.description,
            # A JSON number on the wire, as Stripe sends it (written from the Decimal's digits).
            "exchange_rate": float(t.exchange_rate) if t.exchange_rate is not None else None,
            "fee": t.fee,
            "fee_details": (
                [
                    {
                        "amount": t.fee,
                        "application": None,
                        "currency": t.currency,
                        "description": "Dispute fee" if t.type == "adjustment" else "Stripe processing fees",
                        "type": "stripe_fee",
                    }
                ]
                if t.fee
                else []
            ),
            "net": t.amount - t.fee,
            "reporting_category": t.reporting_category,
            "source": t.source,
            "status": "available",
            "type": t.type,
        }

    def refund(self, r: Refund) -> JSON:
        charge = self.store.peek(r.charge)
        return {
            "id": r.id,
            "object": "refund",
            "amount": r.amount,
            "balance_transaction": r.balance_transaction,
            "charge": r.charge,
            "created": r.created,
            "currency": r.currency,
            "customer": charge.customer if isinstance(charge, Charge) else None,
            "customer_account": None,
            "destination_details": {"card": {"reference_status": "pending", "type": "refund"}, "type": "card"},
            "metadata": dict(r.metadata),
            "payment_intent": r.payment_intent,
            "payment_method": charge.payment_method if isinstance(charge, Charge) else None,
            "reason": r.reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": r.status,
            "transfer_reversal": None,
        }

    def dispute(self, d: Dispute) -> JSON:
        txns = [self.store.peek(tid) for tid in d.balance_transactions]
        return {
            "id": d.id,
            "object": "dispute",
            "amount": d.amount,
            "balance_transaction": d.balance_transactions[0] if d.balance_transactions else None,
            "balance_transactions": [self.balance_transaction(t) for t in txns if isinstance(t, BalanceTransaction)],
            "charge": d.charge,
            "created": d.created,
            "currency": d.currency,
            "enhanced_eligibility_types": [],
            "evidence": {
                key: None
                for key in (
                    "access_activity_log",
                    "billing_address",
                    "cancellation_policy",
                    "cancellation_policy_disclosure",
                    "cancellation_rebuttal",
                    "customer_communication",
                    "customer_email_address",
                    "customer_name",
                    "customer_purchase_ip",
                    "customer_signature",
                    "duplicate_charge_documentation",
                    "duplicate_charge_explanation",
                    "duplicate_charge_id",
                    "product_description",
                    "receipt",
                    "refund_policy",
                    "refund_policy_disclosure",
                    "refund_refusal_explanation",
                    "service_date",
                    "service_documentation",
                    "shipping_address",
                    "shipping_carrier",
                    "shipping_date",
                    "shipping_documentation",
                    "shipping_tracking_number",
                    "uncategorized_file",
                    "uncategorized_text",
                )
            }
            | {"enhanced_evidence": {}},
            "evidence_details": {
                "due_by": d.evidence_due_by,
                "enhanced_eligibility": {},
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": dict(d.metadata),
            "payment_intent": d.payment_intent,
            "payment_method_details": {
                "card": {"brand": "visa", "case_type": "chargeback", "network_reason_code": "10.4"},
                "type": "card",
            },
            "reason": d.reason,
            "status": d.status,
        }

    # --- billing -----------------------------------------------------------------------------------------

    def _subscription_item(self, s: Subscription) -> JSON:
        price = self.store.peek(s.price)
        item: JSON = {
            "id": s.item_id,
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": s.created,
            "discounts": [],
            "metadata": {},
            "plan": self.plan(price) if isinstance(price, Price) else None,
            "price": self.price(price) if isinstance(price, Price) else None,
            "quantity": s.quantity,
            "subscription": s.id,
            "tax_rates": [],
        }
        if self.basil:
            item["current_period_end"] = s.current_period_end
            item["current_period_start"] = s.current_period_start
        return item

    def subscription(self, s: Subscription) -> JSON:
        price = self.store.peek(s.price)
        out: JSON = {
            "id": s.id,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": s.billing_cycle_anchor,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic", "updated_at": s.created},
            "billing_schedules": [],
            "billing_thresholds": None,
            "cancel_at": s.cancel_at,
            "cancel_at_period_end": s.cancel_at_period_end,
            "canceled_at": s.canceled_at,
            "cancellation_details": {"comment": None, "feedback": None, "reason": s.cancellation_reason},
            "collection_method": "charge_automatically",
            "created": s.created,
            "currency": s.currency,
            "customer": s.customer,
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": s.ended_at,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": list_object(
                [self._subscription_item(s)], f"/v1/subscription_items?subscription={s.id}", total_count=1
            ),
            "latest_invoice": s.latest_invoice,
            "livemode": False,
            "managed_payments": {"enabled": False},
            "metadata": dict(s.metadata),
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": {"behavior": s.pause_collection, "resumes_at": None} if s.pause_collection else None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "plan": self.plan(price) if isinstance(price, Price) else None,
            "quantity": s.quantity,
            "schedule": None,
            "start_date": s.created,
            "status": s.status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": s.trial_end,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": s.trial_start,
        }
        if not self.basil:
            out["current_period_end"] = s.current_period_end
            out["current_period_start"] = s.current_period_start
        return out

    def invoice_lines(self, inv: Invoice) -> list[JSON]:
        out = []
        for line in inv.lines:
            price = self.store.peek(line.price)
            item: JSON = {
                "id": line.id,
                "object": "line_item",
                "amount": line.amount,
                "currency": line.currency,
                "description": line.description,
                "discount_amounts": [],
                "discountable": True,
                "discounts": [],
                "invoice": inv.id,
                "livemode": False,
                "metadata": {},
                "period": {"end": line.period_end, "start": line.period_start},
                "pretax_credit_amounts": [],
                "quantity": line.quantity,
                "taxes": [],
            }
            if self.basil:
                item["parent"] = {
                    "invoice_item_details": None,
                    "subscription_item_details": {
                        "invoice_item": None,
                        "proration": line.proration,
                        "proration_details": {"credited_items": None},
                        "subscription": line.subscription,
                        "subscription_item": line.subscription_item,
                    },
                    "type": "subscription_item_details",
                }
                item["pricing"] = {
                    "price_details": {
                        "price": line.price,
                        "product": price.product if isinstance(price, Price) else None,
                    },
                    "type": "price_details",
                    "unit_amount_decimal": str(price.unit_amount) if isinstance(price, Price) else None,
                }
            else:
                item["plan"] = self.plan(price) if isinstance(price, Price) else None
                item["price"] = self.price(price) if isinstance(price, Price) else None
                item["proration"] = line.proration
                item["subscription"] = line.subscription
                item["subscription_item"] = line.subscription_item
                item["type"] = "invoiceitem" if line.proration else "subscription"
            out.append(item)
        return out

    def invoice(self, inv: Invoice) -> JSON:
        sub = self.store.peek(inv.subscription) if inv.subscription else None
        out: JSON = {
            "id": inv.id,
            "object": "invoice",
            "account_country": "US",
            "account_name": "Emulator, Inc.",
            "account_tax_ids": None,
            "amount_due": inv.amount_due,
            "amount_overpaid": 0,
            "amount_paid": inv.amount_paid,
            "amount_remaining": inv.amount_remaining,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": inv.attempt_count,
            "attempted": inv.attempted,
            "auto_advance": inv.status not in ("paid", "void", "uncollectible"),
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "automatically_finalizes_at": None,
            "billing_reason": inv.billing_reason,
            "collection_method": "charge_automatically",
            "created": inv.created,
            "currency": inv.currency,
            "custom_fields": None,
            "customer": inv.customer,
            "customer_account": None,
            "customer_address": None,
            "customer_email": inv.customer_email,
            "customer_name": inv.customer_name,
            "customer_phone": None,
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": inv.finalized_at,
            "ending_balance": 0 if inv.finalized_at else None,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": f"https://invoice.stripe.com/i/{inv.id}" if inv.finalized_at else None,
            "invoice_pdf": f"https://pay.stripe.com/invoice/{inv.id}/pdf" if inv.finalized_at else None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": list_object(self.invoice_lines(inv), f"/v1/invoices/{inv.id}/lines", total_count=len(inv.lines)),
            "livemode": False,
            "metadata": dict(inv.metadata),
            "next_payment_attempt": inv.next_payment_attempt,
            "number": inv.number,
            "on_behalf_of": None,
            "payment_settings": {
                "default_mandate": None,
                "payment_method_options": None,
                "payment_method_types": None,
            },
            "period_end": inv.period_end,
            "period_start": inv.period_start,
            "post_payment_credit_notes_amount": inv.post_payment_credit_notes_amount,
            "pre_payment_credit_notes_amount": inv.pre_payment_credit_notes_amount,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": inv.status,
            "status_transitions": {
                "finalized_at": inv.finalized_at,
                "marked_uncollectible_at": None,
                "paid_at": inv.paid_at,
                "voided_at": inv.voided_at,
            },
            "subtotal": inv.total,
            "subtotal_excluding_tax": inv.total,
            "test_clock": None,
            "total": inv.total,
            "total_discount_amounts": [],
            "total_excluding_tax": inv.total,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": inv.created,
        }
        if self.basil:
            out["parent"] = (
                {
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": dict(sub.metadata) if isinstance(sub, Subscription) else {},
                        "subscription": inv.subscription,
                    },
                    "type": "subscription_details",
                }
                if inv.subscription
                else None
            )
        else:
            out["charge"] = inv.charge
            out["paid"] = inv.status == "paid"
            out["paid_out_of_band"] = False
            out["payment_intent"] = inv.payment_intent
            out["subscription"] = inv.subscription
            out["subscription_details"] = (
                {"metadata": dict(sub.metadata) if isinstance(sub, Subscription) else {}} if inv.subscription else None
            )
            out["tax"] = None
            out["total_tax_amounts"] = []
        return out

    def invoice_payment(self, p: InvoicePayment) -> JSON:
        return {
            "id": p.id,
            "object": "invoice_payment",
            "amount_paid": p.amount_paid,
            "amount_requested": p.amount_requested,
            "created": p.created,
            "currency": p.currency,
            "invoice": p.invoice,
            "is_default": True,
            "livemode": False,
            "payment": (
                {"payment_intent": p.payment_intent, "type": "payment_intent"}
                if p.payment_intent
                else {"charge": p.charge, "type": "charge"}
            ),
            "status": p.status,
            "status_transitions": {"canceled_at": None, "paid_at": p.paid_at},
        }

    def invoice_payments(self, inv: Invoice) -> JSON:
        payments = self.store.invoice_payments_of(inv.id)
        return list_object(
            [self.invoice_payment(p) for p in payments],
            f"/v1/invoice_payments?invoice={inv.id}",
            total_count=len(payments),
        )

    def credit_note(self, cn: CreditNote) -> JSON:
        lines: list[JSON] = [
            {
                "id": line.id,
                "object": "credit_note_line_item",
                "amount": line.amount,
                "description": line.description,
                "discount_amount": 0,
                "discount_amounts": [],
                "invoice_line_item": line.invoice_line_item,
                "livemode": False,
                "metadata": {},
                "pretax_credit_amounts": [],
                "quantity": 1,
                "tax_rates": [],
                "taxes": [],
                "type": "invoice_line_item" if line.invoice_line_item else "custom_line_item",
                "unit_amount": None if line.invoice_line_item else line.amount,
                "unit_amount_decimal": None if line.invoice_line_item else str(line.amount),
            }
            for line in cn.lines
        ]
        out: JSON = {
            "id": cn.id,
            "object": "credit_note",
            "amount": cn.amount,
            "amount_shipping": 0,
            "created": cn.created,
            "currency": cn.currency,
            "customer": cn.customer,
            "customer_account": None,
            "customer_balance_transaction": None,
            "discount_amount": 0,
            "discount_amounts": [],
            "effective_at": cn.created,
            "invoice": cn.invoice,
            "lines": list_object(lines, f"/v1/credit_notes/{cn.id}/lines", total_count=len(lines)),
            "livemode": False,
            "memo": cn.memo,
            "metadata": dict(cn.metadata),
            "number": cn.number,
            "out_of_band_amount": cn.out_of_band_amount,
            "pdf": f"https://pay.stripe.com/credit_notes/{cn.id}/pdf",
            "post_payment_amount": cn.amount if cn.type == "post_payment" else 0,
            "pre_payment_amount": cn.amount if cn.type == "pre_payment" else 0,
            "pretax_credit_amounts": [],
            "reason": cn.reason,
            "refunds": ([{"amount_refunded": cn.amount, "refund": cn.refund, "type": "refund"}] if cn.refund else []),
            "shipping_cost": None,
            "status": cn.status,
            "subtotal": cn.amount,
            "subtotal_excluding_tax": cn.amount,
            "total": cn.amount,
            "total_excluding_tax": cn.amount,
            "total_taxes": [],
            "type": cn.type,
            "voided_at": cn.voided_at,
        }
        if not self.basil:
            out["refund"] = cn.refund
            out["tax_amounts"] = []
        return out

    # --- events ------------------------------------------------------------------------------------------

    def event(self, e: Event) -> JSON:
        """An event, always rendered at its own API version (as Stripe does)."""
        at_version = self if e.api_version == self.api_version else Renderer(self.store, e.api_version)
        assert e.obj is not None
        data: JSON = {"object": at_version.render(e.obj)}
        if e.prev is not None:
            data["previous_attributes"] = previous_attributes(at_version.render(e.prev), data["object"])
        return {
            "id": e.id,
            "object": "event",
            "api_version": e.api_version,
            "created": e.created,
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": e.request_id, "idempotency_key": e.idempotency_key},
            "type": e.type,
        }


def previous_attributes(before: JSON, after: JSON) -> JSON:
    """The top-level fields that changed, with their old values; nested hashes narrowed to changed keys."""
    changed: JSON = {}
    for key, old in before.items():
        new = after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and old.get("object") != "list":
            changed[key] = previous_attributes(old, new)
        else:
            changed[key] = old
    return changed
