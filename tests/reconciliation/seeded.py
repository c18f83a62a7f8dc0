"""A month of Stripe activity for a few hundred customers, the ledger that processing it would produce, and
faults injected on one side or the other, each recorded with the mismatch it must produce."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import update
from stripe_emulator import Store

from ledger.clawback import clawback
from ledger.db import session_factory
from ledger.grants import grant_credits
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import AccessState, GrantSource
from reconciliation.models import MismatchKind
from tests.reconciliation import builders as b


@dataclass
class SeededWorld:
    since: datetime
    until: datetime
    reports: list[Path]
    # kind -> identities of the mismatches the injected faults must produce
    expected: dict[MismatchKind, set[str]] = field(default_factory=lambda: defaultdict(set))

    def fingerprints(self) -> set[tuple[MismatchKind, str]]:
        return {(k, b.fingerprint(k, i)) for k, ids in self.expected.items() for i in ids}


def build(store: Store, out: Path, *, customers: int = 200, faults: int = 30, seed: int = 7) -> SeededWorld:
    """Make the month in ``store`` (whose clock starts at the window's start) and the ledger; inject faults."""
    rng = random.Random(seed)
    clock = store.clock
    since = clock.now_datetime()
    until = since + timedelta(days=30)
    world = SeededWorld(since=since, until=until, reports=[])
    exp = world.expected

    ids = [store.create_customer(email=f"c{i}@example.com", name=f"Customer {i}").id for i in range(customers)]
    usage_customers = ids[:60]
    payers = ids[60:]
    subscribers = ids[100:]

    # --- Stripe: top-ups over the first days, then subscriptions ---------------------------------------------
    clock.advance(hours=1)
    usage_topups = []
    for c in usage_customers:
        usage_topups.append(store.topup(c, "price_credits_large").id)
        clock.advance(minutes=7)
    topups: list[tuple[str, str]] = []  # (customer, session id)
    for _round in range(2):
        for c in payers:
            price = rng.choice(("price_credits_small", "price_credits_large"))
            topups.append((c, store.topup(c, price).id))
            clock.advance(minutes=9)
    subs = []
    for c in subscribers:
        subs.append(store.create_subscription(c, "price_pro_monthly").id)
        clock.advance(minutes=11)

    rng.shuffle(topups)
    cursor = 0

    def take(n: int) -> list[tuple[str, str]]:
        nonlocal cursor
        chosen = topups[cursor : cursor + n]
        cursor += n
        assert len(chosen) == n, "not enough top-ups for the faults asked for"
        return chosen

    no_grant = take(faults)
    short = take(faults)
    doubled = take(faults)
    refunded = take(faults + 15)
    disputed = take(faults + 15)
    clean = topups[cursor:]
    seen: set[str] = set()
    total_faults = []
    for c, cs in clean:
        if c not in seen and len(total_faults) < faults:
            seen.add(c)
            total_faults.append((c, cs))
    assert len(total_faults) == faults

    # --- Stripe: refunds and disputes in the second week ----------------------------------------------------
    clock.advance(days=7)
    charge_of = {cs: store.get(store.get(cs).payment_intent).latest_charge for _, cs in topups}
    refund_amounts: dict[str, int] = {}
    for i, (_, cs) in enumerate(refunded):
        amount = store.get(cs).amount_total
        refund_amounts[cs] = amount if i % 2 else amount // 2
        store.refund(charge_of[cs], refund_amounts[cs])
        clock.advance(minutes=13)
    disputes = {}
    for _, cs in disputed:
        disputes[cs] = store.create_dispute(charge_of[cs]).id
        clock.advance(minutes=13)
    clock.advance(days=3)
    # A third of the disputes stay open, a third are won, a third lost.
    fates = {cs: ("open", "won", "lost")[i % 3] for i, (_, cs) in enumerate(disputed)}
    for cs, fate in fates.items():
        if fate != "open":
            store.close_dispute(disputes[cs], won=fate == "won")
            clock.advance(minutes=5)
    clock.advance(days=2)
    canceled = subs[:15]
    for sub in canceled:
        store.cancel_subscription(sub)
        clock.advance(minutes=5)
    clock.advance(days=5)

    # --- Ledger: what processing all of that produces, with faults left in --------------------------------
    factory = session_factory()
    with factory.begin() as s:
        for cs in usage_topups:
            b.grant_topup(s, store, cs)
        for c, cs in topups:
            if (c, cs) in no_grant:
                exp[MismatchKind.PAYMENT_WITHOUT_GRANT].add(cs)
                continue
            if (c, cs) in short:
                b.grant_topup(
                    s,
                    store,
                    cs,
                    units=b.get_billing_config().pack_for_price(store.get(cs).line_items[0].price).credits + 7,
                )  # type: ignore[union-attr]
                exp[MismatchKind.AMOUNT_MISMATCH].add(cs)
                continue
            if (c, cs) in total_faults:
                b.grant_topup(s, store, cs, amount_minor=store.get(cs).amount_total + 100)
                exp[MismatchKind.CUSTOMER_TOTAL_MISMATCH].add(f"{c}|usd|{since.isoformat()}|{until.isoformat()}")
                continue
            b.grant_topup(s, store, cs)
            if (c, cs) in doubled:
                b.grant_topup(s, store, cs, key=f"replayed-without-key:{cs}")
                exp[MismatchKind.DUPLICATE_GRANT].add(cs)
        for sub in subs:
            b.grant_renewal(s, store, store.get(sub).latest_invoice)

    # Usage on the first 27 days, every provider and model, by the customers who bought large packs.
    with factory.begin() as s:
        n = 0
        for day in range(1, 28):
            for provider, model, scope in b.MODELS:
                for c in rng.sample(usage_customers, 2):
                    n += 1
                    b.record_usage(
                        s,
                        c,
                        f"seed-{n}",
                        provider=provider,
                        model=model,
                        workspace=scope,
                        at=since + timedelta(days=day, hours=rng.randrange(24)),
                        input_tokens=rng.randrange(10_000, 200_000),
                        output_tokens=rng.randrange(5_000, 50_000),
                        cached_tokens=rng.randrange(0, 10_000),
                    )

    with factory.begin() as s:
        for i, (_, cs) in enumerate(refunded):
            grant = b.grant_of(s, store.get(cs).payment_intent)
            if i < faults:
                exp[MismatchKind.REFUND_NOT_CLAWED_BACK].add(charge_of[cs])
                continue
            b.claw_refund(s, grant, refund_amounts[cs], f"refund:{cs}")
        faulty_disputes = set(cs for _, cs in disputed[:faults])
        for _, cs in disputed:
            grant = b.grant_of(s, store.get(cs).payment_intent)
            fate = fates[cs]
            if cs in faulty_disputes:
                exp[MismatchKind.DISPUTE_NOT_APPLIED].add(disputes[cs])
                if fate == "open":
                    continue  # never frozen
                b.freeze(s, grant, f"dispute:{cs}")  # won: never unfrozen; lost: never clawed back
                continue
            b.freeze(s, grant, f"dispute:{cs}")
            if fate == "won":
                b.unfreeze(s, grant, f"dispute:{cs}")
            elif fate == "lost":
                clawback(s, grant.id, units=grant.units, idempotency_key=f"lost:{cs}", reason="dispute lost")

        # Access state from each subscription's status; some accounts drifted.
        drifted = rng.sample([x for x in subs if x not in canceled], faults)
        for sub in subs:
            record = store.get(sub)
            state = b.ACCESS_BY_STATUS[record.status]
            if sub in drifted:
                state = AccessState.SUSPENDED
                exp[MismatchKind.ACCESS_STATE_DRIFT].add(record.customer)
            b.set_access(s, record.customer, state, clock.now_datetime(), sub)

        # Grants naming payments Stripe never saw.
        for i in range(faults):
            c = payers[i]
            g = grant_credits(
                s,
                c,
                units=500,
                source=GrantSource.TOP_UP,
                idempotency_key=f"ghost:{i}",
                stripe_object_id=f"pi_ghost{i:020d}",
                stripe_object_type="payment_intent",
            )
            exp[MismatchKind.GRANT_WITHOUT_PAYMENT].add(str(g.grant_id))

    # The inbox: every event stored and processed, but some never arrived and some are stuck.
    events = store.events()
    order = list(range(len(events)))
    rng.shuffle(order)
    missed = {events[i]["id"] for i in order[:faults]}
    stuck = [events[i]["id"] for i in order[faults : 2 * faults]]
    with factory.begin() as s:
        b.store_all_events(s, [e for e in events if e["id"] not in missed], status=EventStatus.PROCESSED)
        old = datetime.now(UTC) - timedelta(hours=3)
        for i, event_id in enumerate(stuck):
            status = (EventStatus.FAILED, EventStatus.WAITING, EventStatus.PENDING)[i % 3]
            s.execute(
                update(StripeEvent).where(StripeEvent.event_id == event_id).values(status=status, received_at=old)
            )
    exp[MismatchKind.MISSED_EVENT] |= missed
    exp[MismatchKind.UNPROCESSED_EVENT] |= set(stuck)

    # Provider reports written from the ledger's usage, with drift injected into some days' lines.
    with factory.begin() as s:
        groups = b.usage_groups(s)
    keys = sorted(groups)
    rng.shuffle(keys)
    cost_keys, usage_keys = keys[:faults], keys[faults : 2 * faults]
    cost_drift = {k: Decimal(rng.choice(("1.25", "0.75", "2.00"))) for k in cost_keys}
    usage_drift = {k: rng.choice((25_000, -4_000)) for k in usage_keys}
    for provider, day, model, scope in cost_keys:
        exp[MismatchKind.PROVIDER_COST_DRIFT].add(f"{provider}|{day.isoformat()}|{model}|{scope}")
    for provider, day, model, scope in usage_keys:
        exp[MismatchKind.PROVIDER_USAGE_DRIFT].add(f"{provider}|{day.isoformat()}|{model}|{scope}")
    world.reports = b.write_reports(out, groups, cost_drift=cost_drift, usage_drift=usage_drift)
    return world
