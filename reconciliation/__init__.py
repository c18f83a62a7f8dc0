"""Nightly reconciliation of the ledger against Stripe and AI provider cost reports."""
