"""Page Stripe's lists for a window into the per-run staging tables, one page at a time.

Nothing is kept in memory beyond one page: each page becomes one multi-row INSERT, and the checks then compare
the staged rows with the ledger in SQL. A paid Checkout Session (``mode=payment``) or a paid invoice is a
*payment*; each id a grant may carry for it (session, invoice, payment intent, charge) becomes an alias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy import delete, insert, literal, select, text, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, aliased

from ledger.config import BillingConfig
from ledger.models import Grant, GrantSettlement, GrantSource, RefundSettlement
from ledger.plan_changes import PlanNotConfigured, change_effect, proration_lines
from reconciliation.models import ReconciliationRun, RunStatus, StagedStripeAlias, StagedStripeObject
from reconciliation.stripe_source import StripeSource, describe_source_error, is_source_error, stripe_id

PAGE_ROWS = 500
# Grants bought with money (what a payment funds), a paid change of plan included.
PAID_GRANT_SOURCES = (GrantSource.TOP_UP, GrantSource.RENEWAL, GrantSource.PLAN_CHANGE)
# A run still marked running after this long died without cleaning up: its staged rows may be deleted.
ABANDONED_AFTER = timedelta(days=1)

# Subscription statuses, best first: a customer's access follows their best subscription.
SUBSCRIPTION_RANK = {
    "active": 0,
    "trialing": 1,
    "past_due": 2,
    "unpaid": 3,
    "paused": 4,
    "incomplete": 5,
    "canceled": 6,
    "incomplete_expired": 7,
}


@dataclass
class StagingStats:
    """How many Stripe objects of each kind were paged in, and how long paging took."""

    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Lists Stripe would not give, with why (one line each).
    missed: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


def _ts(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    return None


def _price_keys(price: Any) -> list[str]:
    if isinstance(price, str):
        return [price]
    if isinstance(price, Mapping):
        return [k for k in (price.get("id"), price.get("lookup_key")) if isinstance(k, str)]
    return []


def _fallback_credits(amount_minor: int, config: BillingConfig) -> int:
    credits = Decimal(amount_minor) * config.credits.fallback_credits_per_minor_unit
    return int(credits.to_integral_value(rounding=ROUND_FLOOR))


# Metadata an integration may set on a session or payment intent to say what was bought (as the worker reads it).
CREDITS_KEYS = ("credits",)
PRICE_KEYS = ("price_id", "price", "pack", "credit_pack")
RENEWAL_REASONS = ("subscription_create", "subscription_cycle")


def credits_from_metadata(meta: Any, config: BillingConfig) -> int | None:
    """Credits named by metadata (``credits``, or a pack's price and ``quantity``), if any."""
    if not isinstance(meta, Mapping):
        return None
    for key in CREDITS_KEYS:
        if key in meta:
            try:
                return int(str(meta[key]))
            except ValueError:
                return None
    for key in PRICE_KEYS:
        price = meta.get(key)
        if isinstance(price, str):
            pack = config.pack_for_price(price)
            if pack is None:
                return None
            try:
                quantity = max(1, int(str(meta.get("quantity") or 1)))
            except ValueError:
                quantity = 1
            return pack.credits * quantity
    return None


def expected_topup_credits(
    line_items: Iterable[Mapping[str, Any]], amount_total: int, config: BillingConfig, metadata: Any = None
) -> int:
    """Credits a paid top-up should grant: metadata, else packs by price id or lookup key, else the fallback
    rate per minor unit."""
    from_metadata = credits_from_metadata(metadata, config)
    if from_metadata is not None:
        return from_metadata
    total = 0
    matched_any = False
    unmatched_amount = 0
    for item in line_items:
        quantity = int(item.get("quantity") or 1)
        pack = next((p for k in _price_keys(item.get("price")) if (p := config.pack_for_price(k))), None)
        if pack is None:
            unmatched_amount += int(item.get("amount_total") or 0)
            continue
        matched_any = True
        total += pack.credits * quantity
    if not matched_any:
        return _fallback_credits(amount_total, config)
    return total + _fallback_credits(unmatched_amount, config)


def expected_invoice_credits(invoice: Mapping[str, Any], config: BillingConfig) -> int:
    """Credits a paid invoice should grant: each plan line's credits per period, else the fallback rate."""
    lines = invoice.get("lines")
    data = lines.get("data", []) if isinstance(lines, Mapping) else []
    total = 0
    matched = False
    for line in data:
        if not isinstance(line, Mapping) or _is_proration(line):
            continue
        price = line.get("price")
        if price is None and isinstance(line.get("pricing"), Mapping):
            details = line["pricing"].get("price_details") or {}
            price = details.get("price")
        plan = next((p for k in _price_keys(price) if (p := config.plan_for_price(k))), None)
        if plan is not None:
            matched = True
            total += plan.credits_per_period * int(line.get("quantity") or 1)
    if not matched:
        return _fallback_credits(int(invoice.get("amount_paid") or 0), config)
    return total


def _is_proration(line: Mapping[str, Any]) -> bool:
    if line.get("proration"):
        return True
    parent = line.get("parent")
    details = parent.get("subscription_item_details") if isinstance(parent, Mapping) else None
    return isinstance(details, Mapping) and bool(details.get("proration"))


def _invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    found = stripe_id(invoice.get("subscription"))
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    if found is None and isinstance(details, Mapping):
        found = stripe_id(details.get("subscription"))
    return found


def _invoice_refs(invoice: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(payment intent, charge) of an invoice, from the classic fields or the newer ``payments`` list."""
    pi = stripe_id(invoice.get("payment_intent"))
    charge = stripe_id(invoice.get("charge"))
    payments = invoice.get("payments")
    if (pi is None or charge is None) and isinstance(payments, Mapping):
        for p in payments.get("data") or []:
            payment = p.get("payment") if isinstance(p, Mapping) else None
            if isinstance(payment, Mapping):
                pi = pi or stripe_id(payment.get("payment_intent"))
                charge = charge or stripe_id(payment.get("charge"))
    return pi, charge


class Stager:
    """Writes one run's Stripe pages into the staging tables."""

    def __init__(
        self,
        session: Session,
        run_id: int,
        stripe: StripeSource,
        config: BillingConfig,
        *,
        on_page: Callable[[str, int], None] | None = None,
    ) -> None:
        self.session = session
        self.run_id = run_id
        self.stripe = stripe
        self.config = config
        self.stats = StagingStats()
        self._on_page = on_page or (lambda _kind, _n: None)
        dialect = session.get_bind().dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    # --- writing ---------------------------------------------------------------------------------------------

    def _flush(self, kind: str, objects: list[dict[str, Any]], aliases: list[dict[str, Any]]) -> None:
        if objects:
            self.session.execute(insert(StagedStripeObject), objects)
        if aliases:
            stmt = self._insert(StagedStripeAlias).on_conflict_do_nothing(index_elements=["run_id", "key"])
            self.session.execute(stmt, aliases)
        self.stats.add(kind, len(objects))
        self._on_page(kind, len(objects))

    def _pages(self, items: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        page: list[dict[str, Any]] = []
        for item in items:
            page.append(item)
            if len(page) >= PAGE_ROWS:
                yield page
                page = []
        if page:
            yield page

    def _row(self, object_type: str, obj: Mapping[str, Any], **values: Any) -> dict[str, Any]:
        row = {
            "run_id": self.run_id,
            "object_type": object_type,
            "object_id": obj["id"],
            "customer_id": stripe_id(obj.get("customer")),
            "ref": None,
            "status": obj.get("status"),
            "amount": None,
            "amount_refunded": None,
            "currency": (obj.get("currency") or None),
            "created": _ts(obj.get("created")),
            "expected_credits": None,
            "detail": {},
        }
        row.update(values)
        return row

    def _alias(self, key: str | None, payment_id: str) -> dict[str, Any] | None:
        return {"run_id": self.run_id, "key": key, "payment_id": payment_id} if key else None

    # --- each list ---------------------------------------------------------------------------------------------

    def stage_checkout_sessions(self, since: datetime, until: datetime) -> None:
        items = self.stripe.list_checkout_sessions(created_gte=since, created_lt=until, expand=["data.line_items"])
        for page in self._pages(items):
            objects: list[dict[str, Any]] = []
            aliases: list[dict[str, Any] | None] = []
            for cs in page:
                if cs.get("mode") != "payment" or cs.get("payment_status") != "paid":
                    continue
                line_items = cs.get("line_items")
                if isinstance(line_items, Mapping) and not line_items.get("has_more"):
                    items_data = list(line_items.get("data") or [])
                else:
                    items_data = self.stripe.retrieve_checkout_session_line_items(cs["id"])
                amount = int(cs.get("amount_total") or 0)
                pi = stripe_id(cs.get("payment_intent"))
                objects.append(
                    self._row(
                        "payment",
                        cs,
                        ref=pi,
                        status="paid",
                        amount=amount,
                        expected_credits=expected_topup_credits(items_data, amount, self.config, cs.get("metadata")),
                        detail={
                            "source": "checkout_session",
                            "payment_intent": pi,
                            "prices": [k for it in items_data for k in _price_keys(it.get("price"))[:1]],
                        },
                    )
                )
                aliases += [self._alias(cs["id"], cs["id"]), self._alias(pi, cs["id"])]
            self._flush("checkout_session", objects, [a for a in aliases if a])

    def stage_invoices(self, since: datetime, until: datetime) -> None:
        invoices = self.stripe.list_invoices(created_gte=since, created_lt=until, expand=["data.payments"])
        for page in self._pages(invoices):
            objects: list[dict[str, Any]] = []
            aliases: list[dict[str, Any] | None] = []
            for inv in page:
                paid = int(inv.get("amount_paid") or 0)
                if inv.get("status") == "paid" and inv.get("billing_reason") == "subscription_update":
                    if (change := self._plan_change_row(inv)) is not None:
                        objects.append(change)
                    continue
                if inv.get("status") != "paid" or paid <= 0 or inv.get("billing_reason") not in RENEWAL_REASONS:
                    continue  # only subscription periods buy credits
                pi, charge = _invoice_refs(inv)
                objects.append(
                    self._row(
                        "payment",
                        inv,
                        ref=pi,
                        amount=paid,
                        expected_credits=expected_invoice_credits(inv, self.config),
                        detail={
                            "source": "invoice",
                            "payment_intent": pi,
                            "charge": charge,
                            "subscription": _invoice_subscription(inv),
                            "billing_reason": inv.get("billing_reason"),
                        },
                    )
                )
                aliases += [self._alias(inv["id"], inv["id"]), self._alias(pi, inv["id"])]
                aliases.append(self._alias(charge, inv["id"]))
            self._flush("invoice", objects, [a for a in aliases if a])

    def _plan_change_row(self, inv: Mapping[str, Any]) -> dict[str, Any] | None:
        """A paid change of plan or quantity, with what the [plan_changes] policy says it should do."""
        lines = proration_lines(inv)
        if lines is None:
            return None
        try:
            effect = change_effect(self.config, old=lines.old, new=lines.new, changed_at=lines.changed_at,
                                   period_end=lines.period_end)  # fmt: skip
        except PlanNotConfigured as exc:
            action, units, explanation = "unknown", None, str(exc)
        else:
            action, units, explanation = effect.action.value, effect.units, effect.explanation
        pi, charge = _invoice_refs(inv)
        return self._row(
            "plan_change",
            inv,
            ref=pi,
            amount=int(inv.get("amount_paid") or 0),
            expected_credits=units,
            detail={
                "source": "invoice",
                "subscription": _invoice_subscription(inv),
                "action": action,
                "explanation": explanation,
                "changed_at": lines.changed_at.isoformat(),
                "period_end": lines.period_end.isoformat(),
                "payment_intent": pi,
                "charge": charge,
                "old_items": [[i.price, i.quantity] for i in lines.old],
                "new_items": [[i.price, i.quantity] for i in lines.new],
            },
        )

    def stage_charges(self, since: datetime, until: datetime) -> None:
        # The balance transaction says what the charge settled as (amount and currency after conversion, fee,
        # net): margin counts revenue in the settlement currency from it.
        listed = self.stripe.list_charges(created_gte=since, created_lt=until, expand=["data.balance_transaction"])
        for page in self._pages(listed):
            objects = []
            for ch in page:
                if not ch.get("paid") or ch.get("status") != "succeeded":
                    continue
                pi = stripe_id(ch.get("payment_intent"))
                bt = balance_transaction_detail(ch.get("balance_transaction"))
                problem = balance_transaction_problem(ch, bt)
                if problem is not None:
                    # Judged here, where the charge is in hand: the check reads only the few that disagree.
                    objects.append(
                        self._row(
                            "balance_transaction_problem",
                            ch,
                            ref=ch["id"],
                            amount=int(ch.get("amount_captured") or ch.get("amount") or 0),
                            detail={"problem": problem, "balance_transaction": bt, "payment_intent": pi},
                        )
                    )
                objects.append(
                    self._row(
                        "charge",
                        ch,
                        ref=stripe_id(ch.get("invoice")) or pi,
                        amount=int(ch.get("amount_captured") or ch.get("amount") or 0),
                        amount_refunded=int(ch.get("amount_refunded") or 0),
                        detail={
                            "payment_intent": pi,
                            "disputed": bool(ch.get("disputed")),
                            "invoice": stripe_id(ch.get("invoice")),
                            "description": ch.get("description"),
                            "metadata": ch.get("metadata") or {},
                            "balance_transaction": bt,
                        },
                    )
                )
            self._flush("charge", objects, [])
        self.analyze()
        self._stage_direct_payments()
        # A charge's own id is an alias of the payment it belongs to (a grant may name the charge).
        charges = StagedStripeObject
        aliases = StagedStripeAlias
        resolved = (
            select(literal(self.run_id), charges.object_id, aliases.payment_id)
            .join(aliases, (aliases.run_id == charges.run_id) & (aliases.key == charges.ref))
            .where(charges.run_id == self.run_id, charges.object_type == "charge", true())
        )
        stmt = (
            self._insert(StagedStripeAlias)
            .from_select(["run_id", "key", "payment_id"], resolved)
            .on_conflict_do_nothing(index_elements=["run_id", "key"])
        )
        self.session.execute(stmt)
        self.record_settlements()

    def record_settlements(self) -> None:
        """Keep each paid grant's settlement (its charge's balance transaction) in the ledger, for margin."""
        C = StagedStripeObject
        by_charge, by_payment = aliased(StagedStripeAlias), aliased(StagedStripeAlias)
        stmt = (
            select(Grant.id, C.object_id, C.created, C.amount, C.currency, C.detail)
            .join(by_charge, (by_charge.run_id == C.run_id) & (by_charge.key == C.object_id))
            .join(by_payment, (by_payment.run_id == C.run_id) & (by_payment.payment_id == by_charge.payment_id))
            .join(Grant, Grant.stripe_object_id == by_payment.key)
            .where(C.run_id == self.run_id, C.object_type == "charge", Grant.source.in_(PAID_GRANT_SOURCES))
            .order_by(Grant.id, C.id)
        )
        rows: dict[int, dict[str, Any]] = {}
        for grant_id, charge_id, created, amount, currency, detail in self.session.execute(stmt):
            bt = (detail or {}).get("balance_transaction")
            if not bt or grant_id in rows:
                continue
            rows[grant_id] = {
                "grant_id": grant_id,
                "charge_id": charge_id,
                "balance_transaction_id": bt.get("id"),
                "paid_at": created,
                "amount_minor": int(amount or 0),
                "currency": str(currency or "").lower()[:3],
                "settlement_minor": int(bt["amount"]),
                "settlement_currency": str(bt["currency"]).lower()[:3],
                "exchange_rate": Decimal(bt["exchange_rate"]) if bt.get("exchange_rate") else None,
                "fee_minor": int(bt.get("fee") or 0),
                "net_minor": int(bt.get("net") if bt.get("net") is not None else int(bt["amount"])),
                "recorded_at": datetime.now(UTC),
            }
        values = list(rows.values())
        for start in range(0, len(values), PAGE_ROWS):
            insert_stmt = self._insert(GrantSettlement)
            upsert = insert_stmt.on_conflict_do_update(
                index_elements=["grant_id"],
                set_={c: insert_stmt.excluded[c] for c in values[0] if c != "grant_id"},
            )
            self.session.execute(upsert, values[start : start + PAGE_ROWS])
        self.stats.add("settlement", len(values))

    def analyze(self) -> None:
        """Give PostgreSQL statistics on the staged rows, so joins with them are hash joins, not nested loops."""
        analyze_staging(self.session)

    def _stage_direct_payments(self) -> None:
        """Charges of a payment intent outside Checkout and invoices are top-ups too (the worker grants them)."""
        charges = StagedStripeObject
        aliases = StagedStripeAlias
        stmt = (
            select(charges)
            .outerjoin(aliases, (aliases.run_id == charges.run_id) & (aliases.key == charges.ref))
            .where(charges.run_id == self.run_id, charges.object_type == "charge", aliases.key.is_(None))
            .order_by(charges.id)
        )
        objects: list[dict[str, Any]] = []
        links: list[dict[str, Any] | None] = []
        for ch in list(self.session.scalars(stmt)):
            detail = ch.detail or {}
            pi = detail.get("payment_intent")
            description = detail.get("description") or ""
            if detail.get("invoice") or str(description).startswith("Subscription"):
                continue
            if pi:
                # Direct payments may also belong to a session created before the window; ask Stripe once.
                session = next(iter(self.stripe.list_checkout_sessions(payment_intent=pi)), None)
                if session is not None:
                    continue
            # A charge without a payment intent (the older Charges API) is a payment of its own, keyed by itself.
            key = pi or ch.object_id
            amount = int(ch.amount or 0)
            objects.append(
                {
                    "run_id": self.run_id,
                    "object_type": "payment",
                    "object_id": key,
                    "customer_id": ch.customer_id,
                    "ref": key,
                    "status": "paid",
                    "amount": amount,
                    "amount_refunded": None,
                    "currency": ch.currency,
                    "created": ch.created,
                    "expected_credits": expected_topup_credits([], amount, self.config, detail.get("metadata")),
                    "detail": {
                        "source": "payment_intent" if pi else "charge",
                        "payment_intent": pi,
                        "charge": ch.object_id,
                    },
                }
            )
            links += [self._alias(key, key), self._alias(ch.object_id, key)]
        self._flush("payment_intent", objects, [a for a in links if a])

    def stage_refunds(self, since: datetime, until: datetime) -> None:
        listed = self.stripe.list_refunds(created_gte=since, created_lt=until, expand=["data.balance_transaction"])
        for page in self._pages(listed):
            objects = []
            for re in page:
                if re.get("status") not in ("succeeded", "pending"):
                    continue
                charge = stripe_id(re.get("charge"))
                bt = balance_transaction_detail(re.get("balance_transaction"))
                problem = refund_balance_transaction_problem(re, bt)
                if problem is not None:
                    objects.append(
                        self._row(
                            "balance_transaction_problem",
                            re,
                            ref=re["id"],
                            amount=int(re.get("amount") or 0),
                            detail={
                                "problem": problem,
                                "balance_transaction": bt,
                                "object": "refund",
                                "charge": charge,
                            },
                        )
                    )
                objects.append(
                    self._row(
                        "refund",
                        re,
                        ref=charge,
                        amount=int(re.get("amount") or 0),
                        detail={
                            "payment_intent": stripe_id(re.get("payment_intent")),
                            "charge": charge,
                            "balance_transaction": bt,
                        },
                    )
                )
            self._flush("refund", objects, [])
        self.record_refund_settlements()

    def record_refund_settlements(self) -> None:
        """Keep what each refund of a paid grant's charge took from the balance (its balance transaction)."""
        R = StagedStripeObject
        stmt = (
            select(GrantSettlement.grant_id, R.object_id, R.ref, R.created, R.amount, R.currency, R.detail)
            .join(GrantSettlement, GrantSettlement.charge_id == R.ref)
            .where(R.run_id == self.run_id, R.object_type == "refund")
            .order_by(R.id)
        )
        values = []
        for grant_id, refund_id, charge_id, created, amount, currency, detail in self.session.execute(stmt):
            bt = (detail or {}).get("balance_transaction")
            if not bt:
                continue
            values.append(
                {
                    "refund_id": refund_id,
                    "grant_id": grant_id,
                    "charge_id": charge_id,
                    "balance_transaction_id": bt.get("id"),
                    "refunded_at": created,
                    "amount_minor": int(amount or 0),
                    "currency": str(currency or "").lower()[:3],
                    "settlement_minor": -int(bt["amount"]),
                    "settlement_currency": str(bt["currency"]).lower()[:3],
                    "exchange_rate": Decimal(bt["exchange_rate"]) if bt.get("exchange_rate") else None,
                    "fee_minor": int(bt.get("fee") or 0),
                    "recorded_at": datetime.now(UTC),
                }
            )
        for start in range(0, len(values), PAGE_ROWS):
            insert_stmt = self._insert(RefundSettlement)
            upsert = insert_stmt.on_conflict_do_update(
                index_elements=["refund_id"],
                set_={c: insert_stmt.excluded[c] for c in values[0] if c != "refund_id"},
            )
            self.session.execute(upsert, values[start : start + PAGE_ROWS])
        self.stats.add("refund_settlement", len(values))

    def stage_disputes(self, since: datetime, until: datetime) -> None:
        for page in self._pages(self.stripe.list_disputes(created_gte=since, created_lt=until)):
            objects = []
            for dp in page:
                charge = stripe_id(dp.get("charge"))
                objects.append(
                    self._row(
                        "dispute",
                        dp,
                        ref=charge,
                        amount=int(dp.get("amount") or 0),
                        detail={"payment_intent": stripe_id(dp.get("payment_intent")), "charge": charge},
                    )
                )
            self._flush("dispute", objects, [])

    def stage_subscriptions(self) -> None:
        # Every subscription, whatever its age: access state is a property of now, not of the window.
        for page in self._pages(self.stripe.list_subscriptions(status="all")):
            objects = [
                self._row(
                    "subscription",
                    sub,
                    amount=SUBSCRIPTION_RANK.get(str(sub.get("status")), len(SUBSCRIPTION_RANK)),
                    detail={"current_period_end": sub.get("current_period_end")},
                )
                for sub in page
            ]
            self._flush("subscription", objects, [])

    def stage_events(self, since: datetime, until: datetime) -> None:
        for page in self._pages(self.stripe.list_events(created_gte=since, created_lt=until)):
            objects = []
            for ev in page:
                data = ev.get("data")
                obj = data.get("object") if isinstance(data, Mapping) else None
                objects.append(
                    self._row(
                        "event",
                        ev,
                        customer_id=event_customer(obj),
                        ref=stripe_id(obj.get("id")) if isinstance(obj, Mapping) else None,
                        status=str(ev.get("type") or "")[:64],
                        currency=None,
                        detail={"related": related_ids(obj)},
                    )
                )
            self._flush("event", objects, [])

    def stage_payouts(self, since: datetime, until: datetime) -> None:
        """Payouts created in the window, and every balance transaction each paid out."""
        for page in self._pages(self.stripe.list_payouts(created_gte=since, created_lt=until)):
            objects: list[dict[str, Any]] = []
            for po in page:
                objects.append(
                    self._row(
                        "payout",
                        po,
                        amount=int(po.get("amount") or 0),
                        detail={"arrival_date": po.get("arrival_date"), "balance_transaction": stripe_id(
                            po.get("balance_transaction"))},
                    )
                )  # fmt: skip
                if po.get("status") in ("failed", "canceled"):
                    continue  # kept with its status; what it carried goes back to the balance, paid out again
                for txn in self.stripe.list_balance_transactions(payout=po["id"]):
                    objects.append(
                        self._row(
                            "payout_txn",
                            txn,
                            customer_id=None,
                            ref=po["id"],
                            status=str(txn.get("type") or "")[:64],
                            amount=int(txn.get("amount") or 0),
                            detail={
                                "source": stripe_id(txn.get("source")),
                                "fee": int(txn.get("fee") or 0),
                                "net": int(txn.get("net") or 0),
                                "reporting_category": txn.get("reporting_category"),
                            },
                        )
                    )
                    if len(objects) >= PAGE_ROWS:
                        # A payout may carry a whole day's transactions: written a page at a time, never held.
                        self._flush("payout", objects, [])
                        objects = []
            self._flush("payout", objects, [])

    def stage_all(self, since: datetime, until: datetime) -> StagingStats:
        """Page in every list the checks use. A list Stripe will not give (a restricted key without that
        permission, 404, 5xx after the gateway's retries) is recorded in ``stats.missed`` and the others go on:
        the engine skips the checks that need it."""
        import time

        started = time.perf_counter()
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("checkout_session", lambda: self.stage_checkout_sessions(since, until)),
            ("invoice", lambda: self.stage_invoices(since, until)),
            ("charge", lambda: self.stage_charges(since, until)),
            ("refund", lambda: self.stage_refunds(since, until)),
            ("dispute", lambda: self.stage_disputes(since, until)),
            ("subscription", self.stage_subscriptions),
            ("event", lambda: self.stage_events(since, until)),
            ("payout", lambda: self.stage_payouts(since, until)),
        )
        for source, stage in steps:
            try:
                stage()
            except Exception as exc:
                if not is_source_error(exc):
                    raise
                self.stats.missed[source] = describe_source_error(exc)
        self.stats.seconds = time.perf_counter() - started
        return self.stats


# Fields by which an object without a customer of its own (a dispute, a refund) leads to one that has it.
RELATED_FIELDS = ("charge", "payment_intent", "invoice", "subscription")


def event_customer(obj: Any) -> str | None:
    """The customer an event's object names: its ``customer``, or itself when it is a customer."""
    if not isinstance(obj, Mapping):
        return None
    if obj.get("object") == "customer":
        return stripe_id(obj.get("id"))
    return stripe_id(obj.get("customer"))


def related_ids(obj: Any) -> list[str]:
    """Ids an event's object points to (its charge, payment intent, invoice, subscription)."""
    if not isinstance(obj, Mapping):
        return []
    return [found for name in RELATED_FIELDS if (found := stripe_id(obj.get(name)))]


def balance_transaction_detail(value: Any) -> dict[str, Any] | None:
    """What staging keeps of an expanded balance transaction (None when it was not expanded)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("amount"), int):
        return None
    rate = value.get("exchange_rate")
    return {
        "id": value.get("id"),
        "source": value.get("source") if isinstance(value.get("source"), str) else None,
        "amount": value["amount"],
        "currency": value.get("currency"),
        # A JSON number on the wire: its shortest repr is the rate Stripe sent.
        "exchange_rate": str(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) else None,
        "fee": value.get("fee"),
        "net": value.get("net"),
        "fee_details": [
            {"amount": f.get("amount"), "currency": f.get("currency"), "type": f.get("type")}
            for f in value.get("fee_details") or []
            if isinstance(f, Mapping)
        ],
    }


def balance_transaction_problem(charge: Mapping[str, Any], bt: Mapping[str, Any] | None) -> str | None:
    """Why a succeeded charge's balance transaction is missing or disagrees with it; None when it agrees.

    A charge's balance transaction has the charge as its source, the charged amount (in the charge's currency,
    or converted at its ``exchange_rate`` into the settlement currency) and ``net = amount - fee``.
    https://docs.stripe.com/api/balance_transactions/object
    """
    if bt is None:
        if charge.get("captured") is False:
            return None  # an authorization not captured yet has no balance transaction until it is
        raw = charge.get("balance_transaction")
        return "has no balance transaction" if raw is None else "its balance transaction could not be read"
    amount = int(charge.get("amount_captured") or charge.get("amount") or 0)
    currency = str(charge.get("currency") or "").lower()
    source = bt.get("source")
    if source is not None and source != charge.get("id"):
        return f"its balance transaction {bt.get('id')} belongs to {source}"
    fee = int(bt.get("fee") or 0)
    if bt.get("net") is not None and int(bt["net"]) != int(bt["amount"]) - fee:
        return f"its balance transaction's net {bt['net']} is not amount {bt['amount']} minus fee {fee}"
    if str(bt.get("currency") or "").lower() == currency:
        if int(bt["amount"]) != amount:
            return f"its balance transaction is for {bt['amount']} {currency}, the charge for {amount}"
    elif bt.get("exchange_rate") is None:
        return f"its balance transaction is in {bt.get('currency')} with no exchange rate from {currency}"
    return None


def refund_balance_transaction_problem(refund: Mapping[str, Any], bt: Mapping[str, Any] | None) -> str | None:
    """Why a refund's balance transaction is missing or disagrees with it (the refunded amount leaves the
    balance: amount = -refund amount in the same currency); None when it agrees or the refund is pending."""
    if bt is None:
        if refund.get("status") == "pending":
            return None
        raw = refund.get("balance_transaction")
        return "has no balance transaction" if raw is None else "its balance transaction could not be read"
    amount = int(refund.get("amount") or 0)
    currency = str(refund.get("currency") or "").lower()
    source = bt.get("source")
    if source is not None and source != refund.get("id"):
        return f"its balance transaction {bt.get('id')} belongs to {source}"
    if str(bt.get("currency") or "").lower() == currency and -int(bt["amount"]) != amount:
        return f"its balance transaction takes {-int(bt['amount'])} {currency} for a refund of {amount}"
    return None


def analyze_staging(session: Session) -> None:
    """ANALYZE the staging tables on PostgreSQL (fresh rows have no statistics, and without them the planner
    joins them to the ledger with nested loops, which at a million entries costs seconds).

    The plans need row counts, distinct counts and the commonest values of a few columns, not fine histograms:
    statistics target 10 samples 3,000 rows instead of 30,000, several times cheaper (for this transaction only).
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    target = session.scalar(text("SELECT current_setting('default_statistics_target')"))
    session.execute(text("SELECT set_config('default_statistics_target', '10', true)"))
    session.execute(text("ANALYZE reconciliation_stripe_objects"))
    session.execute(text("ANALYZE reconciliation_stripe_aliases"))
    session.execute(text("SELECT set_config('default_statistics_target', :target, true)"), {"target": target})


def clear_staging(session: Session, run_id: int) -> None:
    """Delete a run's staged Stripe rows (they are scratch space, not history).

    On PostgreSQL, when no other run is live, both tables are truncated instead: constant time, where deleting
    a million-entry window's rows one by one costs tens of milliseconds.
    """
    if _truncate_when_alone(session, run_id):
        return
    session.execute(delete(StagedStripeObject).where(StagedStripeObject.run_id == run_id))
    session.execute(delete(StagedStripeAlias).where(StagedStripeAlias.run_id == run_id))


_STAGING_TABLES = "reconciliation_stripe_objects, reconciliation_stripe_aliases"


def _truncate_when_alone(session: Session, run_id: int) -> bool:
    """TRUNCATE the staging tables if no other live run may have rows there; False when it did not."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    try:
        # The lock first, then the look at other runs: a run stages only after its run row is committed, and its
        # staging transaction holds a lock on these tables, so once we hold ours any run that has (or is writing)
        # rows here is visible, and any later one writes after our commit. NOWAIT: a run staging right now means
        # we are not alone, and its paging may take minutes.
        with session.begin_nested():
            session.execute(text(f"LOCK TABLE {_STAGING_TABLES} IN ACCESS EXCLUSIVE MODE NOWAIT"))
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        return False
    others = select(ReconciliationRun.id).where(
        ReconciliationRun.id != run_id,
        ReconciliationRun.status == RunStatus.RUNNING,
        ReconciliationRun.started_at >= datetime.now(UTC) - ABANDONED_AFTER,
    )
    if session.execute(others.limit(1)).first() is not None:
        return False
    session.execute(text(f"TRUNCATE {_STAGING_TABLES}"))
    return True


_LOCK_NOT_AVAILABLE = "55P03"


def clear_abandoned_staging(session: Session, *, older_than: datetime) -> None:
    """Delete staged rows of runs that died without cleaning up (a killed process): failed or finished runs,
    and runs still marked running that started before ``older_than``."""
    live = select(ReconciliationRun.id).where(
        ReconciliationRun.status == RunStatus.RUNNING, ReconciliationRun.started_at >= older_than
    )
    session.execute(delete(StagedStripeObject).where(StagedStripeObject.run_id.not_in(live)))
    session.execute(delete(StagedStripeAlias).where(StagedStripeAlias.run_id.not_in(live)))
