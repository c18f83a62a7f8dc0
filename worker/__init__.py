"""Celery app and tasks that turn stored Stripe events into ledger effects."""
