"""The access policy ([access.spend]): which grant sources each access state may spend, in consumption and holds,
on SQLite, PostgreSQL's functions and PostgreSQL's portable path. Default: canceled, and past_due past its grace
deadline, spend top-ups (promotions, adjustments) but not plan credits; suspended spends nothing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import grant_remaining, make_account, make_consume, make_grant, make_hold
from sqlalchemy import Engine

from ledger.access import sync_access_policy
from ledger.accounts import set_access_state
from ledger.config import EXAMPLE_CONFIG_PATH, Access, ConfigError, load_billing_config
from ledger.db import unit_of_work
from ledger.errors import AccessRefused, InsufficientCredits
from ledger.holds import capture_hold
from ledger.models import AccessState, GrantSource

NOW = datetime.now(UTC)


def customer_in(
    state: AccessState, *, plan: int = 50, top_up: int = 30, grace: datetime | None = None
) -> tuple[str, int, int]:
    """An account holding plan credits (priority 10: drawn first when allowed) and a top-up, in ``state``."""
    customer = make_account()
    plan_grant = make_grant(customer_id=customer, units=plan, source=GrantSource.RENEWAL, priority=10).grant_id
    top_up_grant = make_grant(customer_id=customer, units=top_up, source=GrantSource.TOP_UP).grant_id
    with unit_of_work() as session:
        set_access_state(session, customer, state, as_of=NOW, source="test", grace_until=grace)
    return customer, plan_grant, top_up_grant


class TestConsumption:
    def test_canceled_spends_top_ups_not_plan_credits(self, ledger_engine: Engine) -> None:
        customer, plan, top_up = customer_in(AccessState.CANCELED)
        result = make_consume(customer_id=customer, units=20)
        assert (result.units, result.balance_after) == (20, 60)
        assert (grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (50, 10)

    def test_active_draws_plan_credits_first(self, ledger_engine: Engine) -> None:
        customer, plan, top_up = customer_in(AccessState.ACTIVE)
        make_consume(customer_id=customer, units=20)
        assert (grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (30, 30)

    def test_what_only_plan_credits_would_cover_is_refused_as_access_with_the_reason(
        self, ledger_engine: Engine
    ) -> None:
        customer, plan, top_up = customer_in(AccessState.CANCELED)
        with pytest.raises(AccessRefused) as refused:
            make_consume(customer_id=customer, units=40)  # 30 top-up units; 80 in all
        assert refused.value.state == "canceled"
        assert "top_up" in str(refused.value) and "renewal" not in str(refused.value)
        assert (grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (50, 30)

    def test_more_than_everything_is_insufficient_with_what_may_be_spent(self, ledger_engine: Engine) -> None:
        customer, _, _ = customer_in(AccessState.CANCELED)
        with pytest.raises(InsufficientCredits) as short:
            make_consume(customer_id=customer, units=100)
        assert short.value.available == 30

    def test_suspended_spends_nothing(self, ledger_engine: Engine) -> None:
        customer, _, top_up = customer_in(AccessState.SUSPENDED)
        with pytest.raises(AccessRefused) as refused:
            make_consume(customer_id=customer, units=1)
        assert refused.value.state == "suspended" and "may not spend any credits" in str(refused.value)
        assert grant_remaining(top_up)[0] == 30

    def test_past_due_spends_everything_until_its_grace_deadline_then_top_ups_only(self, ledger_engine: Engine) -> None:
        in_grace, plan_a, _ = customer_in(AccessState.PAST_DUE, grace=NOW + timedelta(days=1))
        late, plan_b, top_up_b = customer_in(AccessState.PAST_DUE, grace=NOW - timedelta(seconds=1))
        make_consume(customer_id=in_grace, units=20)
        make_consume(customer_id=late, units=20)
        assert grant_remaining(plan_a)[0] == 30
        assert (grant_remaining(plan_b)[0], grant_remaining(top_up_b)[0]) == (50, 10)


class TestHolds:
    def test_a_canceled_hold_and_its_capture_draw_top_ups_only(self, ledger_engine: Engine) -> None:
        customer, plan, top_up = customer_in(AccessState.CANCELED)
        hold = make_hold(customer_id=customer, units=20)
        assert (hold.units, grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (20, 50, 10)
        with unit_of_work() as session:
            captured = capture_hold(session, hold.request_id, units=35)
        # 15 more wanted beyond the hold: the top-up's last 10 cover part of it, plan credits none.
        assert (captured.captured, captured.shortfall) == (30, 5)
        assert (grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (50, 0)

    def test_a_hold_only_plan_credits_would_cover_is_refused_as_access(self, ledger_engine: Engine) -> None:
        customer, _, _ = customer_in(AccessState.CANCELED)
        with pytest.raises(AccessRefused):
            make_hold(customer_id=customer, units=40)


class TestConfiguredPolicy:
    def test_a_policy_from_the_config_applies_on_every_path(
        self, ledger_engine: Engine, billing_config_file: Callable[[str], Path]
    ) -> None:
        billing_config_file('[access.spend]\ncanceled = []\nsuspended = ["top_up"]\n')
        with unit_of_work() as session:
            sync_access_policy(session)
        canceled, _, _ = customer_in(AccessState.CANCELED)
        suspended, plan, top_up = customer_in(AccessState.SUSPENDED)
        with pytest.raises(AccessRefused):
            make_consume(customer_id=canceled, units=1)
        make_consume(customer_id=suspended, units=5)
        assert (grant_remaining(plan)[0], grant_remaining(top_up)[0]) == (50, 25)
        billing_config_file("")
        with unit_of_work() as session:
            sync_access_policy(session)  # back to the default for the tests that follow on this database


class TestPolicyConfig:
    def test_a_bad_policy_names_the_field(self, tmp_path: Path) -> None:
        path = tmp_path / "billing.toml"
        path.write_text('[access.spend]\ncanceled = ["top_ups"]\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=r"access.*spend\.canceled: unknown grant sources \['top_ups'\]"):
            load_billing_config(path)
        path.write_text("[access.spend]\ngone = []\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"spend\.gone: not an access state"):
            load_billing_config(path)

    def test_the_shipped_example_states_the_default(self) -> None:
        example = load_billing_config(EXAMPLE_CONFIG_PATH).access
        assert {k: example.sources_for(k) for k in example.spend} == {
            k: Access().sources_for(k) for k in Access().spend
        }
