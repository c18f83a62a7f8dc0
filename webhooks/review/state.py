"""Process-wide inputs of the review app, read from settings."""

from __future__ import annotations

from ledger.settings import get_settings
from webhooks.review.auth import ReviewUser, configured_users


def review_users() -> dict[str, ReviewUser]:
    """The users allowed to sign in, from REVIEW_USERS."""
    return configured_users(get_settings().review_users.get_secret_value())
