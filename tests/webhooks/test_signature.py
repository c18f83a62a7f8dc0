"""Stripe-Signature verification agrees with the stripe package, and refuses what it should."""

from __future__ import annotations

import time

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.signature import SignatureError, SignatureFailure, sign_header, verify_signature

SECRET = "whsec_unit"
NOW = 1_760_000_000


def verify(payload: bytes, header: str | None, *secrets: str, now: float = NOW, tolerance: int = 300) -> int:
    return verify_signature(
        payload, header, [s.encode() for s in secrets or (SECRET,)], tolerance_seconds=tolerance, now=now
    )


class TestAgreesWithTheStripePackage:
    @settings(max_examples=200, deadline=None)
    @given(payload=st.text(), secret=st.text(min_size=1).filter(lambda s: s.strip()), skew=st.integers(-300, 300))
    def test_headers_made_by_stripe_verify(self, payload: str, secret: str, skew: int) -> None:
        header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=NOW + skew)
        assert verify(payload.encode(), header, secret) == NOW + skew
        assert sign_header(payload.encode(), secret, NOW + skew) == header

    @settings(max_examples=100, deadline=None)
    # HMAC pads short keys with zero bytes, so SECRET + "\x00" is the same key as SECRET: not "another secret".
    @given(payload=st.text(), other=st.text(min_size=1).filter(lambda s: s.strip("\x00")))
    def test_a_header_made_with_another_secret_fails_for_both(self, payload: str, other: str) -> None:
        header = stripe.WebhookSignature.generate_signature_header(payload, SECRET + other, timestamp=int(time.time()))
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(payload, header, SECRET, tolerance=300)
        with pytest.raises(SignatureError) as caught:
            verify(payload.encode(), header, now=time.time())
        assert caught.value.failure is SignatureFailure.MISMATCH

    @settings(max_examples=300, deadline=None)
    @given(header=st.text(max_size=200))
    def test_any_header_is_refused_cleanly(self, header: str) -> None:
        with pytest.raises(SignatureError):
            verify(b"{}", header)


class TestRefusals:
    def test_stale_in_the_past_and_in_the_future(self) -> None:
        for skew in (-301, 301):
            header = sign_header(b"{}", SECRET, NOW + skew)
            with pytest.raises(SignatureError) as caught:
                verify(b"{}", header)
            assert caught.value.failure is SignatureFailure.STALE

    def test_any_of_several_secrets(self) -> None:
        header = sign_header(b"{}", "whsec_old", NOW)
        assert verify(b"{}", header, "whsec_new", "whsec_old") == NOW

    @pytest.mark.parametrize(
        ("header", "failure"),
        [
            (None, SignatureFailure.MISSING),
            ("", SignatureFailure.MISSING),
            ("t=1", SignatureFailure.MALFORMED),
            ("v1=abc", SignatureFailure.MALFORMED),
            ("t=1,t=2,v1=abc", SignatureFailure.MALFORMED),
            ("t=-5,v1=abc", SignatureFailure.MALFORMED),
            ("t=\u00b2,v1=abc", SignatureFailure.MALFORMED),
            (f"t={NOW},v1=\u00e9\u00e9", SignatureFailure.MISMATCH),
            (f"t={NOW},v0=abc", SignatureFailure.MALFORMED),
        ],
    )
    def test_malformed_headers(self, header: str | None, failure: SignatureFailure) -> None:
        with pytest.raises(SignatureError) as caught:
            verify(b"{}", header)
        assert caught.value.failure is failure

    def test_signature_covers_the_exact_bytes(self) -> None:
        header = sign_header(b'{"a": 1}', SECRET, NOW)
        with pytest.raises(SignatureError):
            verify(b'{"a":1}', header)
