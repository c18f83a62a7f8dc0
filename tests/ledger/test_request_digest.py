"""The request digest that tells a retry from a reused request id must not change between versions.

A digest stored by an earlier version is compared with the digest of a retry computed by this one, so the digest
of a known request is pinned here, worked out by hand from its definition (sha256 of the sorted, compact JSON of
the request's fields), not by calling the code under test.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from ledger.consume import ConsumeInput, consume_digest
from ledger.pricing import UsageInput

USAGE = UsageInput(
    user_id="u_1", feature="chat", provider="openai", model="gpt-4o", input_tokens=120, output_tokens=30,
    cached_tokens=20, provider_cost_usd=Decimal("0.00125"), occurred_at=datetime(2026, 12, 1, 8, 30, tzinfo=UTC),
)  # fmt: skip


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_usage_consumption_digest_is_the_documented_one() -> None:
    expected = _sha(
        '{"customer_id":"cus_1","reason":"r","units":null,"usage":{"billable":true,"cached_tokens":20,'
        '"environment":"production","feature":"chat","input_tokens":120,"model":"gpt-4o",'
        '"occurred_at":"2026-12-01 08:30:00+00:00","operation":null,"output_tokens":30,'
        '"provider":"openai","provider_cost_usd":"0.00125","user_id":"u_1","workspace":null}}'
    )
    assert consume_digest(ConsumeInput("cus_1", "req_1", None, USAGE, "api", "r")) == expected


def test_a_plain_charge_digest_is_the_documented_one() -> None:
    expected = _sha('{"customer_id":"cus_1","reason":"","units":7,"usage":null}')
    assert consume_digest(ConsumeInput("cus_1", "req_1", 7)) == expected


@given(
    customer_id=st.text(max_size=40),
    reason=st.text(max_size=40),
    units=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
)
def test_a_plain_charge_digest_is_the_sorted_compact_json_of_its_fields(
    customer_id: str, reason: str, units: int | None
) -> None:
    # The definition, written independently of the code under test: json.dumps of the fields, sorted, compact.
    body = json.dumps(
        {"customer_id": customer_id, "units": units, "usage": None, "reason": reason},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert consume_digest(ConsumeInput(customer_id, "req_1", units, None, "api", reason)) == _sha(body)
