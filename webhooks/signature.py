"""Stripe webhook signatures: the scheme of ``stripe.WebhookSignature``, over the raw body bytes.

``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">[,v1=...][,v0=...]``.
See https://docs.stripe.com/webhooks#verify-manually. We verify the bytes as received (no decode and re-encode,
which is what the stripe package does and which is identical for UTF-8 bodies), accept any of several secrets
so a secret can be rolled, and, unlike the stripe package, also refuse timestamps too far in the future: a
signature made with a skewed or forged clock must not stay replayable for longer than the tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from enum import StrEnum

import stripe

SCHEME = stripe.WebhookSignature.EXPECTED_SCHEME  # "v1"


class SignatureFailure(StrEnum):
    """Why a signature was refused; also the ``code`` of the error body and a metrics label."""

    MISSING = "signature_missing"
    MALFORMED = "signature_malformed"
    MISMATCH = "signature_mismatch"
    STALE = "signature_timestamp_out_of_tolerance"


class SignatureError(Exception):
    """The Stripe-Signature header does not prove that Stripe sent this body just now."""

    def __init__(self, failure: SignatureFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


def parse_signature_header(header: str) -> tuple[int, list[str]]:
    """Return the timestamp and the ``v1`` signatures of a Stripe-Signature header."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise SignatureError(SignatureFailure.MALFORMED, "the t= element is missing, repeated or not a time")
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError(SignatureFailure.MALFORMED, "the Stripe-Signature header has no t= element")
    if not signatures:
        raise SignatureError(SignatureFailure.MALFORMED, f"the Stripe-Signature header has no {SCHEME}= signature")
    return timestamp, signatures


def compute_signature(payload: bytes, secret: bytes, timestamp: int) -> str:
    """The hex ``v1`` signature of ``payload`` at ``timestamp``."""
    return hmac.new(secret, b"%d.%s" % (timestamp, payload), hashlib.sha256).hexdigest()


def sign_header(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for ``payload`` (tests, the benchmark, and replaying stored events)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},{SCHEME}={compute_signature(payload, secret.encode(), ts)}"


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[bytes],
    *,
    tolerance_seconds: int,
    now: float | None = None,
) -> int:
    """Check ``header`` against ``payload`` and each secret; return the signed timestamp or raise SignatureError."""
    if not header:
        raise SignatureError(SignatureFailure.MISSING, "no Stripe-Signature header")
    timestamp, signatures = parse_signature_header(header)
    matched = False
    for secret in secrets:
        expected = compute_signature(payload, secret, timestamp).encode()
        # Compare against every candidate so the time taken does not depend on which one matched.
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise SignatureError(SignatureFailure.MISMATCH, "no signature matches the body for any configured secret")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignatureError(
            SignatureFailure.STALE,
            f"signature timestamp {timestamp} is more than {tolerance_seconds}s away from now ({int(current)})",
        )
    return timestamp
