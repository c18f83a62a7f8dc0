"""Moved to ``reconciliation.gateway`` (the gateway sits below its users: reconciliation and the worker).

A re-export for branches written before the move; new code imports ``reconciliation.gateway``.
"""

from reconciliation.gateway import EVENTS_RETENTION_DAYS, StripeGateway, StripeReader, get_gateway

__all__ = ["EVENTS_RETENTION_DAYS", "StripeGateway", "StripeReader", "get_gateway"]
