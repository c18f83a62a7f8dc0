"""A dataset builder for the standalone-process test (``--load emulator.dataset:build``-style hook)."""

from __future__ import annotations

from stripe_emulator import Store


def build(store: Store) -> None:
    """Three customers with one top-up each."""
    for index in range(3):
        store.topup(store.create_customer(email=f"loaded{index}@example.com"))
