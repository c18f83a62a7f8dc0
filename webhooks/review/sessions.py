"""Sign-in sessions and the sign-in throttle, kept in the database.

A session is a row named by the SHA-256 of a random token; the signed cookie carries the token. Signing out
deletes the row, so a copy of the cookie opens nothing afterwards; a password change ends the reviewer's sessions
(the cookie's password fingerprint no longer matches, and the rows are deleted when next seen). Failed sign-ins are
rows too, counted per (name, client address) and per client address: every server process sees the same counts,
a restart forgets none, and a stranger's guesses lock out only the stranger's address, never the real user.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select

from ledger.db import unit_of_work
from webhooks.review.models import ReviewLoginFailure, ReviewSession


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(username: str, *, lifetime_seconds: int, now: datetime | None = None) -> str:
    """Record a new session for ``username``; return the token the cookie carries."""
    now = now or datetime.now(UTC)
    token = secrets.token_urlsafe(32)
    with unit_of_work() as session:
        # Expired sessions go when someone signs in: the table holds only live ones (and never grows unbounded).
        session.execute(delete(ReviewSession).where(ReviewSession.expires_at <= now))
        session.add(
            ReviewSession(
                token_hash=_hash(token),
                username=username,
                created_at=now,
                expires_at=now + timedelta(seconds=lifetime_seconds),
            )
        )
    return token


def session_is_live(token: str, username: str, *, now: datetime | None = None) -> bool:
    """True when ``token`` names a session of ``username`` that was not ended and has not expired."""
    now = now or datetime.now(UTC)
    with unit_of_work() as session:
        row = session.get(ReviewSession, _hash(token))
        if row is None or row.username != username:
            return False
        expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
        return expires > now


def end_session(token: str) -> None:
    """End one session (sign-out)."""
    with unit_of_work() as session:
        session.execute(delete(ReviewSession).where(ReviewSession.token_hash == _hash(token)))


def end_sessions_of(username: str) -> int:
    """End every session of ``username`` (their password changed); return how many."""
    with unit_of_work() as session:
        result = session.execute(delete(ReviewSession).where(ReviewSession.username == username))
        return int(getattr(result, "rowcount", 0) or 0)


class LoginThrottle:
    """Refuses sign-in from an address after too many recent failures for that name there, or for any name there."""

    def __init__(
        self, max_failures: int = 10, window_seconds: float = 900.0, max_failures_per_address: int = 100
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_failures_per_address = max_failures_per_address

    def _since(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.window_seconds)

    def blocked(self, name: str, address: str, *, now: datetime | None = None) -> bool:
        """True while this name has too many recent failures from this address, or the address has for any name."""
        now = now or datetime.now(UTC)
        since = self._since(now)
        recent = ReviewLoginFailure.failed_at > since
        with unit_of_work() as session:
            pair = session.scalar(
                select(func.count())
                .select_from(ReviewLoginFailure)
                .where(
                    ReviewLoginFailure.username == name.lower()[:255],
                    ReviewLoginFailure.client_address == address[:64],
                    recent,
                )
            )
            if int(pair or 0) >= self.max_failures:
                return True
            anywhere = session.scalar(
                select(func.count())
                .select_from(ReviewLoginFailure)
                .where(ReviewLoginFailure.client_address == address[:64], recent)
            )
            return int(anywhere or 0) >= self.max_failures_per_address

    def failed(self, name: str, address: str, *, now: datetime | None = None) -> None:
        """Count a failed sign-in for ``name`` from ``address`` (and forget this address's expired failures)."""
        now = now or datetime.now(UTC)
        with unit_of_work() as session:
            session.execute(
                delete(ReviewLoginFailure).where(
                    ReviewLoginFailure.client_address == address[:64],
                    ReviewLoginFailure.failed_at <= self._since(now),
                )
            )
            session.add(ReviewLoginFailure(username=name.lower()[:255], client_address=address[:64], failed_at=now))

    def succeeded(self, name: str, address: str) -> None:
        """Forget the failures of a name that signed in from this address."""
        with unit_of_work() as session:
            session.execute(
                delete(ReviewLoginFailure).where(
                    ReviewLoginFailure.username == name.lower()[:255],
                    ReviewLoginFailure.client_address == address[:64],
                )
            )
