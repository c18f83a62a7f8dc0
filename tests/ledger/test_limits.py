"""Limits and entitlements: which limits apply, their windows, and atomic reservations on both backends."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger import pgfast
from ledger.accounts import open_account
from ledger.config import BillingConfig, LimitWindow
from ledger.db import unit_of_work
from ledger.errors import LimitExceeded, NotEntitled
from ledger.limits import (
    CustomerPlans,
    LimitRequest,
    applicable_limits,
    check_request,
    customer_plans,
    entitlement_refusal,
    limit_request,
    limit_usage,
    matches,
    release_limits,
    reserve_limits,
    scope_value,
    window_bounds,
)
from ledger.models import GrantSource, OutboxEvent
from tests.ledger.factories import make_grant, race_at_limit, unique

PLANS = """
[[plans]]
price = "price_free"
name = "Free"
credits_per_period = 100
allow_models = ["gpt-4o-mini*"]
allow_operations = ["text"]

[[plans]]
price = "price_pro"
name = "Pro"
credits_per_period = 2000
"""


def config(body: str) -> BillingConfig:
    return BillingConfig.model_validate(tomllib.loads(PLANS + body))


NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


class TestRules:
    def test_matchers_exact_and_glob(self) -> None:
        assert matches(None, None) and matches(None, "x")
        assert matches("gpt-4*", "gpt-4o-2024-08-06")
        assert not matches("gpt-4*", "gpt-3.5-turbo")
        assert not matches("image", None)  # a matcher never matches a missing field
        assert matches("image", "image") and not matches("image", "images")

    def test_windows_are_utc_calendar_units(self) -> None:
        assert window_bounds(LimitWindow.HOUR, NOW) == (
            datetime(2026, 3, 14, 15, tzinfo=UTC),
            datetime(2026, 3, 14, 16, tzinfo=UTC),
        )
        assert window_bounds(LimitWindow.DAY, NOW) == (
            datetime(2026, 3, 14, tzinfo=UTC),
            datetime(2026, 3, 15, tzinfo=UTC),
        )
        december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
        assert window_bounds(LimitWindow.MONTH, december) == (
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        )
        # Another time zone is the same instant: the window is still the UTC day.
        from zoneinfo import ZoneInfo

        tokyo = datetime(2026, 3, 15, 0, 30, tzinfo=ZoneInfo("Asia/Tokyo"))  # 15:30 UTC on the 14th
        assert window_bounds(LimitWindow.DAY, tokyo)[0] == datetime(2026, 3, 14, tzinfo=UTC)

    def test_billing_period_uses_the_subscription_period_else_the_month(self) -> None:
        period = (datetime(2026, 3, 5, 8, tzinfo=UTC), datetime(2026, 4, 5, 8, tzinfo=UTC))
        assert window_bounds(LimitWindow.BILLING_PERIOD, NOW, period) == period
        assert window_bounds(LimitWindow.BILLING_PERIOD, NOW, None) == (
            datetime(2026, 3, 1, tzinfo=UTC),
            datetime(2026, 4, 1, tzinfo=UTC),
        )
        stale = (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 2, 5, tzinfo=UTC))
        assert window_bounds(LimitWindow.BILLING_PERIOD, NOW, stale)[0] == datetime(2026, 3, 1, tzinfo=UTC)

    def test_applicable_limits_by_plan_and_matchers(self) -> None:
        cfg = config(
            """
[[limits]]
name = "pro-images"
plans = ["price_pro"]
scope = "user"
operation = "image"
window = "day"
max_requests = 50

[[limits]]
name = "gpt4-tokens"
model = "gpt-4*"
window = "month"
max_tokens = 1000000
"""
        )
        image = LimitRequest(operation="image", user_id="u1")
        assert [lim.name for lim in applicable_limits(cfg, ["price_pro"], image)] == ["pro-images"]
        assert applicable_limits(cfg, ["price_free"], image) == []
        gpt4 = LimitRequest(model="gpt-4o-2024-08-06")
        assert [lim.name for lim in applicable_limits(cfg, [], gpt4)] == ["gpt4-tokens"]
        per_user = cfg.limits[0]
        assert scope_value(per_user, "cus_1", image) == "cus_1/user:u1"
        # No user id: counted under the customer, never let through uncounted.
        assert scope_value(per_user, "cus_1", LimitRequest(operation="image")) == "cus_1"

    def test_limit_request_from_a_usage(self) -> None:
        from ledger.pricing import UsageInput

        usage = UsageInput(user_id="u1", feature="chat", provider="openai", model="gpt-4o-2024-08-06",
                           input_tokens=1000, output_tokens=500, cached_tokens=200)  # fmt: skip
        cfg = BillingConfig.model_validate(
            tomllib.loads(
                '[[models]]\nprovider = "openai"\nmodel = "gpt-4o-2024-08-06"\ncredits_per_million_input = "500"\n'
                'credits_per_million_output = "2000"\ncost_per_million_input_usd = "2.50"\n'
                'cost_per_million_output_usd = "10.00"\ncost_per_million_cached_usd = "1.25"\n'
            )
        )
        request = limit_request(usage, units=2, config=cfg)
        # 1000 x 2.50 + 500 x 10.00 + 200 x 1.25 per million = 0.00775 USD
        assert (request.tokens, request.cost_usd, request.user_id, request.units) == (1700, Decimal("0.00775"), "u1", 2)
        reported = limit_request(UsageInput(model="m", provider_cost_usd=Decimal("0.5")), units=0, config=cfg)
        assert reported.cost_usd == Decimal("0.5") and limit_request(None, units=7).units == 7

    def test_entitlements_union_of_plans_and_globs(self) -> None:
        cfg = config("")
        refusal = entitlement_refusal(cfg, "cus_1", ["price_free"], LimitRequest(model="gpt-4o-2024-08-06"))
        assert isinstance(refusal, NotEntitled) and refusal.what == "model" and refusal.code == "not_entitled"
        assert entitlement_refusal(cfg, "cus_1", ["price_free"], LimitRequest(model="gpt-4o-mini-2024-07-18")) is None
        refusal = entitlement_refusal(cfg, "cus_1", ["price_free"], LimitRequest(operation="image"))
        assert refusal is not None and refusal.what == "operation"
        # Pro allows everything, so a customer on both plans may use what either allows.
        assert entitlement_refusal(cfg, "cus_1", ["price_free", "price_pro"], LimitRequest(operation="image")) is None
        assert entitlement_refusal(cfg, "cus_1", [], LimitRequest(operation="image")) is None


ONE_LIMIT = """
[[limits]]
name = "images-per-user"
scope = "user"
operation = "image"
window = "day"
max_requests = 3
"""


def _outbox_types(engine: Engine) -> list[str]:
    with unit_of_work() as session:
        return list(session.scalars(select(OutboxEvent.type).order_by(OutboxEvent.id)))


class TestReserve:
    def test_up_to_the_maximum_then_refused_with_details(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        request = LimitRequest(operation="image", user_id="u1")
        for expected_used in (1, 2, 3):
            with unit_of_work() as session:
                (taken,) = reserve_limits(session, customer, request, now=NOW, config=cfg)
                assert taken.used == expected_used
        with unit_of_work() as session, pytest.raises(LimitExceeded) as info:
            reserve_limits(session, customer, request, now=NOW, config=cfg)
        exc = info.value
        assert (exc.limit, exc.used, exc.maximum, exc.code) == ("images-per-user", 3, 3, "limit_exceeded")
        assert exc.reset_at == datetime(2026, 3, 15, tzinfo=UTC)
        # Another user has their own room; the next day is a new window.
        with unit_of_work() as session:
            reserve_limits(session, customer, LimitRequest(operation="image", user_id="u2"), now=NOW, config=cfg)
            reserve_limits(session, customer, request, now=NOW + timedelta(days=1), config=cfg)
            # A text call is not covered at all.
            text_call = LimitRequest(operation="text", user_id="u1")
            assert reserve_limits(session, customer, text_call, now=NOW, config=cfg) == []
        # limit.reached once: when u1's counter reached 3 (u2 and the next day are at 1); the same on every path.
        assert _outbox_types(ledger_engine) == ["limit.reached"]
        with unit_of_work() as session:
            (data,) = session.scalars(select(OutboxEvent.data)).all()
        assert data == {
            "limit": "images-per-user",
            "scope": "user",
            "scope_value": f"{customer}/user:u1",
            "measure": "requests",
            "used": 3,
            "maximum": 3,
            "window_start": "2026-03-14T00:00:00+00:00",
            "reset_at": "2026-03-15T00:00:00+00:00",
        }

    def test_without_user_id_counted_under_the_customer(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        anonymous = LimitRequest(operation="image")
        with unit_of_work() as session:
            for _ in range(3):
                reserve_limits(session, customer, anonymous, now=NOW, config=cfg)
            with pytest.raises(LimitExceeded) as info:
                reserve_limits(session, customer, anonymous, now=NOW, config=cfg)
            assert info.value.scope_value == customer

    def test_release_gives_room_back_and_never_below_zero(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        request = LimitRequest(operation="image", user_id="u1")
        with unit_of_work() as session:
            for _ in range(3):
                reserve_limits(session, customer, request, now=NOW, config=cfg)
            assert release_limits(session, customer, request, reserved_at=NOW, config=cfg) == 1
            reserve_limits(session, customer, request, now=NOW, config=cfg)
            for _ in range(5):
                release_limits(session, customer, request, reserved_at=NOW, config=cfg)
            (status,) = limit_usage(session, customer, now=NOW, user_id="u1", config=cfg, plans=CustomerPlans())
            assert (status.used, status.remaining) == (0, 3)

    def test_refusal_gives_back_room_taken_in_other_limits(self, ledger_engine: Engine) -> None:
        cfg = config(
            """
[[limits]]
name = "a-units-daily"
window = "day"
max_units = 1000

[[limits]]
name = "b-units-hourly"
window = "hour"
max_units = 100
"""
        )
        customer = unique("cus")
        with unit_of_work() as session:
            reserve_limits(session, customer, LimitRequest(units=80), now=NOW, config=cfg)
            with pytest.raises(LimitExceeded) as info:
                reserve_limits(session, customer, LimitRequest(units=30), now=NOW, config=cfg)
            assert (info.value.limit, info.value.used, info.value.requested) == ("b-units-hourly", 80, 30)
            used = {s.limit: s.used for s in limit_usage(session, customer, now=NOW, config=cfg)}
            assert used == {"a-units-daily": 80, "b-units-hourly": 80}

    def test_cost_limit_is_exact_decimal(self, ledger_engine: Engine) -> None:
        cfg = config('[[limits]]\nname = "spend"\nwindow = "month"\nmax_cost_usd = "0.30"\n')
        customer = unique("cus")
        with unit_of_work() as session:
            for _ in range(3):
                reserve_limits(session, customer, LimitRequest(cost_usd=Decimal("0.1")), now=NOW, config=cfg)
            with pytest.raises(LimitExceeded) as info:
                reserve_limits(session, customer, LimitRequest(cost_usd=Decimal("0.0000000001")), now=NOW, config=cfg)
            assert info.value.used == Decimal("0.3")

    def test_rolled_back_reservation_takes_no_room(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        request = LimitRequest(operation="image", user_id="u1")
        with pytest.raises(RuntimeError), unit_of_work() as session:
            reserve_limits(session, customer, request, now=NOW, config=cfg)
            raise RuntimeError("the consumption failed after the reservation")
        with unit_of_work() as session:
            (status,) = limit_usage(session, customer, now=NOW, user_id="u1", config=cfg)
            assert status.used == 0

    def test_entitlement_refused_before_any_counter(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        with unit_of_work() as session, pytest.raises(NotEntitled):
            reserve_limits(
                session,
                "cus_x",
                LimitRequest(operation="image"),
                now=NOW,
                config=cfg,
                plans=CustomerPlans(("price_free",)),
            )

    def test_check_reads_only(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        request = LimitRequest(operation="image", user_id="u1")
        with unit_of_work() as session:
            for _ in range(3):
                verdict = check_request(session, customer, request, now=NOW, config=cfg)
                assert verdict.allowed
            for _ in range(3):
                reserve_limits(session, customer, request, now=NOW, config=cfg)
            verdict = check_request(session, customer, request, now=NOW, config=cfg)
            assert (verdict.allowed, verdict.code) == (False, "limit_exceeded")

    def test_plans_and_period_from_renewal_grants(self, ledger_engine: Engine) -> None:
        cfg = config("")
        customer = unique("cus")
        start, end = datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 4, 5, tzinfo=UTC)
        from ledger.grants import grant_credits

        with unit_of_work() as session:
            open_account(session, customer)
            grant_credits(
                session, customer, units=2000, source=GrantSource.RENEWAL, idempotency_key=unique("renewal"),
                reason="Pro subscription_cycle in_1 (subscription sub_1)", period_start=start, period_end=end,
            )  # fmt: skip
        make_grant(customer_id=customer, units=5)  # a top-up names no plan
        with unit_of_work() as session:
            found = customer_plans(session, customer, NOW, config=cfg)
        assert found == CustomerPlans(("price_pro",), (start, end))
        with unit_of_work() as session:
            assert customer_plans(session, customer, end + timedelta(seconds=1), config=cfg) == CustomerPlans()


class TestPlansFromSubscriptions:
    """A customer's plans come from its subscriptions (issue 13's table); renewal grants only when it has none."""

    START, END = datetime(2026, 3, 5, 8, tzinfo=UTC), datetime(2026, 4, 5, 8, tzinfo=UTC)

    def subscribe(self, customer: str, subscription_id: str, price: str, status: str) -> None:
        from ledger.models import AccessState
        from ledger.subscriptions import SubscriptionFacts, record_subscription

        facts = SubscriptionFacts(subscription_id, status, price, current_period_start=self.START,
                                  current_period_end=self.END)  # fmt: skip
        with unit_of_work() as session:
            record_subscription(session, customer, facts, access=AccessState.ACTIVE, as_of=NOW, source="test")

    def renewal(self, customer: str, reason: str) -> None:
        from ledger.grants import grant_credits

        with unit_of_work() as session:
            grant_credits(
                session, customer, units=2000, source=GrantSource.RENEWAL, idempotency_key=unique("renewal"),
                reason=reason, period_start=datetime(2026, 3, 1, tzinfo=UTC),
                period_end=datetime(2026, 4, 1, tzinfo=UTC),
            )  # fmt: skip

    def plans(self, customer: str, cfg: BillingConfig) -> CustomerPlans:
        with unit_of_work() as session:
            return customer_plans(session, customer, NOW, config=cfg)

    def test_subscriptions_win_over_renewal_grants(self, ledger_engine: Engine) -> None:
        cfg = config("")
        customer = unique("cus")
        self.renewal(customer, "Pro subscription_cycle in_1 (subscription sub_old)")
        assert self.plans(customer, cfg) == CustomerPlans(
            ("price_pro",), (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
        )
        self.subscribe(customer, unique("sub"), "price_free", "active")
        assert self.plans(customer, cfg) == CustomerPlans(("price_free",), (self.START, self.END))

    def test_live_statuses_only_and_several_plans(self, ledger_engine: Engine) -> None:
        cfg = config("")
        customer = unique("cus")
        self.subscribe(customer, "sub_a", "price_pro", "canceled")
        assert self.plans(customer, cfg) == CustomerPlans()  # on record, none live: no plan (no fallback)
        self.subscribe(customer, "sub_b", "price_free", "trialing")
        self.subscribe(customer, "sub_c", "price_pro", "past_due")
        self.subscribe(customer, "sub_d", "price_unknown", "active")  # not a plan of the config
        assert set(self.plans(customer, cfg).plans) == {"price_free", "price_pro"}

    def test_entitlements_follow_the_subscription(self, ledger_engine: Engine) -> None:
        cfg = config(ONE_LIMIT)
        customer = unique("cus")
        self.subscribe(customer, unique("sub"), "price_free", "active")
        gpt4 = LimitRequest(operation="text", model="gpt-4o")
        with unit_of_work() as session, pytest.raises(NotEntitled) as info:
            reserve_limits(session, customer, gpt4, now=NOW, config=cfg)
        assert (info.value.code, info.value.what) == ("not_entitled", "model")
        with unit_of_work() as session:
            assert reserve_limits(session, customer, LimitRequest(operation="text", model="gpt-4o-mini"),
                                  now=NOW, config=cfg) == []  # fmt: skip


@pytest.mark.postgres
class TestRace:
    @pytest.mark.parametrize("in_function", [True, False], ids=["limits_reserve", "portable"])
    @pytest.mark.parametrize("with_user", [True, False], ids=["user", "no-user"])
    def test_64_threads_at_a_limit_of_n(self, pg_engine: Engine, with_user: bool, in_function: bool) -> None:
        limit = 17
        cfg = config(ONE_LIMIT.replace("max_requests = 3", f"max_requests = {limit}"))
        customer = unique("cus")
        request = LimitRequest(operation="image", user_id="u1" if with_user else None)

        def reserve(i: int) -> int:
            with unit_of_work() as session:
                reserve_limits(session, customer, request, now=NOW, config=cfg)
            return i

        passed, refused, errors = race_at_limit(64, reserve, on_thread=lambda: pgfast.use_function(in_function))
        assert errors == []
        assert (len(passed), len(refused)) == (limit, 64 - limit)
        with unit_of_work() as session:
            (status,) = limit_usage(session, customer, now=NOW, user_id="u1" if with_user else None, config=cfg)
            assert status.used == limit
            assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 1  # limit.reached once


class TestConfig:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ('[[limits]]\nname = "a"\nwindow = "day"\n', "exactly one of max_requests"),
            ('[[limits]]\nname = "a"\nwindow = "day"\nmax_requests = 1\nmax_units = 2\n', "got max_requests"),
            ('[[limits]]\nname = "a"\nwindow = "week"\nmax_requests = 1\n', "limits.0.window"),
            ('[[limits]]\nname = "a"\nscope = "team"\nwindow = "day"\nmax_requests = 1\n', "limits.0.scope"),
            ('[[limits]]\nname = "a"\nwindow = "day"\nmax_cost_usd = 0.1\n', "limits.0.max_cost_usd"),
            ('[[limits]]\nname = "a"\nwindow = "day"\nmax_requests = -1\n', "limits.0.max_requests"),
            # Counters are BIGINTs, a cost in 10^-10 USD: 10^9 USD would not fit one (at most ~9.2 x 10^8).
            ('[[limits]]\nname = "a"\nwindow = "day"\nmax_cost_usd = "1000000000"\n', "limits.0.max_cost_usd"),
            ('[[limits]]\nname = "a"\nwindow = "day"\nmax_requests = 1\n' * 2, "limits.name: duplicate"),
            ('[[limits]]\nname = "a"\nplans = ["nope"]\nwindow = "day"\nmax_requests = 1\n', "limits.0.plans"),
            ('[[plans]]\nprice = "p"\ncredits_per_period = 1\nlow_balance_units = 5\nlow_balance_share = "0.1"\n',
             "at most one of low_balance_units"),
            ('[[plans]]\nprice = "p"\ncredits_per_period = 1\non_spike = "panic"\n', "plans.0.on_spike"),
            ('[[notifications.endpoints]]\nurl = "ftp://x"\nsecret_env = "S"\n', "notifications.endpoints.0.url"),
            ('[[notifications.endpoints]]\nurl = "https://x"\nsecret_env = "not a name"\n',
             "notifications.endpoints.0.secret_env"),
        ],
    )  # fmt: skip
    def test_invalid_field_is_named(self, billing_config_file: Any, body: str, field: str) -> None:
        from ledger.config import ConfigError, load_billing_config

        path = billing_config_file(body)
        with pytest.raises(ConfigError) as info:
            load_billing_config(path)
        assert field in str(info.value)

    def test_the_issue_example_is_valid(self) -> None:
        cfg = config(
            """
[[limits]]
name = "pro-images-per-user-daily"
plans = ["price_pro"]
scope = "user"
operation = "image"
window = "day"
max_requests = 50
"""
        )
        (limit,) = cfg.limits
        assert (limit.maximum, limit.measure.value, limit.window) == (50, "requests", LimitWindow.DAY)


class TestReplayAfterPlanChange:
    """A retry of a consumption is recognized as a replay before the customer's plan is asked, on every path: its
    answer is the first one, though the plan the customer is on now would refuse the call."""

    CONFIG = """
[[limits]]
name = "requests-daily"
window = "day"
max_requests = 100
"""

    def setup(self, billing_config_file: Any) -> tuple[str, Any]:
        from ledger.consume import ConsumeInput
        from ledger.pricing import UsageInput

        billing_config_file(PLANS + self.CONFIG)
        customer = unique("cus")
        make_grant(customer_id=customer, units=50)
        self.subscribe(customer, "price_pro", NOW)
        gpt4 = UsageInput(operation="text", model="gpt-4o")  # the Pro plan allows it, the Free plan does not
        return customer, lambda request_id, units=7: ConsumeInput(customer, request_id, units=units, usage=gpt4)

    def subscribe(self, customer: str, price: str, as_of: datetime) -> None:
        from ledger.models import AccessState
        from ledger.subscriptions import SubscriptionFacts, record_subscription

        with unit_of_work() as session:
            facts = SubscriptionFacts("sub_1", "active", price)
            record_subscription(session, customer, facts, access=AccessState.ACTIVE, as_of=as_of, source="test")

    def to_free_plan(self, customer: str) -> None:
        self.subscribe(customer, "price_free", NOW + timedelta(minutes=1))

    def test_a_batch_replays_and_refuses_only_the_new_call(
        self, ledger_engine: Engine, billing_config_file: Any
    ) -> None:
        from ledger.consume import consume_batch
        from ledger.errors import IdempotencyConflict

        customer, call = self.setup(billing_config_file)
        (first,) = consume_batch([call("r1")])
        assert (first.units, first.balance_after, first.replayed) == (7, 43, False)
        self.to_free_plan(customer)
        again, new, other = consume_batch([call("r1"), call("r2"), call("r1", units=8)])
        assert (again.units, again.balance_after, again.replayed, again.entry_id) == (7, 43, True, first.entry_id)
        assert isinstance(new, NotEntitled) and new.what == "model"
        assert isinstance(other, IdempotencyConflict)  # the same id with another body is still a conflict
        with unit_of_work() as session:
            (status,) = limit_usage(session, customer, now=datetime.now(UTC))
        assert status.used == 1  # the replay took no room

    def test_in_a_unit_of_work(self, ledger_engine: Engine, billing_config_file: Any) -> None:
        from ledger.consume import consume

        customer, call = self.setup(billing_config_file)
        item = call("r1")
        with unit_of_work() as session:
            first = consume(session, customer, request_id="r1", units=7, usage=item.usage)
        self.to_free_plan(customer)
        with unit_of_work() as session:
            again = consume(session, customer, request_id="r1", units=7, usage=item.usage)
            assert (again.balance_after, again.replayed, again.entry_id) == (43, True, first.entry_id)
            with pytest.raises(NotEntitled):
                consume(session, customer, request_id="r2", units=7, usage=item.usage)

    def test_a_hold_replays_and_refuses_only_the_new_one(self, ledger_engine: Engine, billing_config_file: Any) -> None:
        from ledger.errors import IdempotencyConflict
        from ledger.holds import place_hold_standalone

        customer, call = self.setup(billing_config_file)
        usage = call("h1").usage
        first = place_hold_standalone(customer, request_id="h1", units=7, usage=usage)
        assert (first.units, first.balance_after, first.replayed) == (7, 43, False)
        self.to_free_plan(customer)
        again = place_hold_standalone(customer, request_id="h1", units=7, usage=usage)
        assert (again.units, again.balance_after, again.replayed) == (7, 43, True)
        with pytest.raises(NotEntitled):
            place_hold_standalone(customer, request_id="h2", units=7, usage=usage)
        with pytest.raises(IdempotencyConflict):  # the same id with another body is still a conflict
            place_hold_standalone(customer, request_id="h1", units=8, usage=usage)
        with unit_of_work() as session:
            (status,) = limit_usage(session, customer, now=datetime.now(UTC))
        assert status.used == 1  # the replay took no room
