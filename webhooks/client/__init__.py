"""A Python client of the usage API, and metering of OpenAI and Anthropic calls through it.

    from webhooks.client import Billing
    billing = Billing("https://billing.internal", token)
    openai = billing.wrap_openai(OpenAI(), customer_id="cus_123", user_id="u_42", feature="chat")

Only httpx, pydantic and tenacity are needed: nothing of the ledger or a database (it is a client over HTTP).
"""

from webhooks.client.aio import AsyncBilling
from webhooks.client.errors import (
    AccessRefused,
    BillingError,
    BillingUnavailable,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LimitExceeded,
    NotEntitled,
    SettlementFailed,
    Unauthorized,
    UnknownCustomer,
    UnknownHold,
)
from webhooks.client.metering import AsyncMetered, Call, Metered
from webhooks.client.models import (
    Balance,
    BatchResult,
    Capture,
    Charge,
    EntriesPage,
    Entry,
    Funding,
    Grant,
    Hold,
    UsageEvent,
    UsageFields,
    UsageReport,
    UsageRow,
)
from webhooks.client.sync import Billing

__all__ = [
    "AccessRefused",
    "AsyncBilling",
    "AsyncMetered",
    "Balance",
    "BatchResult",
    "Billing",
    "BillingError",
    "BillingUnavailable",
    "Call",
    "Capture",
    "Charge",
    "EntriesPage",
    "Entry",
    "Funding",
    "Grant",
    "Hold",
    "HoldNotOpen",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidRequest",
    "LimitExceeded",
    "Metered",
    "NotEntitled",
    "SettlementFailed",
    "Unauthorized",
    "UnknownCustomer",
    "UnknownHold",
    "UsageEvent",
    "UsageFields",
    "UsageReport",
    "UsageRow",
]
