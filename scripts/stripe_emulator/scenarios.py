"""Ready-made activity: a month of a small AI product's billing, for the demo and for tests of others.

    store = Store(clock=Clock(datetime.now(UTC) - timedelta(days=33)))   # the month ends about now
    month = demo_month(store)
    store.deliver_webhooks(url, secret, duplicates=0.2, shuffle=True, seed=1)

``python -m stripe_emulator --load stripe_emulator.scenarios:demo_month`` serves the same from a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .store import Store


@dataclass
class DemoMonth:
    """What ``demo_month`` made, by role, so a demo or a test can name it."""

    customers: dict[str, str] = field(default_factory=dict)  # role -> customer id
    topups: list[str] = field(default_factory=list)  # checkout session ids
    subscriptions: dict[str, str] = field(default_factory=dict)  # role -> subscription id
    failed_invoice: str | None = None
    refund: str | None = None
    dispute: str | None = None


def demo_month(store: Store) -> DemoMonth:
    """Five customers over one billing period (and a day) from the store's clock: top-ups, a subscription that
    renews, one whose renewal fails and then recovers, a partial refund and a lost dispute."""
    month = DemoMonth()
    roles = ("ada", "grace", "linus", "margaret", "alan")
    for role in roles:
        customer = store.create_customer(email=f"{role}@example.com", name=role.capitalize())
        month.customers[role] = customer.id
    store.clock.advance(hours=1)
    month.topups.append(store.topup(month.customers["ada"], "price_credits_small").id)
    month.subscriptions["grace"] = store.create_subscription(month.customers["grace"], "price_pro_monthly").id
    month.subscriptions["linus"] = store.create_subscription(month.customers["linus"], "price_team_monthly").id
    store.clock.advance(days=2)
    refunded = store.topup(month.customers["margaret"], "price_credits_large")
    month.topups.append(refunded.id)
    disputed = store.topup(month.customers["alan"], "price_credits_small")
    month.topups.append(disputed.id)
    store.clock.advance(days=3)
    month.refund = store.refund(refunded, 2500, reason="requested_by_customer").id
    store.clock.advance(days=2)
    dispute = store.create_dispute(disputed, reason="fraudulent")
    month.dispute = dispute.id
    store.clock.advance(days=5)
    month.topups.append(store.topup(month.customers["ada"], "price_credits_large").id)
    store.close_dispute(dispute, won=False)
    # Linus's card starts declining: his renewal fails, then he fixes it and the retry pays.
    store.set_card_declines(month.customers["linus"])
    period_end = max(store.get(sub_id).current_period_end for sub_id in month.subscriptions.values())
    renewals = store.advance(period_end + 3600 - store.clock.now())
    failed = next((i for i in renewals if i.subscription == month.subscriptions["linus"]), None)
    if failed is not None and failed.status == "open":
        month.failed_invoice = failed.id
        store.set_card_declines(month.customers["linus"], False)
        store.clock.advance(hours=20)
        store.retry_invoice(failed)
    store.clock.advance(hours=3)
    return month
