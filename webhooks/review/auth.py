"""Who may use the review pages: users with scrypt password hashes, signed session cookies, CSRF tokens.

Users come from the ``REVIEW_USERS`` setting as ``name:hash`` pairs separated by commas, where ``hash`` is
``scrypt$<n>$<r>$<p>$<salt b64>$<key b64>`` (see :func:`hash_password`). The session is a row in the database
(webhooks.review.sessions) named by a random token in a cookie signed with ``SECRET_KEY`` (Starlette's
SessionMiddleware); the cookie also carries the user's name, a fingerprint of their stored hash (so changing a
password ends their sessions) and the per-session CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache

from starlette.requests import Request

# scrypt cost: about 50 ms and 16 MiB per check, so guessing is slow but a login is not.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_KEY_LEN = 32
_MAX_MEM = 64 * 1024 * 1024

SESSION_ID = "sid"
SESSION_USER = "user"
SESSION_FINGERPRINT = "pwfp"
SESSION_CSRF = "csrf"
CSRF_FIELD = "csrf_token"


class BadUserSpec(ValueError):
    """REVIEW_USERS is not a list of ``name:scrypt$...`` pairs."""


@dataclass(frozen=True, slots=True)
class ReviewUser:
    """A person allowed to review, with their stored password hash."""

    name: str
    password_hash: str

    @property
    def fingerprint(self) -> str:
        """A short digest of the stored hash: a session signed for an old hash stops working."""
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash a password for REVIEW_USERS with the stdlib's scrypt."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=_KEY_LEN, maxmem=_MAX_MEM
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, password_hash: str) -> bool:
    """True when ``password`` matches ``password_hash``; a malformed hash never matches."""
    try:
        scheme, n, r, p, salt, key = password_hash.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        actual = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected), maxmem=_MAX_MEM
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Checked against when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password("not-a-user", salt=b"\0" * 16)


def parse_users(spec: str) -> dict[str, ReviewUser]:
    """Parse REVIEW_USERS (``name:hash,name:hash``); raise BadUserSpec naming the bad entry's position."""
    users: dict[str, ReviewUser] = {}
    for position, item in enumerate((part.strip() for part in spec.split(",")), start=1):
        if not item:
            continue
        name, sep, password_hash = item.partition(":")
        name = name.strip()
        if not sep or not name or not password_hash.startswith("scrypt$") or password_hash.count("$") != 5:
            raise BadUserSpec(f"REVIEW_USERS entry {position} is not name:scrypt$n$r$p$salt$key")
        users[name] = ReviewUser(name=name, password_hash=password_hash.strip())
    return users


@lru_cache(maxsize=8)
def _cached_users(spec: str) -> dict[str, ReviewUser]:
    return parse_users(spec)


def configured_users(spec: str) -> dict[str, ReviewUser]:
    """The review users named by a REVIEW_USERS value (parsed once per distinct value)."""
    return _cached_users(spec)


def authenticate(users: dict[str, ReviewUser], name: str, password: str) -> ReviewUser | None:
    """The user whose name and password match, else None (in about the same time either way)."""
    user = users.get(name)
    ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
    return user if ok and user is not None else None


def csrf_token(request: Request) -> str:
    """This session's CSRF token, created on first use."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


def csrf_valid(request: Request, submitted: object) -> bool:
    """True when the submitted form token equals this session's token (constant time)."""
    expected = request.session.get(SESSION_CSRF)
    if not isinstance(expected, str) or not isinstance(submitted, str) or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def log_in(request: Request, user: ReviewUser, *, lifetime_seconds: int) -> None:
    """Start a fresh session for ``user`` (recorded server-side): nothing from before survives, the CSRF token is new.

    Blocking (a database write): call it from a thread.
    """
    from webhooks.review.sessions import start_session

    request.session.clear()
    request.session[SESSION_ID] = start_session(user.name, lifetime_seconds=lifetime_seconds)
    request.session[SESSION_USER] = user.name
    request.session[SESSION_FINGERPRINT] = user.fingerprint
    request.session[SESSION_CSRF] = secrets.token_urlsafe(32)


def log_out(request: Request) -> None:
    """End the session on the server (a copy of the cookie opens nothing afterwards) and clear the cookie."""
    from webhooks.review.sessions import end_session

    token = request.session.get(SESSION_ID)
    if isinstance(token, str):
        end_session(token)
    request.session.clear()


def session_user(request: Request, users: dict[str, ReviewUser]) -> ReviewUser | None:
    """The logged-in user: the cookie names a live server-side session of a configured user whose password has not
    changed since. Blocking (a database read): call it from a thread."""
    from webhooks.review.sessions import end_session, session_is_live

    name = request.session.get(SESSION_USER)
    token = request.session.get(SESSION_ID)
    if not isinstance(name, str) or not isinstance(token, str):
        return None
    user = users.get(name)
    fingerprint = request.session.get(SESSION_FINGERPRINT)
    if user is None or not isinstance(fingerprint, str) or not hmac.compare_digest(fingerprint, user.fingerprint):
        # The user is gone or their password changed: the session they had ends here, for good.
        end_session(token)
        return None
    return user if session_is_live(token, name) else None
