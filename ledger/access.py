"""The access policy: which grant sources an account may spend in its access state ([access.spend]).

What was paid for is never taken away: by default a canceled customer, or one past their grace deadline, keeps
spending top-ups, promotions and adjustments (not plan credits); a suspended (unpaid) one spends nothing. Both
consumption paths apply it: the portable path here, PostgreSQL's functions from ``ledger_access_policy``, which
:func:`sync_access_policy` keeps equal to the config.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from ledger.config import ACCESS_POLICY_KEYS, BillingConfig, get_billing_config
from ledger.models import AccessState


def policy_key(state: AccessState, grace_until: datetime | None, now: datetime) -> str:
    """The access-policy key of an account's state at ``now`` (past_due splits at its grace deadline)."""
    if state is AccessState.PAST_DUE and grace_until is not None and now >= grace_until:
        return "past_due_after_grace"
    return state.value


def spendable_sources(
    state: AccessState, grace_until: datetime | None, now: datetime, config: BillingConfig | None = None
) -> frozenset[str] | None:
    """The grant sources the account may spend now: None for all, an empty set for none."""
    return (config or get_billing_config()).access.sources_for(policy_key(state, grace_until, now))


def describe_refusal(state: str) -> str:
    """Why PostgreSQL's function refused an account in ``state`` (a refused past_due is past its deadline)."""
    key = "past_due_after_grace" if state == AccessState.PAST_DUE.value else state
    return refusal_reason(key, get_billing_config().access.sources_for(key))


def refusal_reason(key: str, sources: frozenset[str] | None) -> str:
    """Why a consumption in this access-policy key was refused, for a person."""
    if not sources:
        return f"{key} accounts may not spend any credits"
    return f"{key} accounts may spend only {', '.join(sorted(sources))} credits, and those do not cover it"


def sync_access_policy(session: Session, config: BillingConfig | None = None) -> None:
    """Write the config's policy into ``ledger_access_policy`` (PostgreSQL's functions read it there)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    access = (config or get_billing_config()).access
    rows = []
    for key in ACCESS_POLICY_KEYS:
        sources = access.sources_for(key)
        rows.append({"k": key, "s": None if sources is None else ",".join(sorted(sources))})
    session.execute(
        text(
            "INSERT INTO ledger_access_policy (policy_key, sources) VALUES (:k, :s) "
            "ON CONFLICT (policy_key) DO UPDATE SET sources = EXCLUDED.sources "
            "WHERE ledger_access_policy.sources IS DISTINCT FROM EXCLUDED.sources"
        ),
        rows,
    )
