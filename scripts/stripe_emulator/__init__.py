"""A local Stripe emulator for tests, benchmarks and the demo: Stripe's wire format, a Python API that makes
activity as Stripe would (with the events Stripe sends), signed webhook delivery and fault injection.

    store = Store()
    server = EmulatorServer(store).start()
    client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})
"""

from .clock import Clock, to_timestamp
from .faults import Faults
from .records import Record
from .render import is_basil_or_later
from .scenarios import DemoMonth, demo_month
from .server import EmulatorServer, stripe_error
from .store import DEFAULT_API_VERSION, PRE_BASIL_API_VERSION, EmulatorError, NotFound, Store
from .webhooks import Delivery, DeliveryReport, WebhookEndpoint, deliver_webhooks, sign_payload

__all__ = [
    "DEFAULT_API_VERSION",
    "PRE_BASIL_API_VERSION",
    "Clock",
    "Delivery",
    "DeliveryReport",
    "DemoMonth",
    "EmulatorError",
    "EmulatorServer",
    "Faults",
    "NotFound",
    "Record",
    "Store",
    "WebhookEndpoint",
    "deliver_webhooks",
    "demo_month",
    "is_basil_or_later",
    "sign_payload",
    "stripe_error",
    "to_timestamp",
]
