"""The credit ledger: the source of truth for credits, holds, usage and access state."""
